"""The image transforms: training augmentation as configured, evaluation resize and centre crop.

Training augmentation settings come from, in order of precedence: the command line's flags, the data set
entry's 'train_augment', and the reference's recipe (timm's create_transform with RandAugment
rand-m9-mstd0.5-inc1, colour jitter 0.4, RandomResizedCrop scale 0.08-1, horizontal flips, bicubic).
"""
from typing import Callable

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import LEVEL_TO_ARG, RandAugment
from torchvision import transforms

from errors import GFNetDynnError

REFERENCE_AUGMENT = {'scale': (0.08, 1.0), 'ratio': (3 / 4, 4 / 3), 'hflip': 0.5, 'vflip': 0.0,
                     'aa': 'rand-m9-mstd0.5-inc1', 'color_jitter': 0.4, 'train_interpolation': 'bicubic',
                     'reprob': 0.0, 'no_aug': False}
INTERPOLATIONS = ('bicubic', 'bilinear', 'nearest', 'random')


def _pair(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
            and 0 < value[0] <= value[1])


def _probability(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1


def _aa_policy(value) -> bool:
    """'none', or a policy timm builds (rand-*, augmix-*, trivial, original, v0 ...): tried on a tiny pipeline."""
    if not isinstance(value, str) or not value:
        return False
    if value == 'none':
        return True
    try:
        create_transform(32, is_training=True, auto_augment=value)
    except Exception:  # timm asserts, or raises KeyError / ValueError, on a policy it cannot parse
        return False
    return True


# What each setting accepts, and how to say it
AUGMENT_CHECKS = {
    'scale': (lambda v: _pair(v) and v[1] <= 1, 'two fractions low <= high <= 1, e.g. [0.5, 1.0]'),
    'ratio': (_pair, 'two aspect ratios low <= high, e.g. [0.75, 1.33]'),
    'hflip': (_probability, 'a probability in [0, 1]'),
    'vflip': (_probability, 'a probability in [0, 1]'),
    'aa': (_aa_policy, "a timm auto-augment policy (e.g. 'rand-m9-mstd0.5-inc1', 'augmix-m5', 'trivial', 'v0') or "
                       "'none'"),
    'color_jitter': (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                     'a non-negative strength, 0 for none'),
    'train_interpolation': (lambda v: v in INTERPOLATIONS, f"one of {', '.join(INTERPOLATIONS)}"),
    'reprob': (_probability, 'a probability in [0, 1]'),
    'no_aug': (lambda v: isinstance(v, bool), 'True or False'),
}


def check_augment(settings: dict, where: str) -> dict:
    """Each key known and its value acceptable; `where` names the source in the error."""
    for key, value in settings.items():
        if key not in AUGMENT_CHECKS:
            raise GFNetDynnError(f"{where}: unknown augmentation setting {key!r}; the settings are "
                                 f"{', '.join(AUGMENT_CHECKS)}")
        ok, description = AUGMENT_CHECKS[key]
        if not ok(value):
            raise GFNetDynnError(f'{where}: {key} is {value!r}; it must be {description}')
    return settings


def resolve_augment(entry_settings: dict | None, flags: dict) -> dict:
    """The training augmentation: flags (those not None) over the entry's 'train_augment' over the reference's."""
    given = {key: value for key, value in flags.items() if value is not None}
    return {**REFERENCE_AUGMENT, **(entry_settings or {}), **check_augment(given, 'augmentation flags')}


def _posterize_bits_at_least_one(level: float, hparams: dict) -> tuple[int]:
    """timm's increasing-posterize level floored at 1 bit: timm 1.0.31 asks for 0 bits at magnitude 10,
    which Pillow 13 rejects with a ValueError that would kill a training run at random."""
    return max(1, LEVEL_TO_ARG['PosterizeIncreasing'](level, hparams)[0]),


def _make_posterize_safe(transform: transforms.Compose) -> transforms.Compose:
    """Patch the RandAugment posterize op of a timm training pipeline in place (see above)."""
    for step in transform.transforms:
        if isinstance(step, RandAugment):
            for op in step.ops:
                if op.name == 'PosterizeIncreasing':
                    op.level_fn = _posterize_bits_at_least_one
    return transform


def build_transform(is_train: bool, input_size: int, augment: dict | None = None) -> Callable:
    """Training: timm's pipeline with the `augment` settings (default: the reference's); evaluation: bicubic
    resize to 256/224 of the size, centre crop, ImageNet normalisation."""
    if is_train:
        a = {**REFERENCE_AUGMENT, **(augment or {})}
        return _make_posterize_safe(create_transform(
            input_size, is_training=True, no_aug=a['no_aug'], scale=tuple(a['scale']), ratio=tuple(a['ratio']),
            hflip=a['hflip'], vflip=a['vflip'], color_jitter=a['color_jitter'] or None,
            auto_augment=None if a['aa'] == 'none' else a['aa'], interpolation=a['train_interpolation'],
            re_prob=a['reprob'], re_mode='pixel'))  # DeiT's erase mode
    return transforms.Compose([
        transforms.Resize(int(256 / 224 * input_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])
