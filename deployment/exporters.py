"""Export formats by name, like models.gates.GATES: `--export` takes its choices from EXPORTERS and dispatches
through it. Each exporter writes a complete export into an empty folder; onnx loads only when it runs."""
from pathlib import Path
from typing import Callable

import numpy as np


def export_onnx(model, out: Path, *, threshold: float, class_names: list[str], input_size: int, checkpoint: str,
                threshold_source: dict | None = None, calibration: np.ndarray | None = None) -> None:
    """One ONNX graph per segment plus a manifest; with calibration images also statically quantised int8 twins."""
    from deployment.onnx_export import export_segments
    from deployment.onnx_quantize import quantize_segments
    export_segments(model, out, threshold=threshold, class_names=class_names, input_size=input_size,
                    checkpoint=checkpoint, threshold_source=threshold_source)
    if calibration is not None:
        quantize_segments(out, calibration)


EXPORTERS: dict[str, Callable[..., None]] = {'onnx': export_onnx}
