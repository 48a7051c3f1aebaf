"""Turning parsed arguments into what a job needs: the device, the model's shape, the data loaders, the run
folders, and the claim on them (lock, --overwrite, Ctrl-C)."""
import argparse
import logging
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from data_loader_help import build_datasets, build_loaders, dataset_entry, resolve_data_path
from errors import GFNetDynnError, Interrupted
from learning_helpers import model_factory
from learning_helpers.distributed import barrier, is_main_process
from learning_helpers.loop import TrainingStopped
from learning_helpers.outputs import folder_lock, remove_previous_run
from models.weights import read_checkpoint

PATH_FLAGS = ('data_path', 'checkpoint_path', 'teacher_path', 'output_dir')  # stored absolute in checkpoints


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


def resolve_model_shape(args: argparse.Namespace, source_args: dict) -> dict:
    """Architecture, patch size and input size: the flag if given, else the checkpoint's, else the default."""
    arch = args.arch or source_args.get('arch') or model_factory.DEFAULT_ARCH
    patch_size = args.patch_size or source_args.get('patch_size') or model_factory.DEFAULT_PATCH_SIZE
    input_size = args.input_size or source_args.get('input_size') or dataset_entry(args.data_set)[
        'default_input_size']
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


def checkpoint_args(path: str | None) -> tuple[dict, dict]:
    """(checkpoint, its stored run args) or empty dicts when no checkpoint is given."""
    if not path:
        return {}, {}
    checkpoint = read_checkpoint(path)
    return checkpoint, checkpoint.get('args', {}) if isinstance(checkpoint.get('args'), dict) else {}


def build_data(args: argparse.Namespace, input_size: int, distributed: bool):
    """(train loader, val loader, class names, the data folder)."""
    if not is_main_process():
        barrier()  # under torchrun rank 0 goes first: it may generate DEMO, which the other ranks then read
    data_path = resolve_data_path(args.data_set, args.data_path)
    if is_main_process():
        barrier()
    train_set, val_set, class_names = build_datasets(
        args.data_set, data_path, input_size, split_ratio=args.split_ratio, seed=args.seed,
        reprob=args.reprob, skip_bad_images=args.skip_bad_images)
    train_loader, val_loader = build_loaders(train_set, val_set, args.batch, args.num_workers, args.seed,
                                             distributed=distributed)
    return train_loader, val_loader, class_names, data_path


def run_args_dict(args: argparse.Namespace, shape: dict, class_names: list[str], data_path: Path) -> dict:
    """Plain-data copy of the run's arguments with the resolved shape, paths made absolute so that --resume
    works from any directory: checkpoints stay weights_only."""
    run_args = {**vars(args), **shape, 'class_names': list(class_names), 'data_path': str(Path(data_path).resolve())}
    for dest in PATH_FLAGS:
        if run_args.get(dest):
            run_args[dest] = str(Path(run_args[dest]).resolve())
    return run_args


def backbone_run_folder(output_dir: str | Path, data_set: str, arch: str) -> Path:
    return Path(output_dir) / 'checkpoint' / f'backbone_{data_set}_{arch}'


def dynn_run_folder(output_dir: str | Path, data_set: str, tradeoff: float) -> Path:
    return Path(output_dir) / 'checkpoint' / f'checkpoint_{data_set}_{tradeoff}_confEE'


def warmup_folder(output_dir: str | Path, data_set: str, arch: str, input_size: int, max_warmup_epoch: int,
                  tradeoff: float) -> Path:
    """The reference's checkpoint_warmup/{dataset}_{arch}_{size}_{max warm-up}, plus lambda: one per run."""
    return Path(output_dir) / 'checkpoint_warmup' / f'{data_set}_{arch}_{input_size}_{max_warmup_epoch}_{tradeoff}'


def make_writer(output_dir: Path, name: str) -> SummaryWriter | None:
    if not is_main_process():
        return None
    return SummaryWriter(log_dir=str(output_dir / 'runs' / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"))


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
            raise Interrupted(f'{where}, before the first epoch finished: nothing was saved') from None
