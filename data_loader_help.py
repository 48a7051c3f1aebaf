"""The data front door: a `dataset_config.py` entry checked, the folder it is read from, its data sets (the pass
in `data_pipeline.data_pass`: layout, scan, split, calibration hold-out, transforms) and their loaders; one-line
errors for every data-folder mistake."""
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

import dataset_config
from data_pipeline.data_pass import DEFAULT_TRAIN_RATIO, DataRequest, DataSets, SplitRequest, make_data_sets
from data_pipeline.data_transforms import build_transform, check_augment
from data_pipeline.demo_data import GENERATORS
from errors import GFNetDynnError

# the front door's names; DataSets, SplitRequest and build_transform are handed on from data_pipeline/
__all__ = ['DataSets', 'SplitRequest', 'ShardSampler', 'SeededAugmentation', 'build_datasets', 'build_loaders',
           'build_transform', 'dataset_entry', 'default_train_ratio', 'resolve_data_path']


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


def build_datasets(data_set: str, data_path: str | Path, input_size: int, *, split: SplitRequest = SplitRequest(),
                   augment: dict | None = None, skip_bad_images: bool = False, need_train: bool = True,
                   check_images: bool = False) -> DataSets:
    """The training, validation and (with split.calib_ratio) calibration sets of data_set under data_path: its entry
    checked, then the one data pass (data_pipeline.data_pass.DataRequest says what each argument asks)."""
    return make_data_sets(DataRequest(data_set, dataset_entry(data_set), Path(data_path), input_size, split=split,
                                      augment=augment, skip_bad_images=skip_bad_images, check_images=check_images,
                                      need_train=need_train))


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
