"""Early exits on a timm classifier: the backbone cut at the ends of its stages (CNNs) or after blocks (ViTs).

A family's `Layout` is its one entry in `LAYOUTS`, holding every fact about it: the timm modules and class that
build it, what its `forward_features` runs, in order (a stem, the stages or blocks that an exit may follow, a
tail), its default exits, and its pooling rule. `forward_head` finishes the final exit. Exit k reads the output of
stage k as its `Pooling` says (a global average over a (B, C, H, W) or (B, H, W, C) map; a ViT's tokens go through
the model's own final norm and pooling), then a head and a gate, as a GFNet-Dynn exit does. The final exit is the
backbone's own head.

State-dict keys: the timm model's own, under `backbone.`, plus `intermediate_heads.{k}` and `gates.{k}`. The
prefix keeps the backbone's names whole (a ViT's `head` cannot meet an exit's) and `checkpoint_filter_fn` adds it
to a stage-0 checkpoint of the same architecture.
"""
import logging
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from timm.layers import get_device_dtype, resample_abs_pos_embed, to_2tuple
from timm.models import model_entrypoint
from timm.models.convnext import ConvNeXt
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from timm.models.resnet import ResNet
from timm.models.vision_transformer import VisionTransformer

from errors import GFNetDynnError
from models.early_exit_net import EarlyExitNetwork, validate_exit_positions
from models.exit_heads import ExitHeadConfig, build_exit_head
from models.gates import GATES

_logger = logging.getLogger(__name__)

Step = Callable[[torch.Tensor], torch.Tensor]


def _all_but_last(num_stages: int) -> tuple[int, ...]:
    return tuple(range(num_stages - 1))


def _from_third_stage(num_stages: int) -> tuple[int, ...]:
    # the first two stages of a mobile net have 16-24 channels at full resolution: too little to classify from
    return tuple(range(min(2, num_stages - 2), num_stages - 1))


def _every_second_block(depth: int) -> tuple[int, ...]:
    # GFNet-Dynn's 3 5 7 9 for 12 blocks: every second block from a quarter of the depth to two before the end
    return tuple(range(depth // 4, depth - 2, 2)) or (0,)


@dataclass(frozen=True)
class Pooling:
    """How an intermediate exit reads a family's features: pooled over all positions (the linear head) and laid
    out as a (B, C, H, W) map (the pool head). Both take (backbone, features)."""
    carried: str  # what travels between segments, as the exported graphs name it
    pooled: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # -> (B, D)
    grid: Callable[[nn.Module, torch.Tensor], torch.Tensor]  # -> (B, C, H, W)


def _token_grid(vit: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """A ViT's patch tokens after its final norm, on their grid (class and register tokens left out)."""
    patches = vit.norm(tokens)[:, vit.num_prefix_tokens:]  # (B, N, D)
    return patches.unflatten(1, vit.patch_embed.grid_size).permute(0, 3, 1, 2)


# (B, C, H, W) maps: a global average, the map as it is
CHANNELS_FIRST_MAP = Pooling('feature_maps', lambda _, x: x.mean(dim=(2, 3)), lambda _, x: x)
# (B, H, W, C) maps (MambaOut, Swin): the same over the other axes
CHANNELS_LAST_MAP = Pooling('feature_maps', lambda _, x: x.mean(dim=(1, 2)), lambda _, x: x.permute(0, 3, 1, 2))
# (B, N, D) tokens: the model's own final norm and pooling
TOKENS = Pooling('tokens', lambda vit, x: vit.forward_head(vit.norm(x), pre_logits=True), _token_grid)


@dataclass(frozen=True, kw_only=True)
class Layout:
    """Every fact about one timm family with exits: how its forward_features runs (stem, stages or blocks, tail),
    where exits sit by default, how an exit pools its features, and what users are told about it."""
    name: str  # as the supported-families message names it
    example: str  # a timm model name of the family
    model_class: type[nn.Module]
    modules: tuple[str, ...]  # the timm modules whose model names build this class
    unit: str  # what --exit-positions indexes: 'stage' or 'block'
    parts: Callable[[nn.Module], tuple[list[Step], list[nn.Module], list[Step]]]  # model -> (stem, stages, tail)
    default_exits: Callable[[int], tuple[int, ...]]  # number of stages -> exit positions
    pooling: Pooling

    def __post_init__(self):
        if not isinstance(self.pooling, Pooling):
            raise TypeError(f'layout {self.name}: pooling must be a Pooling (CHANNELS_FIRST_MAP, CHANNELS_LAST_MAP '
                            f'or TOKENS), not {self.pooling!r}')


LAYOUTS = (
    Layout(name='ResNet', example='resnet18', model_class=ResNet, modules=('resnet',), unit='stage',
           parts=lambda m: ([m.conv1, m.bn1, m.act1, m.maxpool], [m.layer1, m.layer2, m.layer3, m.layer4], []),
           default_exits=_all_but_last, pooling=CHANNELS_FIRST_MAP),
    Layout(name='EfficientNet', example='efficientnet_b0', model_class=EfficientNet, modules=('efficientnet',),
           unit='stage', parts=lambda m: ([m.conv_stem, m.bn1], list(m.blocks), [m.conv_head, m.bn2]),
           default_exits=_from_third_stage, pooling=CHANNELS_FIRST_MAP),
    Layout(name='MobileNetV3', example='mobilenetv3_large_100', model_class=MobileNetV3, modules=('mobilenetv3',),
           unit='stage', parts=lambda m: ([m.conv_stem, m.bn1], list(m.blocks), []),
           default_exits=_from_third_stage, pooling=CHANNELS_FIRST_MAP),
    Layout(name='ConvNeXt', example='convnext_atto', model_class=ConvNeXt, modules=('convnext',), unit='stage',
           parts=lambda m: ([m.stem], list(m.stages), [m.norm_pre]), default_exits=_all_but_last,
           pooling=CHANNELS_FIRST_MAP),
    # deit.py builds VisionTransformers too; its distilled variants are refused when built (their class has none)
    Layout(name='ViT/DeiT', example='deit_tiny_patch16_224', model_class=VisionTransformer,
           modules=('vision_transformer', 'deit'), unit='block',
           parts=lambda m: ([m.patch_embed, m._pos_embed, m.patch_drop, m.norm_pre], list(m.blocks), [m.norm]),
           default_exits=_every_second_block, pooling=TOKENS),
)


def layout_of(model_class: type) -> Layout | None:
    """The layout declared for exactly this class, or None."""
    return next((layout for layout in LAYOUTS if layout.model_class is model_class), None)


def supported_families() -> str:
    """The families with a layout, as error messages name them."""
    names, examples = [layout.name for layout in LAYOUTS], [layout.example for layout in LAYOUTS]
    listed = f"{', '.join(names[:-1])} and {names[-1]}" if len(names) > 1 else names[0]
    return f"{listed} models (e.g. {', '.join(examples)})"


def layout_for_name(name: str) -> Layout | None:
    """The layout of timm model `name`'s family, or None (cheap: nothing is built)."""
    module = model_entrypoint(name).__module__.rsplit('.', 1)[-1]
    return next((layout for layout in LAYOUTS if module in layout.modules), None)


def has_exit_layout(name: str) -> bool:
    """Whether timm model `name` comes from a family with a layout."""
    return layout_for_name(name) is not None


class TimmDynn(EarlyExitNetwork):
    """A timm classifier with exits after chosen stages (CNNs) or blocks (ViTs); `forward` is the backbone's."""

    def __init__(self, backbone: nn.Module, exit_positions: Sequence[int] | None = None, gate: str = 'unc',
                 img_size: int | tuple[int, int] = 224, exit_head: ExitHeadConfig = ExitHeadConfig()):
        super().__init__()
        layout = layout_of(type(backbone))
        if layout is None:
            raise GFNetDynnError(f'a {type(backbone).__name__} has no early-exit layout; exits run on '
                                 f'{supported_families()}')
        self.backbone = backbone
        self.layout = layout
        self.carried = layout.pooling.carried
        depth = len(self._parts()[1])
        default = layout.default_exits(depth)
        self.exit_positions = validate_exit_positions(default if exit_positions is None else exit_positions, depth,
                                                      layout.unit, ' '.join(map(str, default)))
        self.gate_type = gate
        self.exit_head = exit_head
        self._input_size = to_2tuple(img_size)
        dd = get_device_dtype(backbone)
        self.intermediate_heads = nn.ModuleList(build_exit_head(exit_head, width, backbone.num_classes, **dd)
                                                for width in self._exit_widths())
        self.gates = nn.ModuleList(GATES[gate].module() for _ in self.exit_positions).to(**dd)
        self.train(backbone.training)

    @property
    def input_size(self) -> tuple[int, int]:
        return self._input_size

    @property
    def final_head(self) -> nn.Module:
        return self.backbone.get_classifier()

    @property
    def num_classes(self) -> int:
        return self.backbone.num_classes

    @property
    def classifier_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the final classifier: a checkpoint of another class count starts it fresh."""
        names = self.backbone.pretrained_cfg.get('classifier') or ()
        return tuple(f'backbone.{name}.' for name in ((names,) if isinstance(names, str) else names))

    def _parts(self) -> tuple[list[Step], list[nn.Module], list[Step]]:
        return self.layout.parts(self.backbone)

    @torch.no_grad()
    def _exit_widths(self) -> list[int]:
        """Width of what each intermediate exit's head reads, from one image through the eval-mode backbone."""
        was_training = self.backbone.training
        self.backbone.eval()
        param = next(self.backbone.parameters())
        features = torch.zeros(1, 3, *self.input_size, device=param.device, dtype=param.dtype)
        widths = []
        for k in range(len(self.exit_positions)):
            features = self.run_segment(k, features)
            widths.append(self.head_input(k, features).shape[-1])
        self.backbone.train(was_training)
        return widths

    def segments(self) -> list[tuple[int, int]]:
        """Stage (or block) ranges [start, end) that run before each exit; the last ends at the final head."""
        ends = [p + 1 for p in self.exit_positions] + [len(self._parts()[1])]
        return list(zip([0] + ends[:-1], ends))

    def run_segment(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """The stem first (k = 0), then the stages up to exit k, then the tail at the final exit."""
        stem, stages, tail = self._parts()
        start, end = self.segments()[k]
        steps = (stem if k == 0 else []) + stages[start:end] + (tail if k == len(self.exit_positions) else [])
        for step in steps:
            x = step(x)
        return x

    def pool_features(self, k: int, features: torch.Tensor) -> torch.Tensor:
        """(B, D_k): the backbone's own pooling at the final exit; before it, the layout's pooling rule."""
        if k == len(self.exit_positions):
            return self.backbone.forward_head(features, pre_logits=True)
        return self.layout.pooling.pooled(self.backbone, features)

    def feature_grid(self, k: int, features: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W): exit k's features laid out as a map by the layout's pooling rule."""
        return self.layout.pooling.grid(self.backbone, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's contract: the final head's logits (B, C)."""
        return self.backbone(x)


OWN_PREFIXES = ('backbone.', 'intermediate_heads.', 'gates.')


def _resampled_pos_embed(pos_embed: torch.Tensor, vit: VisionTransformer) -> torch.Tensor:
    """A ViT's position embedding trained on another grid, interpolated to this model's patch grid (timm's
    resampling; class and register tokens' entries kept), so a ViT run evaluates at another --input-size."""
    prefix = 0 if getattr(vit, 'no_embed_class', False) else vit.num_prefix_tokens
    _logger.info('resampling pos_embed from %d to %d positions', pos_embed.shape[1], vit.pos_embed.shape[1])
    return resample_abs_pos_embed(pos_embed, new_size=list(vit.patch_embed.grid_size), num_prefix_tokens=prefix)


def checkpoint_filter_fn(state_dict: dict, model: TimmDynn) -> dict:
    """Adapt a checkpoint to `model`: unwrap 'model', strip 'module.', put a plain timm model's keys (a stage-0
    checkpoint) under 'backbone.', resample a ViT's position embedding to this model's grid, and drop classifier
    heads, final or exit, whose class count differs."""
    if 'model' in state_dict and isinstance(state_dict['model'], dict):
        state_dict = state_dict['model']
    target = model.state_dict()
    heads = ('intermediate_heads.', *model.classifier_prefixes)
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix('module.')
        key = key if key.startswith(OWN_PREFIXES) else f'backbone.{key}'
        if key == 'backbone.pos_embed' and key in target and value.shape != target[key].shape:
            value = _resampled_pos_embed(value, model.backbone)
        elif (key in target and key.startswith(heads) and isinstance(value, torch.Tensor)
                and value.shape != target[key].shape and value.shape[1:] == target[key].shape[1:]):
            _logger.info('skipping %s: checkpoint has %d classes, model has %d', key, value.shape[0],
                         target[key].shape[0])
            continue
        out[key] = value  # a real mismatch stays: the loader reports it with its name
    return out
