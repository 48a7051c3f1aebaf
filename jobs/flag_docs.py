"""docs/FLAGS.md, generated from the flags' declarations (`python main_dynn.py --flags-doc > docs/FLAGS.md`): every
flag's type, default, range, jobs, path-ness and --resume policy come from the one add_flag call that declares it."""
import argparse
import sys
from pathlib import Path

from jobs.flags import MAY_CHANGE, TRAINING, Flag, FlagFacts

DOC_PATH = Path(__file__).resolve().parent.parent / 'docs' / 'FLAGS.md'
JOB_ORDER = ('backbone', 'dynn', 'eval', 'export')

INTRO = """# Flags, in full

The README's flag table keeps the flags that matter most; this is the whole table, one per group of
`python main_dynn.py --help`. It is generated from the flags' declarations (`add_flag` in `main_dynn.py`) by
`python main_dynn.py --flags-doc > docs/FLAGS.md`, and a test checks that it is current.

A flag given to a job it does not act in is an error, never ignored (one given at its default value is accepted).
The columns:
- **jobs**: `backbone` is `--stage backbone`, `dynn` is `--stage dynn`, then `--eval` and `--export`; all: every job.
  `export (--quantize)`: with `--export`, read only by `--quantize int8`, for its calibration images.
  `eval, export: the checkpoint's`: the flag shapes the model, which `--eval` and `--export` build as the
  checkpoint has it; given with another value, an error.
- **range**: the values accepted; anything else is a one-line error before any file is written.
- **path**: a file or folder, recorded absolute in checkpoints; `--resume` compares it resolved.
- **--resume**: `fixed` flags are the run's own: `--resume` takes them from its checkpoint, and one given with
  another value is an error; `may change` flags say how a run runs, not what it is, and take the value given.
  `before: X`: a checkpoint written before the flag existed resumes with X (how it trained), not today's default.
"""


def _cell(text: str) -> str:
    return text.replace('|', '\\|').replace('*', '\\*')


def _type(action: argparse.Action) -> str:
    if action.nargs == 0:
        return 'switch'
    kind = {int: 'int', float: 'float'}.get(action.type, 'text')
    if action.nargs == '+':
        return f'{kind}, 1 or more'
    return f'{kind} × {action.nargs}' if isinstance(action.nargs, int) else kind


def _default(action: argparse.Action) -> str:
    if action.nargs == 0:
        return 'on' if action.default is True else 'off'
    if action.default is None or action.default == argparse.SUPPRESS:
        return '-'
    return f'`{action.default}`' if isinstance(action.default, str) else f'{action.default:g}'


def _range(action: argparse.Action) -> str:
    if action.choices is not None:
        return ', '.join(f'`{choice}`' for choice in action.choices)
    return _cell(getattr(action.flag.check, 'range', ''))


def _jobs(flag: Flag) -> str:
    shaped = "; eval, export: the checkpoint's" if flag.from_checkpoint else ''
    if flag.jobs is None:
        return 'all' + shaped
    named = [f'{job} (--quantize)' if job == 'export' and flag.calibration else job
             for job in JOB_ORDER if job in flag.jobs]
    return ', '.join(named) + shaped


def _on_resume(flag: Flag) -> str:
    policy = ('-' if flag.jobs is not None and not flag.jobs & TRAINING else
              'may change' if flag.on_resume == MAY_CHANGE else 'fixed')
    if flag.before_flag is not None:
        policy += f'; before: `{flag.before_flag}`'
    return policy


def _row(action: argparse.Action) -> str:
    names = ' '.join(f'`{name}`' for name in action.option_strings)
    cells = [names, _type(action), _default(action), _range(action), _jobs(action.flag),
             'yes' if action.flag.path else '', _on_resume(action.flag), _cell(action.help or '')]
    return '| ' + ' | '.join(cells) + ' |'


def flags_doc(flags: FlagFacts) -> str:
    """docs/FLAGS.md: the intro, then one table per argument group, each row one add_flag declaration."""
    lines = [INTRO]
    for group in flags.parser._action_groups:
        actions = [action for action in group._group_actions if action.dest in flags.actions]
        if actions:
            lines += [f'## {group.title}', '', '| flag | type | default | range | jobs | path | --resume | help |',
                      '|---|---|---|---|---|---|---|---|', *map(_row, actions), '']
    return '\n'.join(lines)


class PrintFlagsDoc(argparse.Action):
    """--flags-doc: print docs/FLAGS.md for the parser it belongs to, and exit, as --help does."""

    def __init__(self, option_strings, dest, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        sys.stdout.write(flags_doc(FlagFacts(parser)))
        parser.exit()
