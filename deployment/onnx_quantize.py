"""INT8 segments beside the float ones: onnxruntime's static quantisation in QDQ format, calibrated on images.

Each segment is calibrated on what reaches it in the float chain: segment 0 on the images, segment k on the
tokens segment k-1 returns for them (every calibration image runs every segment; no early exit).
Quantised: the weight products (patch-embedding Conv, MLP MatMuls, exit heads' Gemm). Kept float, from the
measurement in docs/RESULTS.md: the DFT matrix products (quantising them too made DEMO's chain slower, 21.9
against 18.4 ms, for the same accuracy within one image: each product is requantised before the next) and the
gate's Gemm (four features in, one probability out: no time to gain, and a float gate keeps the exit decisions
those of the float graphs). Elementwise ops, norms and softmax stay float: QDQ around them costs more than
it saves on a CPU. Needs no torch: numpy, onnx and onnxruntime only.
"""
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                      quantize_static)

from deployment.onnx_manifest import MANIFEST_NAME
from deployment.onnx_runner import OnnxEarlyExit, read_manifest
from runtime.atomic import save_text

QUANTIZED_OPS = ('Conv', 'MatMul', 'Gemm')
DFT_TABLES = ('.cos_a', '.sin_a', '.fwd_cos_b', '.fwd_sin_b', '.inv_cos_b', '.inv_sin_b')  # MatmulGlobalFilter's
KEEP_FLOAT = ('dft', 'gate')  # the groups of nodes left in float32 by default
FLOAT_GROUPS = {
    'dft': lambda inputs: any(name.endswith(DFT_TABLES) for name in inputs),
    'gate': lambda inputs: any('.gates.' in name for name in inputs),
    'heads': lambda inputs: any('.intermediate_heads.' in name or name.startswith('model.head.') for name in inputs),
}
CALIBRATION_BATCH = 32


def int8_file_name(float_name: str) -> str:
    return float_name.removesuffix('.onnx') + '.int8.onnx'


class _Inputs(CalibrationDataReader):
    """The calibration inputs of one segment, batch by batch."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self.rows: Iterator[dict] = iter([{input_name: x} for x in batches])

    def get_next(self) -> dict | None:
        return next(self.rows, None)


def float_nodes(model: onnx.ModelProto, keep_float: tuple[str, ...]) -> list[str]:
    """Names of the quantisable nodes of the groups in keep_float (recognised by the weights they read)."""
    tests = [FLOAT_GROUPS[group] for group in keep_float]
    return [node.name for node in model.graph.node
            if node.op_type in QUANTIZED_OPS and any(test(node.input) for test in tests)]


class _NoPreprocessingAdvice(logging.Filter):
    """onnxruntime's quantiser advises pre-processing twice per graph on the root logger; its shape inference
    and graph optimisation are what onnxruntime does anyway when it loads the graph."""

    def filter(self, record: logging.LogRecord) -> bool:
        return 'pre-processing before quantization' not in record.getMessage() and \
            'run pre-processing' not in record.getMessage()


def quantize_segments(directory: str | Path, images: np.ndarray, *, keep_float: tuple[str, ...] = KEEP_FLOAT,
                      per_channel: bool = True) -> dict:
    """Write segment_{k}.int8.onnx beside each float segment of the export in `directory` and name them in its
    manifest (int8_segments, with how they were made under int8); return the manifest. images: (N, 3, H, W)
    float32, preprocessed as the runner does."""
    directory = Path(directory)
    unknown = sorted(set(keep_float) - set(FLOAT_GROUPS))
    if unknown:
        raise ValueError(f'unknown node groups {unknown}; known: {sorted(FLOAT_GROUPS)}')
    manifest = read_manifest(directory)
    runner = OnnxEarlyExit(directory, threshold=1.0)
    step = manifest.get('batch') or CALIBRATION_BATCH  # graphs fixed to a batch size take exactly that
    batches = [np.ascontiguousarray(images[i:i + step], dtype=np.float32) for i in range(0, len(images), step)]
    if manifest.get('batch'):
        batches = [x for x in batches if len(x) == step]
    names = []
    for k, name in enumerate(manifest['segments']):
        model = onnx.load(directory / name)
        names.append(int8_file_name(name))
        target, tmp = directory / names[-1], directory / (names[-1] + '.tmp')
        advice = _NoPreprocessingAdvice()
        logging.getLogger().addFilter(advice)
        try:
            quantize_static(model, tmp, _Inputs(runner.input_names[k], batches), quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            nodes_to_exclude=float_nodes(model, keep_float), calibrate_method=CalibrationMethod.MinMax)
            os.replace(tmp, target)
        finally:
            logging.getLogger().removeFilter(advice)
            tmp.unlink(missing_ok=True)
        if k < runner.num_exits - 1:
            batches = [runner.run_segment(k, x)[0] for x in batches]  # the float tokens that reach segment k+1
    manifest['int8_segments'] = names
    manifest['int8'] = {'format': 'QDQ', 'activations': 'uint8', 'weights': 'int8, per channel' if per_channel
                        else 'int8', 'quantized_ops': list(QUANTIZED_OPS), 'kept_float': list(keep_float),
                        'calibration_images': int(len(images)), 'calibration': 'min-max'}
    save_text(directory / MANIFEST_NAME, json.dumps(manifest, indent=2) + '\n')
    return manifest
