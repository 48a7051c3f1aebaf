"""Datasets and loaders built from `dataset_config.py`: the entry checked, the layout found, the split made
or reused, the transforms applied; one-line errors for every data-folder mistake."""
import copy
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset

import dataset_config
from data_pipeline.data_splits import (calib_record, check_train_ratio, find_layout, read_split_file,
                                       reference_random_split, split_from_names, split_record, stratified_split)
from data_pipeline.data_transforms import build_transform, check_augment
from data_pipeline.demo_data import GENERATORS
from data_pipeline.scene_folder import BadImages, SceneFolder, real_files
from errors import GFNetDynnError

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_RATIO = 0.8  # a one-folder data set's training share when its entry names no protocol


def _ratios(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1 for v in value))


# The keys of a dataset_config.py entry: (accepted types, what a value must satisfy, how to say it, required)
ENTRY_KEYS = {
    'num_classes': ((int,), lambda v: v >= 2, 'an int of at least 2', True),
    'default_input_size': ((int,), lambda v: v > 0, 'a positive int (pixels)', True),
    'train_folder': ((str,), lambda v: True, "a folder name under --data-path ('' for none)", True),
    'val_folder': ((str,), lambda v: True, "a folder name under --data-path ('' for none)", True),
    'use_random_split': ((bool,), lambda v: True, 'True or False', True),
    'default_data_path': ((str, type(None)), lambda v: v is None or v != '', 'a path or None', True),
    'protocol_train_ratios': ((list, tuple), _ratios, 'a list of training shares in (0, 1), the first the default',
                              False),
    'train_augment': ((dict,), lambda v: True, 'a dict of augmentation settings', False),
}


def _check_entry(name: str, entry) -> dict:
    """An entry with every required key present, each key of its type (True is not an int here) and in range."""
    if not isinstance(entry, dict):
        raise GFNetDynnError(f'dataset_config.py entry {name!r} is a {type(entry).__name__}, not a dict of '
                             f'{", ".join(ENTRY_KEYS)}')
    unknown = sorted(set(entry) - set(ENTRY_KEYS))
    if unknown:
        raise GFNetDynnError(f'dataset_config.py entry {name!r} has unknown key {unknown[0]!r}; the keys are '
                             f'{", ".join(ENTRY_KEYS)}')
    for key, (types, ok, description, required) in ENTRY_KEYS.items():
        if key not in entry:
            if required:
                raise GFNetDynnError(f'dataset_config.py entry {name!r} lacks {key!r}; add it: {description}')
            continue
        value = entry[key]
        right_type = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if not right_type or not ok(value):
            raise GFNetDynnError(f'dataset_config.py entry {name!r}: {key} is {value!r}; it must be {description}')
    check_augment(entry.get('train_augment', {}), f'dataset_config.py entry {name!r}: train_augment')
    return entry


def dataset_entry(data_set: str) -> dict:
    """The DATASET_CONFIG entry for data_set, checked, looked up now so tests and users can add entries."""
    config = dataset_config.DATASET_CONFIG
    if data_set not in config:
        raise GFNetDynnError(f'unknown --data-set {data_set!r}; choose one of {", ".join(sorted(config))} '
                             f'or add an entry to dataset_config.py')
    return _check_entry(data_set, config[data_set])


def default_train_ratio(data_set: str) -> float:
    """The entry's first protocol training share, else 0.8."""
    return float(dataset_entry(data_set).get('protocol_train_ratios', [DEFAULT_TRAIN_RATIO])[0])


def resolve_data_path(data_set: str, data_path: str | None) -> Path:
    """The folder to read data_set from: --data-path, else the config default. A built-in data set (DEMO, DIGITS)
    is generated if missing, but only at its own default path: a mistyped --data-path must not fill a new folder
    with synthetic images."""
    default = dataset_entry(data_set)['default_data_path']
    path = Path(data_path if data_path is not None else default)
    generate = GENERATORS.get(data_set)
    if generate is not None and default is not None and path.resolve() == Path(default).resolve():
        generate(path)
    if not path.exists():
        built_in = (f' ({data_set} generates itself at {default} when --data-path is omitted)'
                    if generate is not None else '')
        raise GFNetDynnError(f'--data-path {path} does not exist; pass the folder that holds the {data_set} '
                             f'images{built_in}')
    if not path.is_dir():
        raise GFNetDynnError(f'--data-path {path} is a file; pass the folder that holds the {data_set} images')
    return path


def _check_class_count(data_set: str, folder: SceneFolder) -> None:
    """The folder must hold exactly the number of classes dataset_config.py promises."""
    expected = dataset_entry(data_set)['num_classes']
    if len(folder.classes) != expected:
        raise GFNetDynnError(f'dataset_config.py says {data_set} has {expected} classes but {folder.root} has '
                             f'{len(folder.classes)}; fix the folder or the entry')


def _scan(data_set: str, folder: Path, skip_bad_images: bool, check_images: bool = False) -> SceneFolder:
    """Scan one class-per-sub-folder directory (no transform yet) and check its class count."""
    scenes = SceneFolder(folder, skip_bad_images=skip_bad_images, check_images=check_images)
    _check_class_count(data_set, scenes)
    return scenes


def _with_transform(scenes: SceneFolder, transform) -> SceneFolder:
    """A view of the same file list with its own transform (a shallow copy: no rescan)."""
    view = copy.copy(scenes)
    view.transform = transform
    return view


def _check_same_classes(train: SceneFolder, val: SceneFolder) -> None:
    """Train and val must name the same classes, or label indices would silently disagree."""
    only_train, only_val = sorted(set(train.classes) - set(val.classes)), sorted(set(val.classes) - set(train.classes))
    if only_train or only_val:
        raise GFNetDynnError(f'class folders differ between {train.root} and {val.root} (only in train: '
                             f'{", ".join(only_train) or "-"}; only in val: {", ".join(only_val) or "-"}); '
                             f'make both hold the same class names')


@dataclass(frozen=True)
class SplitRequest:
    """How to split a one-folder layout (ignored for train/val folders), and the split a run recorded, which
    a later stage or --eval reproduces and checks."""
    train_ratio: float = DEFAULT_TRAIN_RATIO
    seed: int = 42
    file: str | None = None  # --split-file: a published split
    recorded: dict | None = None  # the 'split' a checkpoint's run args hold
    calib_ratio: float = 0.0  # --calib-ratio: the share of the training images held out to choose thresholds

    def __post_init__(self):
        check_train_ratio(self.train_ratio)
        if self.calib_ratio:
            check_train_ratio(self.calib_ratio, '--calib-ratio')

    @classmethod
    def reusing(cls, recorded: dict | None) -> 'SplitRequest':
        """The split a checkpoint's run recorded (its ratio, seed and calibration share), or the defaults."""
        recorded = recorded or {}
        kept = {key: recorded[key] for key in ('train_ratio', 'seed', 'calib_ratio') if recorded.get(key) is not None}
        return cls(**kept, recorded=recorded or None)  # a recorded seed of 0 stays 0, a missing one is the default


class DataSets(NamedTuple):
    train: Dataset | None  # None when only validation was asked for
    val: Dataset
    classes: list[str]
    split: dict  # data_splits.split_record: how the split was made, its hash, both file lists
    calib: Dataset | None = None  # the held-out calibration images (--calib-ratio), validation transform


def _hold_out_calibration(scenes: SceneFolder, pool: list[int], request: SplitRequest) -> tuple[list[int], list[int]]:
    """(training, calibration) indices: a stratified calib_ratio share of the training pool, drawn with the
    split's seed, so every stage and --eval hold out the same images."""
    if not request.calib_ratio:
        return pool, []
    targets = [scenes.targets[i] for i in pool]
    keep, held = stratified_split(targets, 1 - request.calib_ratio, request.seed, scenes.classes,
                                  f'holding out --calib-ratio {request.calib_ratio:g} of the training images')
    return [pool[i] for i in keep], [pool[i] for i in held]


def _one_folder_split(data_set: str, entry: dict, scenes: SceneFolder, relative: list[str],
                      request: SplitRequest) -> tuple[str, list[int], list[int]]:
    """(method, training indices, validation indices): a published split file, else the run's recorded split
    file, else the entry's method (the reference's random split, or stratified) with the ratio and seed."""
    recorded = request.recorded or {}
    recorded_file = recorded.get('file')
    if request.file:
        return 'file', *split_from_names(relative, *read_split_file(request.file), f'--split-file {request.file}',
                                         (scenes.targets, scenes.classes))
    if recorded_file and Path(recorded_file).is_file():
        train, val = split_from_names(relative, *read_split_file(recorded_file), f"the run's split {recorded_file}")
        return recorded.get('method', 'file'), train, val
    if entry['use_random_split']:
        return 'random', *reference_random_split(len(scenes), request.train_ratio, request.seed)
    return 'stratified', *stratified_split(scenes.targets, request.train_ratio, request.seed, scenes.classes)


def _check_recorded(record: dict, request: SplitRequest, root: Path) -> None:
    """A split recorded by the run must come out again: in a one-folder layout a different split would put
    training images into validation (an error); with train/ and val/ folders only the contents changed."""
    recorded = request.recorded
    if not recorded or not recorded.get('hash'):
        return
    key = 'hash' if record['num_train'] else 'val_hash'
    if record[key] == recorded.get(key):
        return
    if record['method'] == 'folders':
        logger.warning('the images under %s differ from those the run used (split %s, now %s)', root,
                       recorded.get(key), record[key])
        return
    raise GFNetDynnError(f"the images under {root} do not split as the run's did (split {recorded.get(key)}, now "
                         f"{record[key]}): validation could hold training images; pass the run's --data-path, or "
                         f'its split file with --split-file')


def build_datasets(data_set: str, data_path: str | Path, input_size: int, *, split: SplitRequest = SplitRequest(),
                   augment: dict | None = None, skip_bad_images: bool = False, need_train: bool = True,
                   check_images: bool = False) -> DataSets:
    """The training, validation and (with split.calib_ratio) calibration sets of data_set under data_path, split
    as the layout found and `split` say; with need_train=False no training set (a train/ folder need not exist
    unless calibration images are recorded). Every image is checked while scanning (check_images: fully decoded)."""
    entry = dataset_entry(data_set)
    root = Path(data_path)
    layout = find_layout(root, entry, need_train=need_train or bool(split.calib_ratio))
    if layout.kind == 'folders':
        train_scenes, val_scenes = _scan_folders(data_set, layout, skip_bad_images, check_images)
        method, pool = 'folders', list(range(len(train_scenes))) if train_scenes is not None else []
        val_idx, ratio, seed = None, None, None
    else:
        train_scenes = val_scenes = _scan(data_set, layout.train, skip_bad_images, check_images)
        method, pool, val_idx = _one_folder_split(data_set, entry, train_scenes, _relative(train_scenes.samples,
                                                                                            layout.train), split)
        if not pool or not val_idx:
            cause = {'file': f'--split-file {split.file} names none: add some to it',
                     'random': 'choose a --train-ratio nearer 0.5 or add images',
                     'stratified': 'choose a --train-ratio nearer 0.5 or add images'}.get(
                method, f"the run's split file {(split.recorded or {}).get('file')} names none")
            raise GFNetDynnError(f'the split leaves no {"training" if not pool else "validation"} images of the '
                                 f'{len(train_scenes)} in {layout.train}; {cause}')
        ratio = split.train_ratio if method != 'file' else None
        seed = split.seed if method in ('stratified', 'random') else None
    train_idx, calib_idx = _hold_out_calibration(train_scenes, pool, split) if pool else ([], [])
    train_rel = _relative(train_scenes.samples, layout.train) if train_scenes is not None else []
    val_rel = _relative(val_scenes.samples, layout.val or layout.train)
    record = split_record(data_set, method, ratio, seed, val_scenes.classes, [train_rel[i] for i in pool],
                          val_rel if val_idx is None else [val_rel[i] for i in val_idx])
    if split.calib_ratio:
        record.update(calib_record(split.calib_ratio, val_scenes.classes, [train_rel[i] for i in calib_idx]))
    _check_recorded(record, split, root)
    whole_pool = method == 'folders' and not calib_idx
    train_set = (_view(train_scenes, build_transform(True, input_size, augment), None if whole_pool else train_idx)
                 if need_train else None)
    val_tf = build_transform(False, input_size)
    val_set = _view(val_scenes, val_tf, val_idx)
    calib_set = _view(train_scenes, val_tf, calib_idx) if calib_idx else None
    logger.info('%s: %s training, %d validation%s images in %d classes from %s', data_set,
                len(train_set) if train_set is not None else 'no', len(val_set),
                f' and {len(calib_set)} calibration' if calib_set is not None else '', len(val_scenes.classes), root)
    return DataSets(train_set, val_set, val_scenes.classes, record, calib_set)


def _scan_folders(data_set: str, layout, skip_bad_images: bool,
                  check_images: bool = False) -> tuple[SceneFolder | None, SceneFolder]:
    """Scan a train/ + val/ layout (train/ may be absent for validation only): same classes in both, and a
    warning when the same files (through links) sit in both."""
    scenes, bad = [], []
    for folder in (layout.train, layout.val):
        try:
            scenes.append(SceneFolder(folder, skip_bad_images=skip_bad_images, check_images=check_images)
                          if folder else None)
        except BadImages as error:  # scan both folders first: every bad file named in one line
            bad += error.problems
    if bad:
        raise BadImages(bad, Path(os.path.commonpath([f for f in (layout.train, layout.val) if f])))
    train_scenes, val_scenes = scenes
    if train_scenes is not None:  # before the class count: a folder in one split only is named, not the count
        _check_same_classes(train_scenes, val_scenes)
        _check_class_count(data_set, train_scenes)
    _check_class_count(data_set, val_scenes)
    if train_scenes is not None:
        shared = len(real_files(train_scenes) & real_files(val_scenes))
        if shared:
            logger.warning('%d validation images are also training images (the same files, through links); '
                           'validation accuracy will be optimistic', shared)
    return train_scenes, val_scenes


def _view(scenes: SceneFolder, transform, indices: list[int] | None) -> Dataset:
    """The scanned images (all, or those at `indices`) with their own transform."""
    view = _with_transform(scenes, transform)
    return view if indices is None else Subset(view, indices)


def _relative(samples: list[tuple[str, int]], class_root: Path) -> list[str]:
    return [Path(path).relative_to(class_root).as_posix() for path, _ in samples]


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


def build_loaders(train_set: Dataset | None, val_set: Dataset, batch_size: int, num_workers: int, seed: int, *,
                  distributed: bool = False) -> tuple[DataLoader | None, DataLoader]:
    """Shuffled, seeded training loader (drop_last; None without a training set) and an ordered validation
    loader at 1.5x the batch."""
    common = {'num_workers': num_workers, 'pin_memory': torch.cuda.is_available()}
    val_kw = ({'sampler': ShardSampler(val_set, dist.get_rank(), dist.get_world_size())} if distributed
              else {'shuffle': False})
    val_loader = DataLoader(val_set, batch_size=int(1.5 * batch_size), drop_last=False,
                            persistent_workers=num_workers > 0, **val_kw, **common)
    if train_set is None:
        return None, val_loader
    train_set = SeededAugmentation(train_set, seed)
    if distributed:
        train_kw = {'sampler': DistributedSampler(train_set, shuffle=True, seed=seed, drop_last=True)}
        per_rank = len(train_kw['sampler'])
    else:
        train_kw = {'shuffle': True, 'generator': torch.Generator().manual_seed(seed)}
        per_rank = len(train_set)
    if per_rank < batch_size:
        raise GFNetDynnError(f'the training set gives {per_rank} images per process, fewer than one batch of '
                             f'{batch_size}; pass a smaller --batch')
    # training workers start afresh each epoch: persistent ones would keep the dataset copy made before
    # set_epoch, so every epoch would repeat the first one's augmentation
    train_loader = DataLoader(train_set, batch_size=batch_size, drop_last=True, **train_kw, **common)
    return train_loader, val_loader
