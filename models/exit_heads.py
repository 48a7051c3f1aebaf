"""Exit heads: what an intermediate exit computes from its segment's output before the gate reads it.

`linear` is the reference's head: a Linear layer on the features pooled over every position. `pool` keeps the
layout, as Shallow-Deep Networks' internal classifiers do (Kaya et al. 2019): the exit's feature map (a CNN's
(B, C, H, W), or a GFNet's or ViT's patch tokens on their grid) is max-pooled and average-pooled to a small grid
of cells, the two mixed by a learned alpha, then read by a Linear layer. Either head may put a LayerNorm before
its Linear layer, so that it learns at the same lr whatever the scale of the backbone's features.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn


class ExitHeadKind(NamedTuple):
    """One --exit-head choice."""
    pools_grid: bool  # reads the feature grid pooled to cells x cells by max and by average, mixed by a learned
    # alpha (SDN); else the features averaged over all positions
    help: str


EXIT_HEADS = {
    'linear': ExitHeadKind(False, "the reference's: Linear on the features averaged over all positions"),
    'pool': ExitHeadKind(True, 'SDN-style: max and average pooling to a GRID x GRID grid (--exit-grid), mixed by a '
                               'learned alpha, then Linear; keeps the layout an average loses'),
}
EXIT_NORMS = ('none', 'layernorm')  # --exit-norm: what goes before the head's Linear layer


@dataclass(frozen=True)
class ExitHeadConfig:
    """How every intermediate exit's head is built (--exit-head, --exit-norm, --exit-grid)."""
    kind: str = 'linear'
    norm: str = 'none'
    grid: int = 2  # cells per side of the pooled grid ('pool' only)

    @property
    def is_reference(self) -> bool:
        """The reference's head exactly: a plain nn.Linear, whose state-dict keys are intermediate_heads.{k}.weight."""
        return self.kind == 'linear' and self.norm == 'none'


def adaptive_windows(size: int, cells: int) -> list[tuple[int, int]]:
    """[start, end) of each of `cells` windows over `size` positions, as torch's adaptive pooling cuts them:
    floor(i * size / cells) to ceil((i + 1) * size / cells)."""
    return [(i * size // cells, -(-(i + 1) * size // cells)) for i in range(cells)]


def _pool_axis(x: torch.Tensor, dim: int, cells: int, reduce) -> torch.Tensor:
    """Reduce axis `dim` of x to `cells` entries over its adaptive windows (static slices: plain Slice + Reduce in
    ONNX, whatever the size)."""
    return torch.stack([reduce(x.narrow(dim, start, end - start), dim=dim)
                        for start, end in adaptive_windows(x.shape[dim], cells)], dim=dim)


def grid_pool(maps: torch.Tensor, cells: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, 2 * C * cells * cells): the max over each cell of a cells x cells grid, then the average,
    each flattened channel-major. Equals adaptive_max_pool2d and adaptive_avg_pool2d; both reductions are
    separable, so rows are reduced first, then columns."""
    pooled = []
    for reduce in (torch.amax, torch.mean):
        rows = _pool_axis(maps, 2, cells, reduce)  # (B, C, cells, W)
        pooled.append(_pool_axis(rows, 3, cells, reduce).flatten(1))  # (B, C * cells * cells)
    return torch.cat(pooled, dim=1)


def head_input_width(config: ExitHeadConfig, channels: int) -> int:
    """Width of what the head reads, for an exit whose features have `channels` channels."""
    return 2 * channels * config.grid ** 2 if EXIT_HEADS[config.kind].pools_grid else channels


class ExitHead(nn.Module):
    """An exit head other than the reference's: [alpha * max + (1 - alpha) * average] -> [LayerNorm] -> Linear.
    Reads (B, width): with mixing, the max-pooled half then the average-pooled half; alpha starts at 0.5."""

    def __init__(self, width: int, num_classes: int, *, mixes: bool, norm: bool, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        features = width // 2 if mixes else width
        self.alpha = nn.Parameter(torch.full((1,), 0.5, **dd)) if mixes else None
        self.norm = nn.LayerNorm(features, **dd) if norm else nn.Identity()
        self.fc = nn.Linear(features, num_classes, **dd)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        if self.alpha is not None:
            peak, mean = pooled.unflatten(-1, (2, -1)).unbind(1)  # 2 x (B, C * cells * cells)
            pooled = self.alpha * peak + (1 - self.alpha) * mean
        return self.fc(self.norm(pooled))


def build_exit_head(config: ExitHeadConfig, width: int, num_classes: int, device=None, dtype=None) -> nn.Module:
    """The head of one exit reading (B, width) features; nn.Linear itself for the reference's head."""
    if num_classes <= 0:
        return nn.Identity()
    if config.is_reference:
        return nn.Linear(width, num_classes, device=device, dtype=dtype)
    return ExitHead(width, num_classes, mixes=EXIT_HEADS[config.kind].pools_grid, norm=config.norm == 'layernorm',
                    device=device, dtype=dtype)


def exit_head_classes(state_dict: dict) -> int | None:
    """The class count of a checkpoint's first exit head, whichever kind it is; None without exits."""
    for key in ('intermediate_heads.0.weight', 'intermediate_heads.0.fc.weight'):
        if key in state_dict:
            return state_dict[key].shape[0]
    return None
