"""Flags that declare, where they are defined, every fact about them: the jobs they act in, their valid range,
whether they name a path, and what --resume does with them.

`add_flag(group, '--lr', type=float, default=1e-3, jobs=TRAINING, check=positive, help=...)` keeps these facts on the
argparse action; `FlagFacts` reads them back from the parser for the checks, the jobs and docs/FLAGS.md, so no table
elsewhere repeats a flag.
"""
import argparse
import math
from dataclasses import dataclass
from typing import Callable, Iterable

from data_pipeline.data_splits import check_train_ratio
from errors import GFNetDynnError

TRAINING = frozenset({'backbone', 'dynn'})
READS_DATA = TRAINING | {'eval'}
BACKBONE, DYNN, EVAL, EXPORT = frozenset({'backbone'}), frozenset({'dynn'}), frozenset({'eval'}), frozenset({'export'})
FIXED, MAY_CHANGE = 'fixed', 'may_change'  # on_resume: what the run is, or how it runs

# (flag, one value) -> None, or raises GFNetDynnError naming the flag; its `range` attribute is the docs' text
Check = Callable[[str, float], None]


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
    check.range = (f"{'>' if low_open else '>='} {low:g}" if high == math.inf else
                   f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")
    return check


positive = bounded(0, low_open=True)
non_negative = bounded(0)
probability = bounded(0, 1)  # thresholds, flip and erase probabilities, mixing weights
below_one = bounded(0, 1, high_open=True)  # a share or rate that cannot be all


@dataclass(frozen=True)
class Flag:
    """What one flag declares beyond argparse (add_flag's keywords), kept on its argparse action as `.flag`."""
    jobs: frozenset[str] | None = None  # the jobs it acts in; None: every job
    check: Check | None = None  # each of its values passes it
    path: bool = False  # a file or folder: recorded absolute, so --resume compares it resolved
    on_resume: str = FIXED  # MAY_CHANGE: how a run runs, not what it is, so --resume takes a new value
    before_flag: object = None  # the value that reproduces runs trained before the flag existed (None: its default)
    calibration: bool = False  # with --export, read only by --quantize (for its calibration images)
    from_checkpoint: bool = False  # shapes the model: --eval and --export build it as the checkpoint has it


def add_flag(group, *names: str, jobs: Iterable[str] | None = None, check: Check | None = None, path: bool = False,
             on_resume: str = FIXED, before_flag=None, calibration: bool = False, from_checkpoint: bool = False,
             **kwargs) -> argparse.Action:
    """group.add_argument(*names, **kwargs), remembering every other fact about the flag (see `Flag`)."""
    if on_resume not in (FIXED, MAY_CHANGE):
        raise ValueError(f'on_resume of {names[0]} must be {FIXED!r} or {MAY_CHANGE!r}, not {on_resume!r}')
    action = group.add_argument(*names, **kwargs)
    action.flag = Flag(frozenset(jobs) if jobs is not None else None, check, path, on_resume, before_flag,
                       calibration, from_checkpoint)
    return action


def declared(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if hasattr(action, 'flag')]


class FlagFacts:
    """A parser's add_flag declarations by dest, in the parser's order. The entry point builds it and hands it to
    the jobs (which sit below the module that builds the parser), so they read each flag's facts, not tables."""

    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser
        self.actions = {action.dest: action for action in declared(parser)}
        self.names = {dest: action.option_strings[0] for dest, action in self.actions.items()}  # --data-set

    def __getitem__(self, dest: str) -> Flag:
        return self.actions[dest].flag

    def default(self, dest: str):
        return self.parser.get_default(dest)

    def where(self, **facts) -> list[str]:
        """The dests whose declarations hold all these facts (where(path=True): the path flags)."""
        return [dest for dest, action in self.actions.items()
                if all(getattr(action.flag, fact) == value for fact, value in facts.items())]

    def before_flags(self) -> dict[str, object]:
        """dest -> the value runs trained with before the flag existed, for the flags whose default differs."""
        return {dest: action.flag.before_flag for dest, action in self.actions.items()
                if action.flag.before_flag is not None}


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every given numeric value within its flag's range; the first violation is a one-line error."""
    for action in declared(parser):
        check, value = action.flag.check, getattr(args, action.dest, None)
        if check is None or value is None:
            continue
        for one in value if isinstance(value, list) else [value]:
            check(action.option_strings[0], one)


def split_ratio(flag: str, value: float) -> None:
    check_train_ratio(value, flag)


split_ratio.range = '(0, 1)'


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
