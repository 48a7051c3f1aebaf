"""How a pass runs, below training and evaluation alike: processes (torchrun), mixed precision, the batch
iterator, device synchronisation, atomic file writes."""
