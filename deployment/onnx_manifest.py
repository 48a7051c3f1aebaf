"""The ONNX export's manifest: its file name, format number and the keys the runner needs. Imports nothing, so
the exporter registry, the exporter and the torch-free runner share it without loading onnxruntime or torch."""
MANIFEST_NAME = 'manifest.json'
MANIFEST_FORMAT = 1
MANIFEST_KEYS = ('input_size', 'mean', 'std', 'threshold', 'exit_positions', 'class_names', 'segments')
