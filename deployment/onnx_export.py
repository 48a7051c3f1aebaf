"""Export an early-exit network (GFNet-Dynn or a timm backbone with exits) as one ONNX graph per segment, for
real early exit on an edge runtime.

Segment k runs the blocks (or stages) before exit k and returns that exit's outputs; a runtime
(`deployment/onnx_runner.py`) chains the segments and feeds only the samples still inside to the next one.
Between segments travel tokens (B, N, D) or feature maps (B, C, H, W), with a dynamic batch axis either way.
Graphs come from the dynamo exporter (the TorchScript one rejects rfft2), with each GFNet global filter's FFTs
written as DFT-matrix products (`MatmulGlobalFilter`) for speed on CPU runtimes.
"""
import contextlib
import copy
import json
import logging
import math
from pathlib import Path

import onnx
from onnx import helper, numpy_helper
import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from deployment.onnx_manifest import MANIFEST_FORMAT, MANIFEST_NAME
from errors import GFNetDynnError
from models.early_exit_net import EarlyExitNetwork
from models.gfnet import GlobalFilter
from runtime.atomic import atomic_write, save_text

# The exporter writes opset 18; 17 (the newest opset of TensorRT 8.5, JetPack 5) is made from it by moving the
# axes of each Reduce* node from an input back to an attribute, the only change between them these graphs use.
OPSET = 18
OPSETS = (17, 18)
REDUCE_OPS = ('ReduceMean', 'ReduceMax', 'ReduceMin', 'ReduceProd', 'ReduceL1', 'ReduceL2', 'ReduceLogSum',
              'ReduceLogSumExp', 'ReduceSumSquare')  # axes became an input in opset 18 (ReduceSum: in 13)


class MatmulGlobalFilter(nn.Module):
    """The same function as a `GlobalFilter`, with rfft2/irfft2 written as products with real DFT matrices.

    rfft2/irfft2 do export (as the ONNX DFT operator), but onnxruntime's CPU DFT made a two-block GFNet-XS
    segment about 20x slower (~100 ms against ~5 ms). On an a x b token grid the matrices cost about
    3ab(a + b) multiply-adds per channel, a few percent of the MLP. It reads the filter's own complex_weight;
    the tables are constants of the graph, not parameters.
    """

    def __init__(self, global_filter: GlobalFilter):
        super().__init__()
        self.filter = global_filter
        a, b = global_filter.grid_size
        half = b // 2 + 1
        scale = (a * b) ** -0.5  # norm='ortho' on the way in and on the way out
        # Angles from integer products reduced mod the length, in float64: exact tables, then float32.
        rows = torch.arange(a, dtype=torch.float64)
        angle_a = 2 * math.pi * (torch.outer(rows, rows) % a) / a  # (a, a)
        freqs, cols = torch.arange(half, dtype=torch.float64), torch.arange(b, dtype=torch.float64)
        angle_b = 2 * math.pi * (torch.outer(freqs, cols) % b) / b  # (b//2+1, b)
        # irfft counts each bin between DC and Nyquist twice (its mirror image) and ignores the imaginary
        # part of DC and, for even b, of the Nyquist bin.
        twice = torch.full((half, 1), 2.0, dtype=torch.float64)
        twice[0] = 1.0
        real_only = torch.zeros(half, 1, dtype=torch.bool)
        real_only[0] = True
        if b % 2 == 0:
            twice[-1] = 1.0
            real_only[-1] = True
        inv_sin = torch.where(real_only, 0.0, -scale * twice * torch.sin(angle_b))
        tables = {
            'cos_a': torch.cos(angle_a), 'sin_a': torch.sin(angle_a),  # symmetric (a, a)
            'fwd_cos_b': scale * torch.cos(angle_b), 'fwd_sin_b': -scale * torch.sin(angle_b),  # (b//2+1, b)
            'inv_cos_b': (scale * twice * torch.cos(angle_b)).T, 'inv_sin_b': inv_sin.T,  # (b, b//2+1)
        }
        for name, table in tables.items():
            self.register_buffer(name, table.float().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        a, b = self.filter.grid_size
        half = b // 2 + 1
        dtype = x.dtype
        x = x.view(B, a, b, D).float()
        # rfft along b, then fft along a (on (B, a, half*D) so that the (a, a) tables multiply axis 1)
        zr = (self.fwd_cos_b @ x).reshape(B, a, half * D)  # (B, a, b//2+1, D) flattened
        zi = (self.fwd_sin_b @ x).reshape(B, a, half * D)
        xr = self.cos_a @ zr + self.sin_a @ zi
        xi = self.cos_a @ zi - self.sin_a @ zr
        weight = self.filter.complex_weight.reshape(a, half * D, 2)
        wr, wi = weight[..., 0], weight[..., 1]
        yr, yi = xr * wr - xi * wi, xr * wi + xi * wr
        # inverse fft along a, then irfft along b
        vr = (self.cos_a @ yr - self.sin_a @ yi).reshape(B, a, half, D)
        vi = (self.cos_a @ yi + self.sin_a @ yr).reshape(B, a, half, D)
        x = self.inv_cos_b @ vr + self.inv_sin_b @ vi  # (B, a, b, D)
        return x.reshape(B, N, D).to(dtype)


class SegmentGraph(nn.Module):
    """Segment k of an early-exit network as a module of its own: images (segment 0) or the previous segment's
    features -> its blocks or stages -> exit k.

    Intermediate exits return (features, logits (B, C), gate probability (B,)); the final exit returns
    logits only. It holds the model's own submodules, so the export sees the trained weights as they are.
    """

    def __init__(self, model: EarlyExitNetwork, k: int):
        super().__init__()
        self.model = model
        self.k = k

    @property
    def is_final(self) -> bool:
        return self.k == len(self.model.exit_positions)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        features, logits, gate_logits = self.model.forward_segment(self.k, x)  # x: images (k = 0) or features
        if gate_logits is None:
            return logits
        return features, logits, torch.sigmoid(gate_logits)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's optimisation passes log about 250 INFO lines per model; keep their warnings only."""
    loggers = [logging.getLogger(name) for name in ('onnx_ir', 'onnxscript', 'torch.onnx')]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def segment_file_name(k: int) -> str:
    return f'segment_{k}.onnx'


def export_segments(model: EarlyExitNetwork, out_dir: str | Path, *, threshold: float, class_names: list[str],
                    input_size: int, opset: int = OPSET, batch: int | None = None,
                    checkpoint: str | None = None, threshold_source: dict | None = None) -> Path:
    """Write segment_{k}.onnx for every exit and manifest.json to out_dir; return the manifest's path.

    batch None: a dynamic batch axis; an int: graphs fixed to that batch (static shapes throughout, which some
    runtimes and compilers need). checkpoint: the file the model came from, recorded for benchmarks;
    threshold_source: where the threshold came from (a flag, or the results.json and how it chose). The model
    itself is left untouched: a float32 CPU copy in eval mode is exported.
    """
    if opset not in OPSETS:
        raise GFNetDynnError(f'opset {opset} is not one this export writes; choose one of {OPSETS}')
    if batch is not None and batch < 1:
        raise GFNetDynnError(f'batch {batch} must be at least 1 (or None for a dynamic batch axis)')
    if tuple(model.input_size) != (input_size, input_size):
        raise GFNetDynnError(f'the model was built for {model.input_size[0]} px images, not '
                             f'{input_size}; export with --input-size {model.input_size[0]}')
    if len(class_names) != model.num_classes:
        raise GFNetDynnError(f'{len(class_names)} class names for a model with {model.num_classes} classes; '
                             f'pass the class names of the data set it was trained on')
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A copy, so that the caller's model keeps its device, dtype, mode and autograd state.
    model = copy.deepcopy(model).to(device='cpu', dtype=torch.float32).eval().requires_grad_(False)
    for module in list(model.modules()):
        if isinstance(getattr(module, 'filter', None), GlobalFilter):  # a GFNet block
            module.filter = MatmulGlobalFilter(module.filter)
    # A dynamic batch is exported from an example of 2: export specialises a dimension whose example size is 1.
    x = torch.randn(2 if batch is None else batch, 3, input_size, input_size)
    dynamic_shapes = ({0: torch.export.Dim('batch', min=1)},) if batch is None else None
    file_names = []
    for k in range(model.num_exits):
        graph = SegmentGraph(model, k).eval()
        output_names = ['logits'] if graph.is_final else [f'next_{model.carried}', 'logits', 'gate_prob']
        with _quiet_exporter():
            program = torch.onnx.export(graph, (x,), dynamo=True, opset_version=OPSET, verbose=False,
                                        input_names=['images' if k == 0 else model.carried], output_names=output_names,
                                        dynamic_shapes=dynamic_shapes)
        file_names.append(segment_file_name(k))
        graph_proto = program.model_proto if opset == OPSET else to_opset_17(program.model_proto)
        atomic_write(out_dir / file_names[-1], lambda stream: stream.write(graph_proto.SerializeToString()))
        if not graph.is_final:
            with torch.no_grad():
                x = graph(x)[0]  # this segment's features are the next one's example input
    manifest = {
        'format': MANIFEST_FORMAT,
        'input_size': input_size,
        'mean': list(IMAGENET_DEFAULT_MEAN),
        'std': list(IMAGENET_DEFAULT_STD),
        'threshold': float(threshold),
        'threshold_source': threshold_source,
        'exit_positions': list(model.exit_positions),
        'class_names': list(class_names),
        'segments': file_names,
        'opset': opset,
        'batch': batch,  # None: any batch size
        'checkpoint': checkpoint,
    }
    return save_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + '\n')


def to_opset_17(model: onnx.ModelProto) -> onnx.ModelProto:
    """An opset-18 graph as opset 17: each Reduce* node's constant axes input becomes its axes attribute.

    onnx's own version converter fails on these graphs (it looks for the axes among Constant nodes only) and
    leaves opset-18 attributes behind; the result is checked against the opset-17 schemas.
    """
    model = copy.deepcopy(model)
    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in REDUCE_OPS:
            continue
        attributes = {a.name: a for a in node.attribute}
        if 'noop_with_empty_axes' in attributes:
            if attributes['noop_with_empty_axes'].i:
                raise ValueError(f'{node.name}: noop_with_empty_axes=1 has no opset-17 equivalent')
            node.attribute.remove(attributes['noop_with_empty_axes'])
        if len(node.input) > 1 and node.input[1]:
            axes = numpy_helper.to_array(constants[node.input[1]])  # KeyError: axes computed at run time
            node.attribute.append(helper.make_attribute('axes', [int(a) for a in axes.reshape(-1)]))
            del node.input[1:]
    for entry in model.opset_import:
        if entry.domain in ('', 'ai.onnx'):
            entry.version = 17
    used = {name for node in model.graph.node for name in node.input}
    unused = [init for init in model.graph.initializer if init.name not in used]
    for init in unused:  # the axes tensors now held as attributes
        model.graph.initializer.remove(init)
    onnx.checker.check_model(model, full_check=True)
    return model

