"""Datasets and loaders built from `dataset_config.py`, with one-line errors for every data-folder mistake."""
import copy
import logging
import os
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from timm.data.auto_augment import LEVEL_TO_ARG, RandAugment
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, random_split
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

import dataset_config
from demo_data import ensure_demo_dataset
from errors import GFNetDynnError

logger = logging.getLogger(__name__)

DEMO_DATA_SET = 'DEMO'  # the one data set we can generate instead of asking for a folder
SKIP_HINT = 'fix or remove it, or pass --skip-bad-images'
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _dataset_entry(data_set: str) -> dict:
    """The DATASET_CONFIG entry for data_set, looked up now so tests and users can add entries."""
    config = dataset_config.DATASET_CONFIG
    if data_set not in config:
        raise GFNetDynnError(f'unknown --data-set {data_set!r}; choose one of {", ".join(sorted(config))} '
                             f'or add an entry to dataset_config.py')
    return config[data_set]


def resolve_data_path(data_set: str, data_path: str | None) -> Path:
    """The folder to read data_set from: --data-path, else the config default (DEMO is generated if missing)."""
    path = Path(data_path if data_path is not None else _dataset_entry(data_set)['default_data_path'])
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


def _open_rgb(path: str) -> Image.Image:
    """Fully decode path and convert it to RGB, so grey, RGBA and palette images all give 3 channels."""
    with Image.open(path) as img:
        img.load()
        return img.convert('RGB')


def load_rgb(path: str) -> Image.Image:
    """The dataset loader: an RGB image, or an error naming the file that failed to decode."""
    try:
        return _open_rgb(path)
    except DECODE_ERRORS as err:
        raise GFNetDynnError(f'cannot read image {path} ({err}); {SKIP_HINT}') from err


def _image_problem(path: str, full_decode: bool) -> str | None:
    """Why path is not a usable image, or None; checks the header only unless full_decode."""
    if not path.lower().endswith(IMG_EXTENSIONS):
        return f'{path} is not an image file (expected {", ".join(IMG_EXTENSIONS)})'
    try:
        if full_decode:
            _open_rgb(path)
        else:
            Image.open(path).close()
    except DECODE_ERRORS as err:
        return f'cannot read image {path} ({err})'
    return None


def _is_hidden(path: Path, root: Path) -> bool:
    """True for dot-files and anything under a dot-folder (.DS_Store, .complete, .ipynb_checkpoints)."""
    return any(part.startswith('.') for part in path.relative_to(root).parts)


class SceneFolder(ImageFolder):
    """ImageFolder that skips hidden entries, decodes to RGB and names the folder or file behind each error.

    Every non-hidden file must be a readable image: scanning opens each header (cheap), or with
    skip_bad_images fully decodes each file and drops the bad ones with a warning.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None, skip_bad_images: bool = False):
        self.skip_bad_images = skip_bad_images  # read by _check_file, which ImageFolder calls while scanning
        super().__init__(str(root), transform=transform, loader=load_rgb, is_valid_file=self._check_file,
                         allow_empty=True)
        empty = sorted(set(self.classes) - {self.classes[t] for t in self.targets})
        if empty:
            raise GFNetDynnError(f'no images in {", ".join(str(Path(root) / n) for n in empty)}; '
                                 f'add images or delete the empty class folder')

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """Class names are the non-hidden sub-folders of directory, sorted."""
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith('.'))
        if not classes:
            raise GFNetDynnError(f'no class folders in {directory}; it must hold one sub-folder per class')
        return classes, {name: i for i, name in enumerate(classes)}

    def _check_file(self, path: str) -> bool:
        """Keep readable images and ignore hidden files; a bad file raises, or with skip_bad_images is dropped."""
        if _is_hidden(Path(path), Path(self.root)):
            return False
        problem = _image_problem(path, full_decode=self.skip_bad_images)
        if problem is None:
            return True
        if not self.skip_bad_images:
            raise GFNetDynnError(f'{problem}; {SKIP_HINT}')
        logger.warning('skipping bad image: %s', problem)
        return False


def _check_class_count(data_set: str, folder: SceneFolder) -> None:
    """The folder must hold exactly the number of classes dataset_config.py promises."""
    expected = _dataset_entry(data_set)['num_classes']
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
    entry = _dataset_entry(data_set)
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
    logger.info('%s: %d training and %d validation images in %d classes from %s',
                data_set, len(train_set), len(val_set), len(classes), root)
    return train_set, val_set, classes


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
    # training workers start afresh each epoch, seeded from the generator seed_epoch resets: persistent ones
    # would carry their augmentation RNG (and, without a fresh seed draw, the shuffle) over from earlier
    # epochs, and --resume would not repeat an uninterrupted run
    train_loader = DataLoader(train_set, batch_size=batch_size, drop_last=True, **train_kw, **common)
    val_loader = DataLoader(val_set, batch_size=int(1.5 * batch_size), drop_last=False,
                            persistent_workers=num_workers > 0, **val_kw, **common)
    return train_loader, val_loader
