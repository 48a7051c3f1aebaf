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
