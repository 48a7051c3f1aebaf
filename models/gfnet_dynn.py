"""GFNet-Dynn: a GFNet with early-exit heads and gates after chosen blocks (JEI-DNN exits on a GFNet)."""
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import get_device_dtype
from timm.models import generate_default_cfgs, register_model

from errors import GFNetDynnError
from models.gates import GATES
from models.gfnet import VARIANTS, GFNet, _cfg, create_variant

DEFAULT_EXIT_POSITIONS = (3, 5, 7, 9)


class DynnOutput(NamedTuple):
    """Everything one forward pass computes; exits are ordered first to last, the final head last."""
    logits: torch.Tensor  # (E, B, C), E = G + 1; (G, B, C) when the final exit was not asked for
    gate_logits: torch.Tensor  # (G, B), one per intermediate exit


def validate_exit_positions(exit_positions: Sequence[int], depth: int) -> tuple[int, ...]:
    """Exits must be strictly increasing block indices before the last block (the final head sits there)."""
    positions = tuple(int(p) for p in exit_positions)
    if not positions:
        raise GFNetDynnError('--exit-positions is empty; give at least one block index, e.g. 3 5 7 9')
    if list(positions) != sorted(set(positions)):
        raise GFNetDynnError(f'--exit-positions {list(positions)} must be strictly increasing, e.g. 3 5 7 9')
    if positions[0] < 0 or positions[-1] >= depth - 1:
        raise GFNetDynnError(f'--exit-positions {list(positions)} must lie in 0..{depth - 2} for a model of '
                             f'depth {depth} (the final head already follows block {depth - 1})')
    return positions


class GFNetDynn(GFNet):
    """GFNet whose intermediate exits share the final LayerNorm; each exit has a linear head and a gate."""

    def __init__(self, exit_positions: Sequence[int] = DEFAULT_EXIT_POSITIONS, gate: str = 'unc', **kwargs):
        super().__init__(**kwargs)
        self.exit_positions = validate_exit_positions(exit_positions, len(self.blocks))
        self.gate_type = gate
        # Created after GFNet's own init, so exits and gates keep PyTorch's default Linear init, as in the
        # reference (which attaches them to a finished model).
        self.intermediate_heads = self._exit_heads(self.num_classes)
        # gates.py builds on the default device: moved to the model's (timm.create_model(device=...))
        self.gates = nn.ModuleList(GATES[gate]() for _ in self.exit_positions).to(**get_device_dtype(self))

    def _exit_heads(self, num_classes: int) -> nn.ModuleList:
        dd = get_device_dtype(self)
        return nn.ModuleList(nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
                             for _ in self.exit_positions).train(self.training)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """The final head and every exit head get the new class count."""
        super().reset_classifier(num_classes, global_pool)
        self.intermediate_heads = self._exit_heads(num_classes)

    @property
    def num_exits(self) -> int:
        """Intermediate exits plus the final head."""
        return len(self.exit_positions) + 1

    def segments(self) -> list[tuple[int, int]]:
        """Block ranges [start, end) that run before each exit; the last range ends at the final head."""
        ends = [p + 1 for p in self.exit_positions] + [len(self.blocks)]
        return list(zip([0] + ends[:-1], ends))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) block output -> (B, D): shared final norm, then mean over tokens."""
        return self.norm(tokens).mean(dim=1)

    def exit_output(self, k: int, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, C) and gate logit (B,) of exit k; the final exit (k = G) has no gate."""
        pooled = self.pool(tokens)
        if k == len(self.exit_positions):
            return self.head(pooled), None
        logits = self.intermediate_heads[k](pooled)
        return logits, self.gates[k](logits)

    def segment_tokens(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Segment k's blocks: images (k = 0) or the previous segment's tokens -> tokens (B, N, D) at exit k.
        The one walk over the segments: training, the early-exit engine, the FLOP count and the ONNX export
        all go through it, so they cannot disagree on where an exit sits."""
        tokens = self.embed(x) if k == 0 else x
        start, end = self.segments()[k]
        for block in self.blocks[start:end]:
            tokens = block(tokens)
        return tokens

    def forward_segment(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(tokens at exit k, exit k's logits, its gate logit or None at the final exit)."""
        tokens = self.segment_tokens(k, x)
        return (tokens, *self.exit_output(k, tokens))

    def forward_pooled(self, x: torch.Tensor, through_final: bool = True) -> torch.Tensor:
        """Images -> pooled features at every exit, (E, B, D); with through_final=False only up to the last
        intermediate exit, (G, B, D), skipping the blocks after it. The frozen-backbone stages run this without
        autograd and train only what follows."""
        pooled, tokens = [], x
        for k in range(self.num_exits if through_final else len(self.exit_positions)):
            tokens = self.segment_tokens(k, tokens)
            pooled.append(self.pool(tokens))
        return torch.stack(pooled)

    def heads_and_gates(self, pooled: torch.Tensor) -> DynnOutput:
        """Pooled features (E, B, D) -> exit logits (E, B, C) and gate logits (G, B); from (G, B, D), the
        intermediate exits' logits alone, (G, B, C)."""
        exit_logits = [head(features) for head, features in zip(self.intermediate_heads, pooled)]
        gate_logits = [gate(logits) for gate, logits in zip(self.gates, exit_logits)]
        if len(pooled) > len(self.intermediate_heads):
            exit_logits.append(self.head(pooled[-1]))
        return DynnOutput(torch.stack(exit_logits), torch.stack(gate_logits))

    def forward_exits(self, x: torch.Tensor, through_final: bool = True) -> DynnOutput:
        """Every exit's logits and every gate's logit. `forward` (inherited) is timm's contract: final logits
        (B, C), the plain GFNet path."""
        return self.heads_and_gates(self.forward_pooled(x, through_final))


default_cfgs = generate_default_cfgs({f'{name}_dynn.untrained': _cfg() for name in VARIANTS})


@register_model
def gfnet_ti_dynn(pretrained: bool = False, **kwargs) -> GFNetDynn:
    return create_variant(GFNetDynn, 'gfnet_ti_dynn', pretrained, **kwargs)


@register_model
def gfnet_xs_dynn(pretrained: bool = False, **kwargs) -> GFNetDynn:
    return create_variant(GFNetDynn, 'gfnet_xs_dynn', pretrained, **kwargs)


@register_model
def gfnet_s_dynn(pretrained: bool = False, **kwargs) -> GFNetDynn:
    return create_variant(GFNetDynn, 'gfnet_s_dynn', pretrained, **kwargs)


@register_model
def gfnet_b_dynn(pretrained: bool = False, **kwargs) -> GFNetDynn:
    return create_variant(GFNetDynn, 'gfnet_b_dynn', pretrained, **kwargs)
