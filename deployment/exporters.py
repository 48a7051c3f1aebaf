"""Export formats by name: `--export` takes its choices and help from EXPORTERS, dispatches through it, and output
safety recognises an earlier export by its entry. Each writer fills an empty folder; onnx loads only when it runs.

To add a format: its writer and one `EXPORTERS` entry."""
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from deployment.onnx_manifest import MANIFEST_NAME


class Exporter(NamedTuple):
    """Every fact about an export format.

    write(model, folder, *, threshold, class_names, input_size, checkpoint, threshold_source, calibration) fills
    the folder, its manifest last; manifest_keys: keys every manifest of it holds, by which (with the suffixes of
    the other files it leaves) output safety knows an earlier export it may replace; runner: the module that runs
    the folder (`python -m RUNNER FOLDER IMAGE_OR_FOLDER ...`); precision_flag: what the runner is told for the
    quantised twins; noun: what the files are, for the closing message."""
    write: Callable[..., None]
    manifest: str
    manifest_keys: tuple[str, ...]
    suffixes: tuple[str, ...]
    runner: str
    precision_flag: str
    noun: str
    help: str


def export_onnx(model, out: Path, *, threshold: float, class_names: list[str], input_size: int, checkpoint: str,
                threshold_source: dict | None = None, calibration: np.ndarray | None = None) -> None:
    """One ONNX graph per segment plus a manifest; with calibration images also statically quantised int8 twins."""
    from deployment.onnx_export import export_segments
    from deployment.onnx_quantize import quantize_segments
    export_segments(model, out, threshold=threshold, class_names=class_names, input_size=input_size,
                    checkpoint=checkpoint, threshold_source=threshold_source)
    if calibration is not None:
        quantize_segments(out, calibration)


EXPORTERS: dict[str, Exporter] = {
    'onnx': Exporter(export_onnx, MANIFEST_NAME, ('segments', 'exit_positions'), ('.onnx', '.data'),
                     'deployment.onnx_runner', ' --precision int8', 'ONNX segments',
                     'one ONNX graph per segment and a manifest, for onnxruntime on edge boards'),
}


def exporters_help() -> str:
    """`--export`'s help line, from the entries."""
    return 'export --checkpoint-path for edge runtimes: ' + '; '.join(
        f'{name}: {entry.help}' for name, entry in EXPORTERS.items())
