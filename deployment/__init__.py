"""Deployment: ONNX export, int8 quantisation, and the torch-free runner (`python -m deployment.onnx_runner`).

The package imports nothing itself, so the runner starts on a board without torch.
"""
