"""Where a data set's images are and how they split into training and validation, recorded so that every stage
of a run, and --eval, reads the same split.

Layouts found under --data-path: train/ + val/ folders (as the entry names them); or one folder of class
folders, either --data-path itself or the folder a download leaves (UCMerced_LandUse/Images,
NWPU-RESISC45, PatternNet/images, or a chain of single sub-folders). A one-folder layout is split per class
(stratified) by the training ratio with a seeded generator, or at random over all images as the reference
splits NaSC (the entry's use_random_split), or by a published split file. A split is identified by the hash
of its file lists, relative to the class folder, so it survives moving the data set.
"""
import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from errors import GFNetDynnError

logger = logging.getLogger(__name__)

SPLIT_FORMAT = 'gfnet-dynn-split/1'
DOWNLOAD_FOLDERS = (Path('UCMerced_LandUse') / 'Images', Path('NWPU-RESISC45'), Path('PatternNet') / 'images')


@dataclass
class Layout:
    """Where the images are: `folders` (train/ and val/ class folders) or `one folder` of class folders."""
    kind: str  # 'folders' or 'one folder'
    train: Path | None  # the class root of the training images (all images for 'one folder'; None: val only)
    val: Path | None = None  # the class root of the validation images ('folders' only)

    def describe(self, root: Path) -> str:
        if self.kind == 'folders':
            return f'train/val folders {self.train} and {self.val}'
        where = 'the data path itself' if self.train == root else str(self.train.relative_to(root))
        return f'one folder of class folders ({where}), split as configured'


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith('.'))


def _holds_class_folders(folder: Path) -> bool:
    """Some sub-folder holds files directly (a class folder), not only more folders."""
    return any(any(f.is_file() for f in sub.iterdir()) for sub in _class_folders(folder))


def find_layout(root: Path, entry: dict, need_train: bool = True) -> Layout:
    """The layout under `root` for a dataset_config.py entry; one log line says which was found. Without
    need_train (--eval) a val/ folder alone is enough."""
    train, val = root / entry['train_folder'], root / entry['val_folder']
    named = entry['train_folder'] and entry['val_folder'] and val.is_dir()
    if named and train.is_dir():
        layout = Layout('folders', train, val)
    elif named and not need_train:
        layout = Layout('folders', None, val)
    elif entry['train_folder'] and entry['val_folder'] and (train.is_dir() or val.is_dir()):
        missing = val if train.is_dir() else train
        raise GFNetDynnError(f"no folder {missing}; pass the --data-path that holds {entry['train_folder']}/ and "
                             f"{entry['val_folder']}/, or one folder of class folders")
    else:
        candidates = [root, *(root / known for known in DOWNLOAD_FOLDERS)]
        folder = root
        while len(_class_folders(folder)) == 1 and not _holds_class_folders(folder):
            folder = _class_folders(folder)[0]  # a download's wrapper folders: descend
        candidates.append(folder)
        found = next((c for c in candidates if c.is_dir() and _holds_class_folders(c)), None)
        if found is None:
            raise GFNetDynnError(f'no class folders under {root}: pass the folder that holds one sub-folder per '
                                 f"class, or {entry['train_folder'] or 'train'}/ and {entry['val_folder'] or 'val'}/")
        layout = Layout('one folder', found)
    logger.info('data layout: %s', layout.describe(root))
    return layout


def split_hash(classes: list[str], train: list[str], val: list[str]) -> str:
    """A short fingerprint of a split: its classes and both file lists (relative paths), order-free."""
    text = json.dumps([classes, sorted(train), sorted(val)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def stratified_split(targets: list[int], train_ratio: float, seed: int, class_names: list[str] | None = None,
                     purpose: str = 'a split') -> tuple[list[int], list[int]]:
    """Per class, round(ratio x count) images train (at least one, and at least one left to validate),
    chosen by a generator seeded with `seed`; indices in sample order. `class_names` and `purpose` word the error
    for a class with a single image."""
    generator = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for index, target in enumerate(targets):
        by_class.setdefault(target, []).append(index)
    train = []
    for target in sorted(by_class):
        indices = by_class[target]
        if len(indices) < 2:
            name = f'class folder {class_names[target]}' if class_names else f'class {target}'
            raise GFNetDynnError(f'{name} has {len(indices)} image; {purpose} needs at least 2 per class: add '
                                 f'images to it')
        count = min(max(1, round(train_ratio * len(indices))), len(indices) - 1)
        train += generator.sample(indices, count)
    chosen = set(train)
    return sorted(train), [i for i in range(len(targets)) if i not in chosen]


def reference_random_split(num_samples: int, train_ratio: float, seed: int) -> tuple[list[int], list[int]]:
    """The reference's NaSC split: torch random_split over all images, int(ratio x n) for training, with a
    generator seeded by `seed` (42 for its released checkpoints)."""
    num_train = int(train_ratio * num_samples)
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    return order[:num_train], order[num_train:num_train + num_samples - num_train]


def read_split_file(path: str | Path) -> tuple[list[str], list[str]]:
    """(training names, validation names) from our split JSON, or from torchgeo's text files: NAME-train.txt
    beside NAME-val.txt (else NAME-test.txt), one file name per line."""
    path = Path(path)
    if not path.is_file():
        raise GFNetDynnError(f'--split-file {path} does not exist; pass a split JSON this tool wrote, or a '
                             f'torchgeo *-train.txt')
    if path.suffix == '.json':
        try:
            data = json.loads(path.read_text())
            return list(data['train']), list(data['val'])
        except (ValueError, KeyError, TypeError) as error:
            raise GFNetDynnError(f'--split-file {path} is not a split JSON ({error}); pass one that '
                                 f'splits/*.json holds') from None
    if not path.name.endswith('-train.txt'):
        raise GFNetDynnError(f'--split-file {path}: a text split must be the *-train.txt of a pair (with *-val.txt '
                             f'or *-test.txt beside it)')
    stem = path.name[:-len('-train.txt')]
    val_path = next((p for p in (path.with_name(f'{stem}-val.txt'), path.with_name(f'{stem}-test.txt'))
                     if p.is_file()), None)
    if val_path is None:
        raise GFNetDynnError(f'--split-file {path}: no {stem}-val.txt or {stem}-test.txt beside it')
    lines = [[line.strip() for line in p.read_text().splitlines() if line.strip()] for p in (path, val_path)]
    return lines[0], lines[1]


def split_from_names(relative_paths: list[str], train_names: list[str], val_names: list[str], source: str,
                     classes: tuple[list[int], list[str]] | None = None) -> tuple[list[int], list[int]]:
    """Indices of the samples named in a split file: a name matches a relative path, or a file name when the
    file names are unique (torchgeo's lists hold bare file names). No image may be named twice; with `classes`
    (every sample's target, the class names) every class needs training and validation images."""
    by_path = {p: i for i, p in enumerate(relative_paths)}
    by_name: dict[str, int] = {}
    for i, p in enumerate(relative_paths):
        by_name[Path(p).name] = -1 if Path(p).name in by_name else i

    def indices(names: list[str]) -> list[int]:
        found, missing = [], []
        for name in names:
            index = by_path.get(name, by_name.get(Path(name).name, -1))
            (found if index >= 0 else missing).append(index if index >= 0 else name)
        if missing:
            raise GFNetDynnError(f'{source} names {len(missing)} image(s) not found (or not unique) in the data, '
                                 f'e.g. {missing[0]}; pass the data set the split was made for')
        return sorted(found)

    train, val = indices(train_names), indices(val_names)
    _check_named_once(train, val, relative_paths, source)
    if classes is not None:
        targets, names = classes
        for part, chosen in (('training', train), ('validation', val)):
            present = {targets[i] for i in chosen}
            lacking = [name for c, name in enumerate(names) if c not in present]
            if lacking:
                raise GFNetDynnError(f'{source} gives class {lacking[0]} no {part} images'
                                     f"{f' ({len(lacking)} classes lack them)' if len(lacking) > 1 else ''}; every "
                                     f'class needs training and validation images: fix the file')
    return train, val


def _check_named_once(train: list[int], val: list[int], relative_paths: list[str], source: str) -> None:
    """The first image a split names twice (in one part, or in both) is a one-line error naming it."""
    for part, chosen in (('training', train), ('validation', val)):
        seen = set()
        for i in chosen:
            if i in seen:
                raise GFNetDynnError(f'{source} names {relative_paths[i]} twice in its {part} part; each image '
                                     f'belongs once to one part: fix the file')
            seen.add(i)
    overlap = sorted(set(train) & set(val))
    if overlap:
        raise GFNetDynnError(f'{source} puts {len(overlap)} image(s) in both training and validation, e.g. '
                             f'{relative_paths[overlap[0]]}; fix the file')


def split_file_name(data_set: str, train_ratio: float | None, seed: int | None, method: str,
                    calib_ratio: float = 0.0) -> str:
    """splits/{dataset}_r{ratio}_s{seed}[_c{calib}].json (the folders of a train/val layout need no ratio or
    seed)."""
    calib = f'_c{calib_ratio:g}' if calib_ratio else ''
    if method == 'folders':
        return f'{data_set}_folders{calib}.json'
    if method == 'file':
        return f'{data_set}_file{calib}.json'
    return f"{data_set}_r{train_ratio:g}_s{seed}{'_random' if method == 'random' else ''}{calib}.json"


def split_record(data_set: str, method: str, train_ratio: float | None, seed: int | None, classes: list[str],
                 train: list[str], val: list[str]) -> dict:
    """The split as a JSON-ready dict: how it was made ('folders', 'stratified', 'random' or 'file'), its hashes
    (of both lists, and of the validation list alone for --eval without training images) and both lists."""
    return {'format': SPLIT_FORMAT, 'dataset': data_set, 'method': method, 'train_ratio': train_ratio,
            'seed': seed, 'classes': classes, 'hash': split_hash(classes, train, val),
            'val_hash': split_hash(classes, [], val), 'num_train': len(train), 'num_val': len(val),
            'train': train, 'val': val}


def calib_record(calib_ratio: float, classes: list[str], calib: list[str]) -> dict:
    """What a split record adds for held-out calibration images: their share of the training images, their
    list (drawn from 'train', which stays the whole training pool) and its hash."""
    return {'calib_ratio': calib_ratio, 'num_calib': len(calib), 'calib_hash': split_hash(classes, calib, []),
            'calib': calib}


def split_summary(record: dict, file: Path | None) -> dict:
    """What a checkpoint stores of its run's split: everything but the file lists, and where they are."""
    summary = {k: v for k, v in record.items() if k not in ('train', 'val', 'calib', 'classes', 'format')}
    return {**summary, 'file': str(Path(file).resolve()) if file else None}


def check_train_ratio(ratio: float, flag: str = '--train-ratio') -> float:
    if not (isinstance(ratio, (int, float)) and 0 < ratio < 1 and math.isfinite(ratio)):
        raise GFNetDynnError(f'{flag} {ratio} must be between 0 and 1 (exclusive), e.g. 0.8')
    return float(ratio)
