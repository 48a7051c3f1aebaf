"""The data pass: a request (a checked dataset_config.py entry, its folder, the input size, the split, the
training augmentation, how to check images) in, the training, validation and calibration sets out. The layout is
found, the folders scanned, the split made or reused, the calibration images held out, the recorded split
checked, and each part given its transform."""
import copy
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from torch.utils.data import Dataset, Subset

from data_pipeline.data_splits import (Layout, calib_record, check_train_ratio, find_layout, read_split_file,
                                       reference_random_split, split_from_names, split_record, stratified_split)
from data_pipeline.data_transforms import build_transform
from data_pipeline.scene_folder import BadImages, SceneFolder, real_files
from errors import GFNetDynnError

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_RATIO = 0.8  # a one-folder data set's training share when its entry names no protocol


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


@dataclass(frozen=True)
class DataRequest:
    """What the pass reads: data set `data_set` (its checked dataset_config.py `entry`) under `root`, at
    `input_size`, split as `split` says; with need_train=False no training set (a train/ folder need not exist
    unless calibration images are recorded). Every image is checked while scanning (check_images: fully decoded;
    skip_bad_images: bad files dropped with a warning)."""
    data_set: str
    entry: dict
    root: Path
    input_size: int
    split: SplitRequest = field(default_factory=SplitRequest)
    augment: dict | None = None  # the training augmentation settings (default: the reference's)
    skip_bad_images: bool = False
    check_images: bool = False
    need_train: bool = True


class DataSets(NamedTuple):
    """What the pass hands back: the parts, the class names and the split record."""
    train: Dataset | None  # None when only validation was asked for
    val: Dataset
    classes: list[str]
    split: dict  # data_splits.split_record: how the split was made, its hash, both file lists
    calib: Dataset | None = None  # the held-out calibration images (--calib-ratio), validation transform


def make_data_sets(request: DataRequest) -> DataSets:
    """The training, validation and (with split.calib_ratio) calibration sets the request asks for: the layout
    found, scanned, split as the layout and the split request say, the split recorded and checked against the
    run's, each part with its transform."""
    split = request.split
    layout = find_layout(request.root, request.entry, need_train=request.need_train or bool(split.calib_ratio))
    if layout.kind == 'folders':
        train_scenes, val_scenes = _scan_folders(request, layout)
        method, pool = 'folders', list(range(len(train_scenes))) if train_scenes is not None else []
        val_idx, ratio, seed = None, None, None
    else:
        train_scenes = val_scenes = _scan(request, layout.train)
        method, pool, val_idx = _one_folder_split(request.entry, train_scenes,
                                                 _relative(train_scenes.samples, layout.train), split)
        if not pool or not val_idx:
            raise GFNetDynnError(f'the split leaves no {"training" if not pool else "validation"} images of the '
                                 f'{len(train_scenes)} in {layout.train}; {_empty_split_cause(method, split)}')
        ratio = split.train_ratio if method != 'file' else None
        seed = split.seed if method in ('stratified', 'random') else None
    train_idx, calib_idx = _hold_out_calibration(train_scenes, pool, split) if pool else ([], [])
    train_rel = _relative(train_scenes.samples, layout.train) if train_scenes is not None else []
    val_rel = _relative(val_scenes.samples, layout.val or layout.train)
    record = split_record(request.data_set, method, ratio, seed, val_scenes.classes, [train_rel[i] for i in pool],
                          val_rel if val_idx is None else [val_rel[i] for i in val_idx])
    if split.calib_ratio:
        record.update(calib_record(split.calib_ratio, val_scenes.classes, [train_rel[i] for i in calib_idx]))
    _check_recorded(record, split, request.root)
    whole_pool = method == 'folders' and not calib_idx
    train_set = (_view(train_scenes, build_transform(True, request.input_size, request.augment),
                       None if whole_pool else train_idx) if request.need_train else None)
    val_tf = build_transform(False, request.input_size)
    val_set = _view(val_scenes, val_tf, val_idx)
    calib_set = _view(train_scenes, val_tf, calib_idx) if calib_idx else None
    logger.info('%s: %s training, %d validation%s images in %d classes from %s', request.data_set,
                len(train_set) if train_set is not None else 'no', len(val_set),
                f' and {len(calib_set)} calibration' if calib_set is not None else '', len(val_scenes.classes),
                request.root)
    return DataSets(train_set, val_set, val_scenes.classes, record, calib_set)


def _scan_folders(request: DataRequest, layout: Layout) -> tuple[SceneFolder | None, SceneFolder]:
    """Scan a train/ + val/ layout (train/ may be absent for validation only): same classes in both, and a
    warning when the same files (through links) sit in both."""
    scenes, bad = [], []
    for folder in (layout.train, layout.val):
        try:
            scenes.append(SceneFolder(folder, skip_bad_images=request.skip_bad_images,
                                      check_images=request.check_images) if folder else None)
        except BadImages as error:  # scan both folders first: every bad file named in one line
            bad += error.problems
    if bad:
        raise BadImages(bad, Path(os.path.commonpath([f for f in (layout.train, layout.val) if f])))
    train_scenes, val_scenes = scenes
    if train_scenes is not None:  # before the class count: a folder in one split only is named, not the count
        _check_same_classes(train_scenes, val_scenes)
        _check_class_count(request, train_scenes)
    _check_class_count(request, val_scenes)
    if train_scenes is not None:
        shared = len(real_files(train_scenes) & real_files(val_scenes))
        if shared:
            logger.warning('%d validation images are also training images (the same files, through links); '
                           'validation accuracy will be optimistic', shared)
    return train_scenes, val_scenes


def _check_same_classes(train: SceneFolder, val: SceneFolder) -> None:
    """Train and val must name the same classes, or label indices would silently disagree."""
    only_train, only_val = sorted(set(train.classes) - set(val.classes)), sorted(set(val.classes) - set(train.classes))
    if only_train or only_val:
        raise GFNetDynnError(f'class folders differ between {train.root} and {val.root} (only in train: '
                             f'{", ".join(only_train) or "-"}; only in val: {", ".join(only_val) or "-"}); '
                             f'make both hold the same class names')


def _scan(request: DataRequest, folder: Path) -> SceneFolder:
    """Scan one class-per-sub-folder directory (no transform yet) and check its class count."""
    scenes = SceneFolder(folder, skip_bad_images=request.skip_bad_images, check_images=request.check_images)
    _check_class_count(request, scenes)
    return scenes


def _check_class_count(request: DataRequest, folder: SceneFolder) -> None:
    """The folder must hold exactly the number of classes dataset_config.py promises."""
    data_set, expected = request.data_set, request.entry['num_classes']
    if len(folder.classes) != expected:
        raise GFNetDynnError(f'dataset_config.py says {data_set} has {expected} classes but {folder.root} has '
                             f'{len(folder.classes)}; fix the folder or the entry')


def _empty_split_cause(method: str, split: SplitRequest) -> str:
    """What to change when a split leaves one part empty: the file that named no images, or the ratio."""
    return {'file': f'--split-file {split.file} names none: add some to it',
            'random': 'choose a --train-ratio nearer 0.5 or add images',
            'stratified': 'choose a --train-ratio nearer 0.5 or add images'}.get(
        method, f"the run's split file {(split.recorded or {}).get('file')} names none")


def _one_folder_split(entry: dict, scenes: SceneFolder, relative: list[str],
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


def _hold_out_calibration(scenes: SceneFolder, pool: list[int], request: SplitRequest) -> tuple[list[int], list[int]]:
    """(training, calibration) indices: a stratified calib_ratio share of the training pool, drawn with the
    split's seed, so every stage and --eval hold out the same images."""
    if not request.calib_ratio:
        return pool, []
    targets = [scenes.targets[i] for i in pool]
    keep, held = stratified_split(targets, 1 - request.calib_ratio, request.seed, scenes.classes,
                                  f'holding out --calib-ratio {request.calib_ratio:g} of the training images')
    return [pool[i] for i in keep], [pool[i] for i in held]


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


def _view(scenes: SceneFolder, transform, indices: list[int] | None) -> Dataset:
    """The scanned images (all, or those at `indices`) with their own transform."""
    view = _with_transform(scenes, transform)
    return view if indices is None else Subset(view, indices)


def _with_transform(scenes: SceneFolder, transform) -> SceneFolder:
    """A view of the same file list with its own transform (a shallow copy: no rescan)."""
    view = copy.copy(scenes)
    view.transform = transform
    return view


def _relative(samples: list[tuple[str, int]], class_root: Path) -> list[str]:
    return [Path(path).relative_to(class_root).as_posix() for path, _ in samples]
