"""GFNet-Dynn: a GFNet with early-exit heads and gates after chosen blocks (JEI-DNN exits on a GFNet)."""
from typing import Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import get_device_dtype
from timm.models import generate_default_cfgs, register_model

from models.early_exit_net import DynnOutput, EarlyExitNetwork, validate_exit_positions  # noqa: F401 (re-exported)
from models.exit_heads import ExitHeadConfig, build_exit_head, head_input_width
from models.gates import GATES
from models.gfnet import VARIANTS, GFNet, _cfg, create_variant

DEFAULT_EXIT_POSITIONS = (3, 5, 7, 9)


class GFNetDynn(GFNet, EarlyExitNetwork):
    """GFNet whose intermediate exits share the final LayerNorm; each exit has a head (linear by default) and a
    gate. The segments are block ranges; everything an exit computes comes from EarlyExitNetwork."""

    def __init__(self, exit_positions: Sequence[int] = DEFAULT_EXIT_POSITIONS, gate: str = 'unc',
                 exit_head: ExitHeadConfig = ExitHeadConfig(), **kwargs):
        super().__init__(**kwargs)
        self.exit_positions = validate_exit_positions(exit_positions, len(self.blocks))
        self.gate_type = gate
        self.exit_head = exit_head
        # Created after GFNet's own init, so exits and gates keep PyTorch's default Linear init, as in the
        # reference (which attaches them to a finished model).
        self.intermediate_heads = self._exit_heads(self.num_classes)
        # gates.py builds on the default device: moved to the model's (timm.create_model(device=...))
        self.gates = nn.ModuleList(GATES[gate].module() for _ in self.exit_positions).to(**get_device_dtype(self))

    def _exit_heads(self, num_classes: int) -> nn.ModuleList:
        width = head_input_width(self.exit_head, self.embed_dim)
        return nn.ModuleList(build_exit_head(self.exit_head, width, num_classes, **get_device_dtype(self))
                             for _ in self.exit_positions).train(self.training)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """The final head and every exit head get the new class count."""
        super().reset_classifier(num_classes, global_pool)
        self.intermediate_heads = self._exit_heads(num_classes)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.patch_embed.img_size

    @property
    def final_head(self) -> nn.Module:
        return self.head

    def segments(self) -> list[tuple[int, int]]:
        """Block ranges [start, end) that run before each exit; the last range ends at the final head."""
        ends = [p + 1 for p in self.exit_positions] + [len(self.blocks)]
        return list(zip([0] + ends[:-1], ends))

    def pool_features(self, k: int, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) block output -> (B, D): shared final norm, then mean over tokens (every exit alike)."""
        return self.norm(tokens).mean(dim=1)

    def feature_grid(self, k: int, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, D) block output -> (B, D, a, b): shared final norm, tokens on their a x b grid."""
        return self.norm(tokens).unflatten(1, self.grid_size).permute(0, 3, 1, 2)

    def run_segment(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Segment k's blocks: images (k = 0) or the previous segment's tokens -> tokens (B, N, D) at exit k."""
        tokens = self.embed(x) if k == 0 else x
        start, end = self.segments()[k]
        for block in self.blocks[start:end]:
            tokens = block(tokens)
        return tokens


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
