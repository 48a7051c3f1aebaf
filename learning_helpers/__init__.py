"""How the models learn: losses, one module per training stage, the batch loop, optimiser, checkpoints."""
