"""The segment abstraction every early-exit network here shares (GFNet-Dynn, and exits on any timm backbone).

A backbone is cut into segments, one per exit. Intermediate exit k pools what segment k computed, reads it with a
head (models/exit_heads.py) and a gate; the last segment ends at the backbone's own head. Training, the
early-exit engine, the exit cache, the FLOP counter and the ONNX export all walk the segments through
`forward_segment`, so they cannot disagree on where an exit sits. A backbone supplies how segment k runs
(`run_segment`), how its output is pooled over all positions (`pool_features`) or laid out as a feature map
(`feature_grid`), its final classifier (`final_head`) and the image size it is built for (`input_size`).
"""
from abc import ABCMeta, abstractmethod
from typing import NamedTuple, Sequence

import torch
import torch.nn as nn

from errors import GFNetDynnError
from models.exit_heads import EXIT_HEADS, ExitHeadConfig, grid_pool


class DynnOutput(NamedTuple):
    """Everything one forward pass computes; exits are ordered first to last, the final head last."""
    logits: torch.Tensor  # (E, B, C), E = G + 1; (G, B, C) when the final exit was not asked for
    gate_logits: torch.Tensor  # (G, B), one per intermediate exit


def validate_exit_positions(exit_positions: Sequence[int], depth: int, unit: str = 'block',
                            example: str = '3 5 7 9') -> tuple[int, ...]:
    """Exits must be strictly increasing indices of the model's blocks (or stages) before the last one, which the
    final head already follows."""
    positions = tuple(int(p) for p in exit_positions)
    if not positions:
        raise GFNetDynnError(f'--exit-positions is empty; give at least one {unit} index, e.g. {example}')
    if list(positions) != sorted(set(positions)):
        raise GFNetDynnError(f'--exit-positions {list(positions)} must be strictly increasing, e.g. {example}')
    if positions[0] < 0 or positions[-1] >= depth - 1:
        size = f'depth {depth}' if unit == 'block' else f'{depth} {unit}s'
        raise GFNetDynnError(f'--exit-positions {list(positions)} must lie in 0..{depth - 2} for a model of '
                             f'{size} (the final head already follows {unit} {depth - 1})')
    return positions


class EarlyExitNetwork(nn.Module, metaclass=ABCMeta):
    """A classifier cut into segments at its exits. Subclasses set `exit_positions`, `gate_type`,
    `exit_head`, `intermediate_heads` (one head per intermediate exit, models/exit_heads.py) and `gates`
    (models/gates.py), and supply the abstract pieces; everything an exit computes is defined once, here."""

    exit_positions: tuple[int, ...]
    gate_type: str
    exit_head: ExitHeadConfig = ExitHeadConfig()
    intermediate_heads: nn.ModuleList
    gates: nn.ModuleList
    carried: str = 'tokens'  # what travels between segments, as the exported graphs name it
    # TorchScript compiles properties; these return a module or a tuple and serve the Python side only
    __jit_unused_properties__ = ['input_size', 'final_head']

    @property
    @abstractmethod
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the images the model is built for: the FLOP count and the export feed these."""

    @property
    @abstractmethod
    def final_head(self) -> nn.Module:
        """The backbone's own classifier: the last segment's pooled features -> logits."""

    @abstractmethod
    def run_segment(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Segment k: images (k = 0) or segment k-1's output -> the features at exit k (tokens or feature maps)."""

    @abstractmethod
    def pool_features(self, k: int, features: torch.Tensor) -> torch.Tensor:
        """Segment k's output -> (B, D_k) pooled over all positions: what the reference's linear head reads."""

    @abstractmethod
    def feature_grid(self, k: int, features: torch.Tensor) -> torch.Tensor:
        """Intermediate segment k's output laid out as a map (B, C, H, W), normed as `pool_features` norms it:
        what a head that keeps the layout pools."""

    def head_input(self, k: int, features: torch.Tensor) -> torch.Tensor:
        """What exit k's head reads (B, D_k): the features pooled over all positions (the final exit, and the
        reference's head), or the feature map pooled to the head's grid by max and by average."""
        if k == len(self.exit_positions) or not EXIT_HEADS[self.exit_head.kind].pools_grid:
            return self.pool_features(k, features)
        return grid_pool(self.feature_grid(k, features), self.exit_head.grid)

    @property
    def num_exits(self) -> int:
        """Intermediate exits plus the final head."""
        return len(self.exit_positions) + 1

    def exit_output(self, k: int, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, C) and gate logit (B,) of exit k; the final exit (k = G) has no gate."""
        pooled = self.head_input(k, features)
        if k == len(self.exit_positions):
            return self.final_head(pooled), None
        logits = self.intermediate_heads[k](pooled)
        return logits, self.gates[k](logits)

    def forward_segment(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(features at exit k, exit k's logits, its gate logit or None at the final exit)."""
        features = self.run_segment(k, x)
        return (features, *self.exit_output(k, features))

    def forward_pooled(self, x: torch.Tensor, through_final: bool = True) -> torch.Tensor | list[torch.Tensor]:
        """Images -> what every exit's head reads: (E, B, D) when every exit has the same width, else a list of
        (B, D_k); with through_final=False only up to the last intermediate exit, skipping what follows it. The
        frozen-backbone stages run this without autograd and train only what follows."""
        pooled, features = [], x
        for k in range(self.num_exits if through_final else len(self.exit_positions)):
            features = self.run_segment(k, features)
            pooled.append(self.head_input(k, features))
        return torch.stack(pooled) if len({p.shape for p in pooled}) == 1 else pooled

    def heads_and_gates(self, pooled: torch.Tensor | Sequence[torch.Tensor]) -> DynnOutput:
        """Pooled features (E of (B, D_k)) -> exit logits (E, B, C) and gate logits (G, B); from G of them, the
        intermediate exits' logits alone, (G, B, C)."""
        exit_logits = [head(features) for head, features in zip(self.intermediate_heads, pooled)]
        gate_logits = [gate(logits) for gate, logits in zip(self.gates, exit_logits)]
        if len(pooled) > len(self.intermediate_heads):
            exit_logits.append(self.final_head(pooled[-1]))
        return DynnOutput(torch.stack(exit_logits), torch.stack(gate_logits))

    def forward_exits(self, x: torch.Tensor, through_final: bool = True) -> DynnOutput:
        """Every exit's logits and every gate's logit. `forward` stays timm's contract: final logits (B, C)."""
        return self.heads_and_gates(self.forward_pooled(x, through_final))
