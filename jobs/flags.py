"""Flags that declare, where they are defined, the jobs they act in and their valid range.

`add_flag(group, '--lr', type=float, default=1e-3, jobs=TRAINING, check=positive, help=...)` records both on the
argparse action; `check_ranges` and `flag_jobs` read them back, so no table elsewhere repeats a flag.
"""
import argparse
import math
from typing import Callable, Iterable

from data_pipeline.data_splits import check_train_ratio
from errors import GFNetDynnError

TRAINING = frozenset({'backbone', 'dynn'})
READS_DATA = TRAINING | {'eval'}
BACKBONE, DYNN, EVAL, EXPORT = frozenset({'backbone'}), frozenset({'dynn'}), frozenset({'eval'}), frozenset({'export'})

Check = Callable[[str, float], None]  # (flag, one value) -> None, or raises GFNetDynnError naming the flag


def bounded(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False,
            text: str | None = None) -> Check:
    """A finite number between `low` and `high`; `text` says so in the error (by default the interval)."""
    if text is None:
        text = (('must be positive' if low_open else 'must be >= 0') if high == math.inf and low == 0 else
                f"must lie in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")

    def check(flag: str, value: float) -> None:
        if isinstance(value, float) and math.isinf(value) and low <= value <= high:
            raise GFNetDynnError(f'{flag} must be finite, got {value}')
        inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
        if not inside:  # nan is never inside
            raise GFNetDynnError(f'{flag} {text}, got {value}')
    return check


positive = bounded(0, low_open=True)
non_negative = bounded(0)
probability = bounded(0, 1)  # thresholds, flip and erase probabilities, mixing weights
below_one = bounded(0, 1, high_open=True)  # a share or rate that cannot be all


def finite(flag: str, value: float) -> None:
    if not math.isfinite(value):
        raise GFNetDynnError(f'{flag} must be finite, got {value}')


def add_flag(group, *names: str, jobs: Iterable[str] | None = None, check: Check | None = None,
             **kwargs) -> argparse.Action:
    """group.add_argument(*names, **kwargs), remembering the jobs the flag acts in (None: every job) and the
    check each of its values must pass."""
    action = group.add_argument(*names, **kwargs)
    action.jobs = frozenset(jobs) if jobs is not None else None
    action.check = check
    return action


def declared(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings]


def option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the flag as users write it (--data-set, --num_epoch)."""
    return {action.dest: action.option_strings[0] for action in declared(parser)}


def flag_jobs(parser: argparse.ArgumentParser) -> dict[str, frozenset[str] | None]:
    """dest -> the jobs the flag acts in (None: every job)."""
    return {action.dest: getattr(action, 'jobs', None) for action in declared(parser)}


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every given numeric value within its flag's range; the first violation is a one-line error."""
    for action in declared(parser):
        check, value = getattr(action, 'check', None), getattr(args, action.dest, None)
        if check is None or value is None:
            continue
        for one in value if isinstance(value, list) else [value]:
            check(action.option_strings[0], one)


def split_ratio(flag: str, value: float) -> None:
    check_train_ratio(value, flag)


# What None means for a flag both training stages share: stage 0 follows GFNet's transfer recipe (its README's
# fine-tuning command on its script's defaults), the dynn stages the reference's SGD recipe. The help lines and
# with_stage_defaults read this table; the dynn stages' weight decay follows their optimizer.
STAGE_DEFAULTS = {
    'backbone': {'opt': 'adamw', 'lr': 1e-4, 'min_lr': 1e-5, 'wd': 1e-4},
    'dynn': {'opt': 'sgd', 'lr': 1e-3, 'min_lr': 2e-4, 'wd': None},
}
DYNN_WEIGHT_DECAY = {'sgd': 5e-4, 'adamw': 0.05}


def stage_default_help(dest: str) -> str:
    """'default: X for --stage backbone, Y for --stage dynn' from STAGE_DEFAULTS."""
    backbone, dynn = STAGE_DEFAULTS['backbone'][dest], STAGE_DEFAULTS['dynn'][dest]
    return f'default: {backbone:g} with --stage backbone (GFNet\'s), {dynn:g} with --stage dynn (the reference\'s)'


def with_stage_defaults(args: argparse.Namespace, stage: str) -> argparse.Namespace:
    """args with every shared flag left at None given its value for `stage`, so checkpoints record what ran."""
    values = {dest: getattr(args, dest) if getattr(args, dest) is not None else default
              for dest, default in STAGE_DEFAULTS[stage].items()}
    if values['wd'] is None:
        values['wd'] = DYNN_WEIGHT_DECAY[values['opt']]
    return argparse.Namespace(**{**vars(args), **values})
