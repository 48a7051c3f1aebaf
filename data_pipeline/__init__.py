"""Data behind `data_loader_help.py`: folder layouts and splits, transforms, image decoding, the DEMO generator.

The package imports nothing itself, so the torch-free ONNX runner can use `image_io` alone.
"""
