"""How the models learn: losses, one module per training stage, evaluation, and checkpoints."""
