"""What the training stages share: the run's settings, where a stage starts (fresh or resumed), the summary it
returns, what its checkpoints hold and in which order an epoch's files are written, and its log."""
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.tensorboard import SummaryWriter

from errors import GFNetDynnError
from learning_helpers.checkpoint import load_training_checkpoint, save_checkpoint, suggested_checkpoint
from learning_helpers.optim import restore_optimizer
from runtime.distributed import is_main_process


@dataclass(frozen=True)
class RunConfig:
    """Settings every training stage of a run reads."""
    num_epochs: int  # --num_epoch: the run's total (dynn: warm-up included)
    seed: int
    checkpoint_dir: Path  # the run folder: best.pth, last.pth, snapshots
    run_args: dict  # the run's arguments, stored in every checkpoint so --eval and --resume can rebuild the run
    max_batches: int | None = None  # --barely_train: a few batches per epoch for smoke tests
    amp: bool = False
    max_nan_skips: int = 5


# Beyond weights, progress, optimizer and schedule, what each stage's checkpoints hold to resume exactly.
STAGE_STATE = {'backbone': ('criterion',), 'warmup': ('warmup',),
               'joint': ('stage_start_epoch', 'global_step', 'pos_weight')}


RESUME_KEYS = ('epoch', 'best_acc', 'optimizer', 'scheduler')  # and the stage's STAGE_STATE


def extend_hint(stage: str, data_set: str | None, start: Path) -> str:
    """How to train a finished run further: a new run from its weights, in a new folder."""
    stage_flag = '--stage backbone ' if stage == 'backbone' else ''
    data_flag = f'--data-set {data_set} ' if data_set else ''
    return (f'python main_dynn.py {stage_flag}{data_flag}--checkpoint-path {start} --num_epoch N '
            f'--output-dir NEW')


def finished(checkpoint: dict) -> bool:
    """Whether a run's last.pth holds its final epoch (nothing is left to resume)."""
    args = checkpoint.get('args')
    return isinstance(args, dict) and 'num_epoch' in args and checkpoint.get('epoch', -1) + 1 >= args['num_epoch']


def _check_is_last(path: Path, checkpoint: dict) -> None:
    """--resume continues from the run's last.pth only: resuming from best.pth or a snapshot would retrain
    epochs and replace last.pth, which for a finished run loses the trained model. Whether the run finished
    is read from its last.pth, whatever file was given."""
    if path.name == 'last.pth':
        return
    last = path.parent / 'last.pth'
    what = ('a per-epoch snapshot' if path.name.startswith('ckpt_epoch') else
            "the run's best epoch" if path.name == 'best.pth' else "not the run's last.pth")
    try:
        run_last = load_training_checkpoint(last) if last.is_file() else None
    except GFNetDynnError:
        run_last = None
    args = checkpoint['args'] if isinstance(checkpoint['args'], dict) else {}
    stage = 'backbone' if checkpoint['stage'] == 'backbone' else 'dynn'
    if run_last is not None and finished(run_last):
        raise GFNetDynnError(f'--resume {path} is {what}; --resume continues a run from its last.pth, and that run '
                             f'({last}) is finished: to train further, start a new run from its weights: '
                             f"{extend_hint(stage, args.get('data_set'), path)}")
    if run_last is not None:
        raise GFNetDynnError(f'--resume {path} is {what}; --resume continues a run from its last.pth: pass '
                             f'--resume {last}')
    raise GFNetDynnError(f'--resume {path} is {what}, and {last} does not exist: there is no run to continue; '
                         f"start a new run from its weights: {extend_hint(stage, args.get('data_set'), path)}")


def load_resume_checkpoint(path: str | Path, output_dir: str | Path = '.') -> dict:
    """A checkpoint --resume can continue from (a run's last.pth): its stage's training state must be there.
    Per-epoch snapshots (ckpt_epoch*.pth) keep the weights only."""
    checkpoint = load_training_checkpoint(path, suggested_checkpoint(output_dir, '*/last.pth', "a run's last.pth"))
    _check_is_last(Path(path), checkpoint)
    stage = checkpoint['stage']
    required = RESUME_KEYS + STAGE_STATE[stage] if stage in STAGE_STATE else None
    missing = ['a known stage'] if required is None else [key for key in required if key not in checkpoint]
    if not isinstance(checkpoint['args'], dict) or 'num_epoch' not in checkpoint['args']:
        missing.append('args.num_epoch')
    if missing:
        raise GFNetDynnError(f"{path} holds no training state to resume from (no {', '.join(missing)}); pass the "
                             f"run's last.pth to --resume, or this file as --checkpoint-path to start a new run "
                             f'from its weights')
    return checkpoint


class StartPoint(NamedTuple):
    """Where a stage begins: epoch 0 of a new run, or the epoch after a resumed checkpoint's."""
    stage: str | None  # the stage the resumed checkpoint was written in; None for a new run
    epoch: int  # the first epoch to run
    best_acc: float
    state: dict  # the stage's own STAGE_STATE entries


FRESH_START = StartPoint(None, 0, 0.0, {})


def resume_training(checkpoint: dict, model: torch.nn.Module, optimizer, scheduler, source: str) -> StartPoint:
    """Load a --resume checkpoint's weights, optimizer and schedule; return where its stage goes on."""
    model.load_state_dict(checkpoint['model'])
    restore_optimizer(optimizer, scheduler, checkpoint, source)
    stage = checkpoint['stage']
    return StartPoint(stage, checkpoint['epoch'] + 1, checkpoint.get('best_acc', 0.0),
                      {key: checkpoint[key] for key in STAGE_STATE[stage]})


def training_checkpoint(stage: str, model: torch.nn.Module, run: RunConfig, *, epoch: int, acc: float,
                        best_acc: float, optimizer, scheduler, **state) -> dict:
    """A stage's last.pth / best.pth: plain data only (weights_only loading)."""
    assert set(state) == set(STAGE_STATE[stage]), (stage, sorted(state))
    return {'model': model.state_dict(), 'acc': acc, 'best_acc': best_acc, 'epoch': epoch, 'stage': stage,
            'args': run.run_args, 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(), **state}


def save_epoch(folder: Path, checkpoint: dict, *, best: bool, snapshot: tuple[str, dict] | None = None) -> None:
    """best.pth (when this epoch is the best), the epoch's snapshot, then last.pth. last.pth goes last: once it
    names an epoch every file of that epoch is complete, so a run killed at any moment resumes from a
    consistent set. Only the main process writes."""
    if not is_main_process():
        return
    if best:
        save_checkpoint(folder / 'best.pth', checkpoint)
    if snapshot is not None:
        save_checkpoint(folder / snapshot[0], snapshot[1])
    save_checkpoint(folder / 'last.pth', checkpoint)


class StageSummary(NamedTuple):
    """What every run_*_stage returns."""
    next_epoch: int  # where the next stage starts
    acc: float  # the last epoch's validation accuracy
    best_acc: float
    best_path: Path | None  # None where the stage writes no best.pth (warm-up)
    last_path: Path


def log_epoch(writer: SummaryWriter | None, stage: str, epoch: int, scalars: dict) -> None:
    """TensorBoard scalars `stage/name`; a list becomes one scalar per exit, `name{k}`."""
    if writer is None:
        return
    for name, value in scalars.items():
        for suffix, item in (enumerate(value) if isinstance(value, (list, tuple)) else [('', value)]):
            writer.add_scalar(f'{stage}/{name}{suffix}', item, epoch)
