"""Turning parsed arguments into what a job needs: the device, the model's shape, the data loaders, the run
folders, and the claim on them (lock, --overwrite, Ctrl-C)."""
import argparse
import json
import logging
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from data_loader_help import (SplitRequest, build_datasets, build_loaders, dataset_entry, default_train_ratio,
                              resolve_data_path)
from data_pipeline.data_splits import split_file_name, split_summary
from data_pipeline.data_transforms import AUGMENT_CHECKS, resolve_augment
from errors import GFNetDynnError, Interrupted
from jobs.flags import FlagFacts
from jobs.outputs import folder_lock, remove_previous_run, writable_location
from jobs.trained_run import RunArgs
from learning_helpers.loop import TrainingStopped
from models import model_factory
from models.weights import read_checkpoint
from runtime.atomic import save_json
from runtime.distributed import barrier, is_main_process

AUGMENT_FLAGS = tuple(AUGMENT_CHECKS)  # the training-augmentation flags, one per setting


def resolve_device(name: str, distributed_device: torch.device | None) -> torch.device:
    if distributed_device is not None:
        return distributed_device
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise GFNetDynnError(f'--device {name} is not a device; use auto, cpu, cuda or cuda:N') from error
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise GFNetDynnError(f'--device {name} asked for CUDA but no GPU is visible; use --device cpu')
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GFNetDynnError(f'--device {name} is not available in this PyTorch ({reason}); use --device cpu '
                             f'or cuda') from None
    return device


def resolve_model_shape(args: argparse.Namespace, source_args: RunArgs) -> dict:
    """Architecture, patch size and input size: the flag if given, else the checkpoint's (or the record's default),
    else the data set's input size."""
    arch = args.arch or source_args.arch
    input_size = args.input_size or source_args.input_size or dataset_entry(args.data_set)['default_input_size']
    if not model_factory.is_gfnet(arch):  # another timm model: no patches, any input size
        if args.patch_size:
            raise GFNetDynnError(f'--patch-size applies to GFNet archs only, not to --arch {arch}; drop it')
        return {'arch': arch, 'patch_size': None, 'input_size': input_size}
    patch_size = args.patch_size or source_args.patch_size
    if input_size < patch_size:
        raise GFNetDynnError(f'--input-size {input_size} is smaller than one patch ({patch_size} px); pass an '
                             f'--input-size of at least {patch_size}')
    if input_size % patch_size:  # the patch embedding floors the grid, as the official GFNet does
        logging.info('input %d px with %d px patches: a %d x %d token grid; the last %d pixels of each row and '
                     'column are not used', input_size, patch_size, input_size // patch_size,
                     input_size // patch_size, input_size % patch_size)
    return {'arch': arch, 'patch_size': patch_size, 'input_size': input_size}


def dataset_num_classes(data_set: str) -> int:
    """The class count dataset_config.py promises (the data folder is checked against it when read)."""
    return dataset_entry(data_set)['num_classes']


def check_class_count(source: str, checkpoint_classes: int | None, data_set: str, data_classes: int,
                      hint: str) -> None:
    """A model whose head predicts another number of classes than the data set has is a one-line error naming both
    (None: the checkpoint has no final head to compare)."""
    if checkpoint_classes is None:
        raise GFNetDynnError(f'{source} has no final classifier head to check against the {data_classes} classes of '
                             f'--data-set {data_set}; {hint}')
    if checkpoint_classes != data_classes:
        raise GFNetDynnError(f'{source} predicts {checkpoint_classes} classes but --data-set {data_set} has '
                             f'{data_classes}; {hint}')


def checkpoint_args(path: str | None, wanted: str = 'a .pth file a run wrote') -> tuple[dict, RunArgs]:
    """(checkpoint, its stored run args as a record); an empty dict and the defaults when no checkpoint is given.
    `wanted` says what the job needs, for the message when the file is missing."""
    checkpoint = read_checkpoint(path, wanted) if path else {}
    return checkpoint, RunArgs.of(checkpoint)


class RunData(NamedTuple):
    train_loader: DataLoader | None  # None when only validation was asked for (--eval)
    val_loader: DataLoader
    classes: list[str]
    data_path: Path
    split: dict  # data_splits.split_record: how the images split, with both file lists
    calib_loader: DataLoader | None = None  # the held-out calibration images (--calib-ratio), in order


def split_request(args: argparse.Namespace, recorded: dict | None) -> SplitRequest:
    """The split to make: flags, else the recorded split's ratio, seed and calibration share, else the entry's
    defaults. A flag contradicting the recorded split is an error: validation (or calibration) would hold images
    the run trained on."""
    recorded = recorded or {}
    recorded_calib = (recorded.get('calib_ratio') or 0.0) if recorded else None
    flags = (('--train-ratio', args.train_ratio, recorded.get('train_ratio'), 'validation'),
             ('--split-seed', args.split_seed, recorded.get('seed'), 'validation'),
             ('--calib-ratio', args.calib_ratio, recorded_calib, 'calibration'))
    for flag, value, before, held_out in flags:
        if value is not None and before is not None and value != before:
            raise GFNetDynnError(f'{flag} {value} differs from the split the checkpoint was trained on ({flag} '
                                 f'{before}): its {held_out} images would include training images; drop {flag} '
                                 f'to reuse that split, or train a new backbone on the new split')
    ratio = args.train_ratio if args.train_ratio is not None else recorded.get('train_ratio')
    seed = args.split_seed if args.split_seed is not None else recorded.get('seed')
    calib = args.calib_ratio if args.calib_ratio is not None else recorded_calib
    return SplitRequest(default_train_ratio(args.data_set) if ratio is None else ratio, 42 if seed is None else seed,
                        args.split_file, recorded or None, calib_ratio=calib or 0.0)


def build_data(args: argparse.Namespace, input_size: int, distributed: bool, recorded: dict | None = None,
               need_train: bool = True) -> RunData:
    """The loaders of the run's data, split as recorded (a later stage, --eval, --resume) or as asked."""
    if not is_main_process():
        barrier()  # under torchrun rank 0 goes first: it may generate DEMO, which the other ranks then read
    data_path = resolve_data_path(args.data_set, args.data_path)
    if is_main_process():
        barrier()
    augment = resolve_augment(dataset_entry(args.data_set).get('train_augment'),
                              {flag: getattr(args, flag) for flag in AUGMENT_FLAGS})
    data = build_datasets(args.data_set, data_path, input_size, split=split_request(args, recorded),
                          augment=augment, skip_bad_images=args.skip_bad_images, need_train=need_train,
                          check_images=args.check_images)
    given = [flag for flag, value in (('--train-ratio', args.train_ratio), ('--split-seed', args.split_seed),
                                      ('--split-file', args.split_file)) if value is not None]
    if data.split['method'] == 'folders' and given:
        raise GFNetDynnError(f'{given[0]} has no effect: {data_path} holds train/ and val/ folders, which are the '
                             f'split; drop it')
    train_loader, val_loader = build_loaders(data.train, data.val, args.batch, args.num_workers, args.seed,
                                             distributed=distributed)
    calib_loader = build_loaders(None, data.calib, args.batch, args.num_workers, args.seed)[1] if data.calib else None
    return RunData(train_loader, val_loader, data.classes, data_path, data.split, calib_loader)


def check_split_file(output_dir: str | Path, split: dict) -> Path:
    """Where the run's split is written (splits/ under --output-dir): a new file, or one holding this very split."""
    path = Path(output_dir) / 'splits' / split_file_name(split['dataset'], split['train_ratio'], split['seed'],
                                                         split['method'], split.get('calib_ratio') or 0.0)
    if path.exists():
        try:
            existing = json.loads(path.read_text()).get('hash')
        except (OSError, ValueError, AttributeError):
            existing = None
        if existing != split['hash']:
            raise GFNetDynnError(f'{path} holds another split of {split["dataset"]} (hash {existing}, this one '
                                 f"{split['hash']}): the data changed since it was written; pass another --output-dir")
    writable_location(path.parent, '--output-dir')
    return path


def save_split(path: Path, split: dict) -> None:
    """Write the split's file lists (once: an existing file already holds this split)."""
    if is_main_process() and not path.exists():
        save_json(path, split)


def run_args_dict(args: argparse.Namespace, flags: FlagFacts, shape: dict, data: RunData, split_path: Path) -> dict:
    """Plain-data copy of the run's arguments with the resolved shape, class names and split, the flags declared
    path=True made absolute so that --resume works from any directory: checkpoints stay weights_only."""
    run_args = {**vars(args), **shape, 'class_names': list(data.classes), 'data_path': str(data.data_path.resolve()),
                'split': split_summary(data.split, split_path)}
    for dest in flags.where(path=True):
        if run_args.get(dest):
            run_args[dest] = str(Path(run_args[dest]).resolve())
    return run_args


def backbone_run_folder(output_dir: str | Path, data_set: str, arch: str) -> Path:
    return Path(output_dir) / 'checkpoint' / f'backbone_{data_set}_{arch}'


def dynn_run_folder(output_dir: str | Path, data_set: str, tradeoff: float, arch: str) -> Path:
    """checkpoint_{dataset}_{lambda}_confEE for GFNet (the seed README's name); another backbone's name is added
    (checkpoint_{dataset}_{arch}_{lambda}_confEE), so that runs of two backbones never share a folder."""
    backbone = '' if model_factory.is_gfnet(arch) else f'{arch}_'
    return Path(output_dir) / 'checkpoint' / f'checkpoint_{data_set}_{backbone}{tradeoff}_confEE'


def warmup_folder(output_dir: str | Path, data_set: str, arch: str, input_size: int, max_warmup_epoch: int,
                  tradeoff: float) -> Path:
    """The reference's checkpoint_warmup/{dataset}_{arch}_{size}_{max warm-up}, plus lambda: one per run."""
    return Path(output_dir) / 'checkpoint_warmup' / f'{data_set}_{arch}_{input_size}_{max_warmup_epoch}_{tradeoff}'


def make_writer(output_dir: Path, name: str) -> SummaryWriter | None:
    if not is_main_process():
        return None
    return SummaryWriter(log_dir=str(output_dir / 'runs' / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"))


@contextmanager
def removed_on_bad_input(roots: list[Path]):
    """A run stopped by a user mistake (a bad image, a bad value) or by Ctrl-C before it saved a checkpoint leaves
    nothing behind: what the block created under `roots` (split file, lock, run folders, TensorBoard events) and
    the folders above them it made are removed again. A run that saved a checkpoint keeps everything, to resume."""
    roots = [Path(root).absolute() for root in roots]

    def tree() -> dict[Path, int]:  # every path under the roots -> its modification time
        return {path: path.lstat().st_mtime_ns for root in roots if root.exists() for path in [root, *root.rglob('*')]}
    before = tree()
    made_parents = {parent for root in roots for parent in root.parents if not parent.exists()}
    try:
        yield
    except (GFNetDynnError, Interrupted, KeyboardInterrupt):
        after = tree()
        saved = any(path.suffix == '.pth' and before.get(path) != mtime for path, mtime in after.items())
        if is_main_process() and not saved:
            for path in sorted((set(after) - set(before)) | made_parents, key=lambda p: len(p.parts), reverse=True):
                try:
                    if path.is_dir() and not path.is_symlink():
                        path.rmdir()
                    else:
                        path.unlink(missing_ok=True)
                except OSError:  # a folder something else wrote into meanwhile: kept
                    pass
        raise


@contextmanager
def claim_run(folders: list[Path], overwrite: bool):
    """This process writes `folders` (created, the first one locked) for the block; with `overwrite` the files an
    earlier run left there go first. Ctrl-C inside becomes one line naming what to resume from."""
    with folder_lock(folders[0]) if is_main_process() else nullcontext():
        if is_main_process():
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
                if overwrite:
                    remove_previous_run(folder)
        try:
            yield
        except KeyboardInterrupt as stop:
            where = f'in {stop}' if isinstance(stop, TrainingStopped) else 'while validating or saving'
            last = folders[0] / 'last.pth'
            if last.is_file():
                raise Interrupted(f'{where}; the last finished epoch is in {last}: continue with python '
                                  f'main_dynn.py --resume {last}') from None
            raise Interrupted(f'{where}, before the first epoch finished: nothing was saved, and what the run had '
                              f'created is removed') from None
