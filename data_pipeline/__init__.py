"""Data behind `data_loader_help.py`: the data pass (`data_pass`: request in, data sets out) over folder layouts
and splits, transforms and image decoding; the DEMO generator.

The package imports nothing itself, so the torch-free ONNX runner can use `image_io` alone.
"""
