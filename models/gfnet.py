"""GFNet (Rao et al., NeurIPS 2021): a ViT-style network whose token mixer is a learned global filter in
the 2-D Fourier domain. Attribute names reproduce the official checkpoints' state-dict keys."""
import logging
import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, get_device_dtype, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

_logger = logging.getLogger(__name__)


class GlobalFilter(nn.Module):
    """Depthwise circular convolution with a feature-map-sized kernel, computed as rfft2 * W -> irfft2."""

    def __init__(self, dim: int, grid_size: tuple[int, int], device=None, dtype=None):
        super().__init__()
        a, b = grid_size
        self.grid_size = (a, b)
        # Complex weight stored as (..., 2) real pairs, the official layout.
        self.complex_weight = nn.Parameter(torch.randn(a, b // 2 + 1, dim, 2, device=device, dtype=dtype) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        a, b = self.grid_size
        dtype = x.dtype
        x = x.view(B, a, b, D).float()  # FFTs in float32 whatever autocast says
        x = torch.fft.rfft2(x, dim=(1, 2), norm='ortho')  # (B, a, b//2+1, D) complex
        x = x * torch.view_as_complex(self.complex_weight.float())  # no complex bf16: filter in float32 too
        x = torch.fft.irfft2(x, s=(a, b), dim=(1, 2), norm='ortho')  # (B, a, b, D)
        return x.reshape(B, N, D).to(dtype)


class Block(nn.Module):
    """One residual around the whole block: x + DropPath(MLP(LN2(GlobalFilter(LN1(x)))))."""

    def __init__(self, dim: int, grid_size: tuple[int, int], mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        self.norm1 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.filter = GlobalFilter(dim, grid_size, **dd)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(self.mlp(self.norm2(self.filter(self.norm1(x)))))


class GFNet(nn.Module):
    """Patch embedding + position embedding, `depth` global-filter blocks, LayerNorm, mean pool, linear head."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 384, depth: int = 12, mlp_ratio: float = 4.0, drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, global_pool: str = 'avg', device=None, dtype=None):
        super().__init__()
        dd = {'device': device, 'dtype': dtype}
        assert global_pool in ('', 'avg'), f'global_pool {global_pool!r}: only mean pooling (avg) or none'
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.output_fmt = 'NHWC'  # forward_features: (B, H, W, D), like timm's Swin
        self.feature_dim = -1  # where timm's tests find num_features in forward_features' output
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim, **dd)
        self.grid_size = self.patch_embed.grid_size
        num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim, **dd))
        self.pos_drop = nn.Dropout(drop_rate)
        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # linear in depth
        self.blocks = nn.ModuleList(
            Block(embed_dim, self.grid_size, mlp_ratio, drop_rate, rate, **dd) for rate in drop_path_rates)
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=patch_size)
                             for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6, **dd)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {'pos_embed'}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        dd = get_device_dtype(self)  # the new head joins the model's device and dtype
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in ('', 'avg'), f'global_pool {global_pool!r}: only mean pooling (avg) or none'
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) -> position-embedded tokens (B, N, D)."""
        return self.pos_drop(self.patch_embed(x) + self.pos_embed)

    def forward_tokens(self, x: torch.Tensor, collect: Optional[List[int]] = None
                       ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Final normed tokens (B, N, D) and the raw outputs of the blocks listed in `collect`."""
        x = self.embed(x)
        collected = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if collect is not None and i in collect:
                collected.append(x)
        return self.norm(x), collected

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled final features (B, H, W, D) (timm contract; `forward_tokens` gives (B, N, D))."""
        x = self.forward_tokens(x)[0]
        return x.reshape(x.shape[0], self.grid_size[0], self.grid_size[1], x.shape[-1])

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, H, W, D) features or (B, N, D) tokens -> logits; mean over tokens unless global_pool=''."""
        if self.global_pool == 'avg':
            x = x.flatten(1, -2).mean(dim=1)  # (B, D)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm feature API (features_only=True): block outputs as (B, D, H, W) (or (B, N, D) for 'NLC'),
        optionally with the final features of forward_features."""
        assert output_fmt in ('NCHW', 'NLC'), 'Output format must be one of NCHW or NLC.'
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        x = self.embed(x)
        intermediates = []
        blocks = self.blocks if torch.jit.is_scripting() or not stop_early else self.blocks[:max_index + 1]
        for i, block in enumerate(blocks):
            x = block(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        if output_fmt == 'NCHW':
            a, b = self.grid_size
            intermediates = [y.reshape(B, a, b, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        x = self.norm(x)
        return x.reshape(B, self.grid_size[0], self.grid_size[1], -1), intermediates


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _resize_grid(tensor: torch.Tensor, size: tuple[int, int], align_corners: bool) -> torch.Tensor:
    """Bicubic resize of a (h, w, C) grid to (size[0], size[1], C)."""
    grid = tensor.permute(2, 0, 1).unsqueeze(0).float()  # (1, C, h, w)
    grid = F.interpolate(grid, size=size, mode='bicubic', align_corners=align_corners)
    return grid.squeeze(0).permute(1, 2, 0).to(tensor.dtype)


def _resize_pos_embed(pos_embed: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(1, N_old, D) on a square old grid -> (1, a*b, D) on the model's grid."""
    old_side = math.isqrt(pos_embed.shape[1])
    if old_side * old_side != pos_embed.shape[1]:
        raise ValueError(f'pos_embed with {pos_embed.shape[1]} tokens is not a square grid; cannot resize')
    grid = pos_embed.reshape(old_side, old_side, -1)
    # align_corners=False for positions, True for filters: what the official GFNet fine-tuning code does
    return _resize_grid(grid, grid_size, align_corners=False).reshape(1, grid_size[0] * grid_size[1], -1)


def _resize_complex_weight(weight: torch.Tensor, freq_size: tuple[int, int]) -> torch.Tensor:
    """(a, b//2+1, D, 2) -> the model's frequency grid, real and imaginary parts resized alike."""
    a, w, dim, _ = weight.shape
    flat = weight.reshape(a, w, dim * 2)
    return _resize_grid(flat, freq_size, align_corners=True).reshape(freq_size[0], freq_size[1], dim, 2)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict:
    """Adapt a GFNet checkpoint to `model`: unwrap 'model', strip 'module.', resize pos_embed and every
    complex_weight to the model's grid, and drop classifier heads whose class count differs."""
    if 'model' in state_dict and isinstance(state_dict['model'], dict):
        state_dict = state_dict['model']
    target = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        key = key[len('module.'):] if key.startswith('module.') else key
        if key not in target or not isinstance(value, torch.Tensor) or value.shape == target[key].shape:
            out[key] = value
        elif key == 'pos_embed':
            out[key] = _resize_pos_embed(value, model.grid_size)
        elif key.endswith('filter.complex_weight'):
            out[key] = _resize_complex_weight(value, tuple(target[key].shape[:2]))
        elif key.startswith(('head.', 'intermediate_heads.')) and value.shape[1:] == target[key].shape[1:]:
            _logger.info('skipping %s: checkpoint has %d classes, model has %d', key, value.shape[0],
                         target[key].shape[0])
        else:
            out[key] = value  # a real mismatch: the loader reports it with its name
    return out


def _cfg(**kwargs) -> dict:
    # fixed_input_size: the global filters are sized to the token grid; pool_size: that grid at 224 / 16
    return {'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (14, 14), 'fixed_input_size': True,
            'crop_pct': 0.875, 'interpolation': 'bicubic',
            'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225), 'first_conv': 'patch_embed.proj',
            'classifier': 'head', **kwargs}


# The four variants of the GFNet paper (patch 16, MLP ratio 4); the early-exit variants share the table.
VARIANTS = {
    'gfnet_ti': dict(embed_dim=256, depth=12, patch_size=16),
    'gfnet_xs': dict(embed_dim=384, depth=12, patch_size=16),
    'gfnet_s': dict(embed_dim=384, depth=19, patch_size=16),
    'gfnet_b': dict(embed_dim=512, depth=19, patch_size=16),
}

default_cfgs = generate_default_cfgs({f'{name}.untrained': _cfg() for name in VARIANTS})


def create_variant(model_class: type, variant: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """`variant` ('gfnet_xs', or 'gfnet_xs_dynn' for model_class GFNetDynn) from VARIANTS, kwargs overriding."""
    model_args = {**VARIANTS[variant.removesuffix('_dynn')], **kwargs}
    return build_model_with_cfg(model_class, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=3, feature_cls='getter'), **model_args)


@register_model
def gfnet_ti(pretrained: bool = False, **kwargs) -> GFNet:
    return create_variant(GFNet, 'gfnet_ti', pretrained, **kwargs)


@register_model
def gfnet_xs(pretrained: bool = False, **kwargs) -> GFNet:
    return create_variant(GFNet, 'gfnet_xs', pretrained, **kwargs)


@register_model
def gfnet_s(pretrained: bool = False, **kwargs) -> GFNet:
    return create_variant(GFNet, 'gfnet_s', pretrained, **kwargs)


@register_model
def gfnet_b(pretrained: bool = False, **kwargs) -> GFNet:
    return create_variant(GFNet, 'gfnet_b', pretrained, **kwargs)
