"""What `main_dynn.py` dispatches: the training and inference jobs, run setup and output safety."""
