"""Building the student, the early-exit model and the teacher from plain parameters (no argparse here)."""
from pathlib import Path

import timm
import torch.nn as nn
from timm.models import get_pretrained_cfg_value, load_state_dict

from errors import GFNetDynnError
from models.exit_heads import ExitHeadConfig
from models.gfnet import checkpoint_filter_fn
from models.timm_dynn import TimmDynn, has_exit_layout, supported_families
from models.weights import load_state, read_checkpoint

DEFAULT_ARCH = 'GFNet-xs-dynn'  # --arch when neither the flag nor a checkpoint says
DEFAULT_PATCH_SIZE = 16


def arch_choices() -> list[str]:
    """--arch spellings users already have in scripts (GFNet-xs-dynn), from timm's registry."""
    return sorted(f"GFNet-{name.split('_')[1]}-dynn" for name in timm.list_models('gfnet_*_dynn'))


def is_gfnet(arch: str) -> bool:
    return arch in arch_choices()


def check_arch(arch: str | None, job: str) -> None:
    """GFNet variants serve every job, and so do the timm families with an exit layout (`LAYOUTS` in
    models/timm_dynn.py); any other timm model trains in the backbone stage only."""
    if arch is None or is_gfnet(arch):
        return
    if arch not in timm.list_models():
        raise GFNetDynnError(f"--arch {arch} is neither a GFNet variant ({', '.join(arch_choices())}) nor a timm "
                             f'model name; see timm.list_models(), e.g. resnet50 or mobilenetv3_small_100')
    if job != 'backbone' and not has_exit_layout(arch):
        raise GFNetDynnError(f'--arch {arch}: early exits run on the GFNet variants and on '
                             f'{supported_families()}; other timm models train in --stage backbone only')


def dynn_model_name(arch: str) -> str:
    """'GFNet-xs-dynn' -> 'gfnet_xs_dynn' (timm's name)."""
    return arch.lower().replace('-', '_')


def backbone_model_name(arch: str) -> str:
    """'GFNet-xs-dynn' -> 'gfnet_xs': the plain GFNet the backbone stage trains."""
    return dynn_model_name(arch).removesuffix('_dynn')


def size_kwargs(name: str, input_size: int) -> dict:
    """What a timm model needs to run at `input_size`: models whose grid is fixed when built (ViTs) take it, the
    others (CNNs) run at any size."""
    return {'img_size': input_size} if get_pretrained_cfg_value(name, 'fixed_input_size') else {}


def build_backbone(arch: str, num_classes: int, input_size: int, patch_size: int | None, drop_path: float,
                   pretrained: str | None = None) -> nn.Module:
    """Stage 0's classifier: a plain GFNet (`arch` a GFNet-*-dynn spelling) or any timm model, with ImageNet
    weights from the local file `pretrained` if given (timm's loader; a head of another class count is dropped)."""
    if is_gfnet(arch):
        name = backbone_model_name(arch)
        kwargs = {'img_size': input_size, 'patch_size': patch_size, 'drop_path_rate': drop_path}
    else:
        name = arch
        kwargs = {**size_kwargs(name, input_size), **({'drop_path_rate': drop_path} if drop_path > 0 else {})}
    if pretrained is None:
        return timm.create_model(name, num_classes=num_classes, **kwargs)
    if not Path(pretrained).is_file():
        raise GFNetDynnError(f'--pretrained {pretrained} does not exist or is not a file; download the ImageNet '
                             f'weights of {arch} once (e.g. timm.create_model({name!r}, pretrained=True) and '
                             f'torch.save its state_dict()) and pass that file')
    try:
        model = timm.create_model(name, num_classes=num_classes, pretrained=True,
                                  pretrained_cfg_overlay={'file': str(pretrained)}, **kwargs)
        state = load_state_dict(str(pretrained))  # timm's own unwrapping, to see what the file held
    except Exception as error:  # torch and timm raise many types for a file that is not these weights
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise GFNetDynnError(f'--pretrained {pretrained} does not load into {arch} ({reason}); pass ImageNet '
                             f'weights of the same architecture') from error
    # timm loads non-strictly once it has dropped the head: every other weight must have come from the file
    if is_gfnet(arch):
        state = checkpoint_filter_fn(state, model)
    classifiers = model.pretrained_cfg.get('classifier') or ()
    heads = tuple(f'{c}.' for c in ((classifiers,) if isinstance(classifiers, str) else classifiers))
    missing = [key for key in model.state_dict() if key not in state and not key.startswith(heads)
               and not key.endswith('num_batches_tracked')]
    if missing:
        raise GFNetDynnError(f"--pretrained {pretrained} lacks {len(missing)} weights of {arch} "
                             f"({', '.join(missing[:3])}); pass ImageNet weights of the same architecture")
    return model


def build_dynn(arch: str, num_classes: int, input_size: int, patch_size: int | None, drop_path: float,
               exit_positions: list[int] | None, gate: str, exit_head: ExitHeadConfig = ExitHeadConfig()) -> nn.Module:
    """The early-exit model: a GFNet-Dynn variant, or a timm model wrapped with exits (patch_size unused).
    exit_positions None: the architecture's default."""
    check_arch(arch, 'dynn')  # a checkpoint of another timm model may name its arch here
    if not is_gfnet(arch):
        return TimmDynn(build_backbone(arch, num_classes, input_size, None, drop_path), exit_positions, gate,
                        input_size, exit_head)
    positions = {} if exit_positions is None else {'exit_positions': exit_positions}
    return timm.create_model(dynn_model_name(arch), num_classes=num_classes, img_size=input_size,
                             patch_size=patch_size, drop_path_rate=drop_path, gate=gate, exit_head=exit_head,
                             **positions)


def build_teacher(name: str, path: str | None, num_classes: int, input_size: int, patch_size: int) -> nn.Module:
    """A frozen teacher in eval mode: a GFNet variant (GFNet-b-dynn or gfnet_b) or any timm model name,
    with weights from `path` (no download is possible; the classifier must have num_classes outputs)."""
    gfnet_name = backbone_model_name(name) if name.startswith('GFNet-') else name
    if gfnet_name not in timm.list_models():
        raise GFNetDynnError(f"--teacher-model {name} is not a timm model or GFNet variant; try one of "
                             f"{', '.join(arch_choices())} or a timm name such as resnet50")
    kwargs = ({'img_size': input_size, 'patch_size': patch_size or DEFAULT_PATCH_SIZE}
              if gfnet_name.startswith('gfnet') else size_kwargs(gfnet_name, input_size))
    teacher = timm.create_model(gfnet_name, num_classes=num_classes, **kwargs)
    if path is None:
        raise GFNetDynnError('distillation needs the teacher\'s weights: pass --teacher-path (a checkpoint '
                             'trained on this dataset), or use --distillation-type none')
    report = load_state(teacher, read_checkpoint(path), source=f'--teacher-path {path}')
    if report.fresh:
        raise GFNetDynnError(f'--teacher-path {path} has no {num_classes}-class head for this dataset '
                             f'(missing {report.fresh[0]}); fine-tune the teacher on it first')
    for param in teacher.parameters():
        param.requires_grad_(False)
    return teacher.eval()
