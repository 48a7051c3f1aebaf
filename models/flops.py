"""FLOP counting with torch.utils.flop_counter, plus the FFT filter that the stock counter misses.

Convention: the counter's, a multiply-add is 2 FLOPs (GFNet's paper counts multiply-adds, i.e. half).
Element-wise ops (LayerNorm, GELU, softmax) are not counted, as in the stock counter. Added here:
  real FFT (rfft2) or its inverse over n points: 2.5 * n * log2(n) per channel (half a complex FFT)
  complex FFT over n points:                     5 * n * log2(n) per channel
  complex multiply:                             6 per element (4 multiplies, 2 adds)
  CPU attention (a ViT's scaled_dot_product_attention): what the stock counter gives its GPU kernels
"""
import math
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from errors import GFNetDynnError
from models.gates import GATES
from models.gfnet_dynn import GFNetDynn


def _raw(formula: Callable) -> Callable:
    """Mark a formula to receive tensors, not shapes (it needs dtypes and output sizes)."""
    formula._get_raw = True
    return formula


def _fft_cost(shape: torch.Size, dims: list[int], per_point_log: float) -> int:
    points = math.prod(shape[d] for d in dims)
    batch = math.prod(shape) // points
    return int(per_point_log * points * math.log2(points) * batch) if points > 1 else 0


@_raw
def _fft_r2c_flops(x, dim, *args, out_val=None, **kwargs) -> int:
    return _fft_cost(x.shape, dim, 2.5)


@_raw
def _fft_c2r_flops(x, dim, *args, out_val=None, **kwargs) -> int:
    return _fft_cost(out_val.shape, dim, 2.5)  # the real output holds the transform's true size


@_raw
def _fft_c2c_flops(x, dim, *args, out_val=None, **kwargs) -> int:
    return _fft_cost(x.shape, dim, 5.0)


@_raw
def _mul_flops(*args, out_val=None, **kwargs) -> int:
    # Only the complex multiply of the global filter; real element-wise products stay uncounted.
    return 6 * out_val.numel() if isinstance(out_val, torch.Tensor) and out_val.is_complex() else 0


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)  # QK^T and AV; the stock counter misses this kernel


FFT_FLOP_FORMULAS = {
    torch.ops.aten._fft_r2c: _fft_r2c_flops,
    torch.ops.aten._fft_c2r: _fft_c2r_flops,
    torch.ops.aten._fft_c2c: _fft_c2c_flops,
    torch.ops.aten.mul: _mul_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
}


def flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the global filter (and attention on the CPU)."""
    return FlopCounterMode(display=False, custom_mapping=FFT_FLOP_FORMULAS)


@torch.no_grad()
def count_flops(fn: Callable, *args) -> int:
    """FLOPs of one call of `fn(*args)`, FFT filter included."""
    with flop_counter() as counter:
        fn(*args)
    return counter.get_total_flops()


def _dummy_image(model: torch.nn.Module) -> torch.Tensor:
    param = next(model.parameters())
    height, width = model.input_size
    return torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype)


@torch.no_grad()
def exit_gflops(model: torch.nn.Module) -> list[float]:
    """Cumulative GFLOPs per image to reach each exit (first to final): everything computed so far,
    earlier heads and gates included, at the model's input size."""
    was_training = model.training
    model.eval()
    cumulative = []
    with flop_counter() as counter:
        tokens = _dummy_image(model)
        for k in range(model.num_exits):
            tokens, _, _ = model.forward_segment(k, tokens)
            cumulative.append(counter.get_total_flops() / 1e9)
    model.train(was_training)
    return cumulative


def normalized_exit_costs(model: torch.nn.Module) -> list[float]:
    """Cost of each exit as a fraction of the full network; the final exit costs 1."""
    gflops = exit_gflops(model)
    return [g / gflops[-1] for g in gflops]


# The reference's counter (an MSDNet-style op counter run at batch 1), reproduced so that `--exit-costs reference`
# gives the gates the same cost vector, hence the same lambda trade-off, as the reference's released runs. Its
# miscounts are kept on purpose: each Linear is counted for one token instead of all N, the global filter as an
# FFT on a fixed 11 x 18 grid whatever the input, LayerNorm as 2.5 and GELU as 8 operations per element, the
# shared norm once after every block (its inference path normalises after each block), element-wise adds and
# pooling not at all; a gate as its GATES entry's `reference_ops`. Reported GFLOPs always come from `exit_gflops`,
# never from here.
_REFERENCE_FFT_GRID = (11, 18)


def reference_exit_op_counts(model: torch.nn.Module) -> list[float]:
    """The reference counter's cumulative operations up to each exit (first to final) for a GFNetDynn."""
    if not isinstance(model, GFNetDynn):
        raise GFNetDynnError(f"--exit-costs reference is the reference's GFNet op counter; a "
                             f'{type(model).__name__} trains with its true FLOPs: pass --exit-costs flops')
    a, b = _REFERENCE_FFT_GRID
    tokens = model.grid_size[0] * model.grid_size[1]
    dim, classes = model.embed_dim, model.num_classes
    hidden = model.blocks[0].mlp.fc1.out_features
    patch = model.patch_embed.patch_size
    norm = 2.5 * tokens * dim
    fft_filter = tokens * (10 * a * b * math.log2(a * b) + a * (b / 2 + 1) * 6)
    mlp = (2 * dim * hidden + hidden) + 8 * tokens * hidden + (2 * hidden * dim + dim)  # fc1 (1 token), GELU, fc2
    head = 2 * dim * classes + classes  # one token, as every Linear
    gate = GATES[model.gate_type].reference_ops(classes)
    ops = 2 * 3 * dim * patch[0] * patch[1] * tokens  # patch embedding convolution
    counts = []
    for i in range(len(model.blocks)):
        ops += norm + fft_filter + norm + mlp + norm  # norm1, filter, norm2, MLP, then the shared norm
        if i in model.exit_positions:
            ops += head + gate
            counts.append(ops)
    counts.append(ops + norm + head)  # the final norm and head
    return counts


def reference_normalized_exit_costs(model: torch.nn.Module) -> list[float]:
    """`reference_exit_op_counts` divided by the full network's: what `--exit-costs reference` trains with."""
    counts = reference_exit_op_counts(model)
    return [c / counts[-1] for c in counts]


def lambda_factor(model: torch.nn.Module) -> dict:
    """How a lambda translates between the two cost vectors: a gate target prefers exit k over the final head
    when CE_k - CE_final < lambda (1 - cost_k), so lambda under true FLOPs acts like lambda * (1 - flops_k) /
    (1 - reference_k) under the reference's vector. Returns that ratio per intermediate exit and its mean."""
    flops, reference = normalized_exit_costs(model), reference_normalized_exit_costs(model)
    ratios = [(1 - f) / (1 - r) for f, r in zip(flops[:-1], reference[:-1])]
    return {'flops_costs': flops, 'reference_costs': reference, 'per_exit': ratios,
            'mean': sum(ratios) / len(ratios)}
