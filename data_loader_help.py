"""Datasets and loaders built from `dataset_config.py`, with one-line errors for every data-folder mistake."""
import copy
import logging
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import LEVEL_TO_ARG, RandAugment
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, random_split
from torchvision import transforms

import dataset_config
from demo_data import ensure_demo_dataset
from errors import GFNetDynnError
from scene_folder import SceneFolder, real_files

logger = logging.getLogger(__name__)

DEMO_DATA_SET = 'DEMO'  # the one data set we can generate instead of asking for a folder

# The keys of a dataset_config.py entry: (accepted types, what a value must satisfy, how to say it)
ENTRY_KEYS = {
    'num_classes': ((int,), lambda v: v >= 2, 'an int of at least 2'),
    'default_input_size': ((int,), lambda v: v > 0, 'a positive int (pixels)'),
    'train_folder': ((str,), lambda v: True, "a folder name under --data-path ('' for the data path itself)"),
    'val_folder': ((str,), lambda v: True, "a folder name under --data-path ('' for the data path itself)"),
    'use_random_split': ((bool,), lambda v: True, 'True or False'),
    'default_data_path': ((str, type(None)), lambda v: v is None or v != '', 'a path or None'),
}


def _check_entry(name: str, entry) -> dict:
    """An entry with every key present, of its type (True is not an int here) and in range."""
    if not isinstance(entry, dict):
        raise GFNetDynnError(f'dataset_config.py entry {name!r} is a {type(entry).__name__}, not a dict of '
                             f'{", ".join(ENTRY_KEYS)}')
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise GFNetDynnError(f'dataset_config.py entry {name!r} has unknown key {unknown[0]!r}; the keys are '
                             f'{", ".join(ENTRY_KEYS)}')
    for key, (types, ok, description) in ENTRY_KEYS.items():
        if key not in entry:
            raise GFNetDynnError(f'dataset_config.py entry {name!r} lacks {key!r}; add it: {description}')
        value = entry[key]
        right_type = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not right_type or not ok(value):
            raise GFNetDynnError(f'dataset_config.py entry {name!r}: {key} is {value!r}; it must be {description}')
    return entry


def dataset_entry(data_set: str) -> dict:
    """The DATASET_CONFIG entry for data_set, checked, looked up now so tests and users can add entries."""
    config = dataset_config.DATASET_CONFIG
    if data_set not in config:
        raise GFNetDynnError(f'unknown --data-set {data_set!r}; choose one of {", ".join(sorted(config))} '
                             f'or add an entry to dataset_config.py')
    return _check_entry(data_set, config[data_set])


def resolve_data_path(data_set: str, data_path: str | None) -> Path:
    """The folder to read data_set from: --data-path, else the config default (DEMO is generated if missing)."""
    path = Path(data_path if data_path is not None else dataset_entry(data_set)['default_data_path'])
    if data_set == DEMO_DATA_SET and (data_path is None or not path.exists()):
        ensure_demo_dataset(path)
    if not path.exists():
        raise GFNetDynnError(f'--data-path {path} does not exist; pass the folder that holds the {data_set} images')
    if not path.is_dir():
        raise GFNetDynnError(f'--data-path {path} is a file; pass the folder that holds the {data_set} images')
    return path


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


def build_transform(is_train: bool, input_size: int, reprob: float = 0.0) -> Callable:
    """Training: timm RandAugment pipeline; evaluation: bicubic resize to 256/224 of the size, centre crop."""
    if is_train:
        return _make_posterize_safe(create_transform(
            input_size, is_training=True, auto_augment='rand-m9-mstd0.5-inc1', color_jitter=0.4,
            interpolation='bicubic', re_prob=reprob, re_mode='pixel'))  # DeiT's erase mode
    return transforms.Compose([
        transforms.Resize(int(256 / 224 * input_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


def _check_class_count(data_set: str, folder: SceneFolder) -> None:
    """The folder must hold exactly the number of classes dataset_config.py promises."""
    expected = dataset_entry(data_set)['num_classes']
    if len(folder.classes) != expected:
        raise GFNetDynnError(f'dataset_config.py says {data_set} has {expected} classes but {folder.root} has '
                             f'{len(folder.classes)}; fix the folder or the entry')


def _scan(data_set: str, folder: Path, skip_bad_images: bool, layout_hint: str) -> SceneFolder:
    """Scan one class-per-sub-folder directory (no transform yet) and check its class count."""
    if not folder.is_dir():
        raise GFNetDynnError(f'no folder {folder}; pass the --data-path that holds {layout_hint}')
    scenes = SceneFolder(folder, skip_bad_images=skip_bad_images)
    _check_class_count(data_set, scenes)
    return scenes


def _with_transform(scenes: SceneFolder, transform: Callable) -> SceneFolder:
    """A view of the same file list with its own transform (a shallow copy: no rescan)."""
    view = copy.copy(scenes)
    view.transform = transform
    return view


def _random_split(scenes: SceneFolder, split_ratio: float, seed: int,
                  train_tf: Callable, val_tf: Callable) -> tuple[Subset, Subset]:
    """Split one folder by split_ratio with a seeded generator; each part gets its own transform."""
    n_train = round(split_ratio * len(scenes))  # counts, not fractions: 1 - 0.8 is 0.19999...
    train_idx, val_idx = random_split(range(len(scenes)), [n_train, len(scenes) - n_train],
                                      generator=torch.Generator().manual_seed(seed))
    if len(train_idx) == 0 or len(val_idx) == 0:
        raise GFNetDynnError(f'--split-ratio {split_ratio} leaves an empty part of the {len(scenes)} images in '
                             f'{scenes.root}; choose a ratio nearer 0.5 or add images')
    return (Subset(_with_transform(scenes, train_tf), list(train_idx)),
            Subset(_with_transform(scenes, val_tf), list(val_idx)))


def _check_same_classes(train: SceneFolder, val: SceneFolder) -> None:
    """Train and val must name the same classes, or label indices would silently disagree."""
    only_train, only_val = sorted(set(train.classes) - set(val.classes)), sorted(set(val.classes) - set(train.classes))
    if only_train or only_val:
        raise GFNetDynnError(f'class folders differ between {train.root} and {val.root} (only in train: '
                             f'{", ".join(only_train) or "-"}; only in val: {", ".join(only_val) or "-"}); '
                             f'make both hold the same class names')


def build_datasets(data_set: str, data_path: str | Path, input_size: int, *, split_ratio: float = 0.8,
                   seed: int = 0, reprob: float = 0.0,
                   skip_bad_images: bool = False) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, class_names) for data_set under data_path, split as its config entry says."""
    entry = dataset_entry(data_set)
    if not 0 < split_ratio < 1:
        raise GFNetDynnError(f'--split-ratio {split_ratio} must be between 0 and 1 (exclusive), e.g. 0.8')
    root = Path(data_path)
    train_tf, val_tf = build_transform(True, input_size, reprob), build_transform(False, input_size)
    if entry['use_random_split']:
        scenes = _scan(data_set, root / entry['train_folder'], skip_bad_images, 'one sub-folder per class')
        train_set, val_set = _random_split(scenes, split_ratio, seed, train_tf, val_tf)
        classes = scenes.classes
    else:
        hint = f"{entry['train_folder']}/ and {entry['val_folder']}/"
        train_scenes = _scan(data_set, root / entry['train_folder'], skip_bad_images, hint)
        val_scenes = _scan(data_set, root / entry['val_folder'], skip_bad_images, hint)
        _check_same_classes(train_scenes, val_scenes)
        train_set, val_set = _with_transform(train_scenes, train_tf), _with_transform(val_scenes, val_tf)
        classes = train_scenes.classes
        shared = len(real_files(train_scenes) & real_files(val_scenes))
        if shared:
            logger.warning('%d validation images are also training images (the same files, through links); '
                           'validation accuracy will be optimistic', shared)
    logger.info('%s: %d training and %d validation images in %d classes from %s',
                data_set, len(train_set), len(val_set), len(classes), root)
    return train_set, val_set, classes


class SeededAugmentation(Dataset):
    """A training set whose random augmentation of sample i in epoch e is drawn from a seed made of (seed, e, i)
    alone: the images a run trains on then do not depend on how many loader workers made them, so --resume
    with another --num_workers (or none) replays the run exactly. The caller's RNG state is left as it was."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 1_000_003 + index  # distinct per (seed, epoch, index)
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            torch.manual_seed(sample_seed % 2**63)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


class ShardSampler(Sampler):
    """Every rank's share of the validation set, each sample once (rank r takes r, r + W, ...). Unlike
    DistributedSampler it never pads with repeats, so metrics gathered over ranks count each image once."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int):
        self.indices = list(range(rank, len(dataset), world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(train_set: Dataset, val_set: Dataset, batch_size: int, num_workers: int, seed: int, *,
                  distributed: bool = False) -> tuple[DataLoader, DataLoader]:
    """Shuffled, seeded training loader (drop_last) and an ordered validation loader at 1.5x the batch."""
    train_set = SeededAugmentation(train_set, seed)
    if distributed:
        train_kw = {'sampler': DistributedSampler(train_set, shuffle=True, seed=seed, drop_last=True)}
        val_kw = {'sampler': ShardSampler(val_set, dist.get_rank(), dist.get_world_size())}
        per_rank = len(train_kw['sampler'])
    else:
        train_kw = {'shuffle': True, 'generator': torch.Generator().manual_seed(seed)}
        val_kw = {'shuffle': False}
        per_rank = len(train_set)
    if per_rank < batch_size:
        raise GFNetDynnError(f'the training set gives {per_rank} images per process, fewer than one batch of '
                             f'{batch_size}; pass a smaller --batch')
    common = {'num_workers': num_workers, 'pin_memory': torch.cuda.is_available()}
    # training workers start afresh each epoch: persistent ones would keep the dataset copy made before
    # set_epoch, so every epoch would repeat the first one's augmentation
    train_loader = DataLoader(train_set, batch_size=batch_size, drop_last=True, **train_kw, **common)
    val_loader = DataLoader(val_set, batch_size=int(1.5 * batch_size), drop_last=False,
                            persistent_workers=num_workers > 0, **val_kw, **common)
    return train_loader, val_loader
