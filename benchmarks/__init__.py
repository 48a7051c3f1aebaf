"""Measurements of the models and the pipeline; each module runs as `python -m benchmarks.NAME`."""
