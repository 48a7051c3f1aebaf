"""--config FILE: a YAML mapping of flag values read before the command line, as timm's train.py reads its
config; the command line wins.

The file's values become command-line tokens placed before the user's own, so every value passes the same
type, choice, range and job checks as a typed flag, a later token overrides an earlier one, and the run
records the resolved values (vars(args)), never the file.
"""
import argparse
from pathlib import Path

import yaml

from errors import GFNetDynnError

CONFIG_FLAG = '--config'


def config_path(argv: list[str]) -> str | None:
    """The FILE of the last `--config FILE` (or `--config=FILE`) in argv, None without one."""
    path = None
    for i, token in enumerate(argv):
        if token == CONFIG_FLAG:
            if i + 1 >= len(argv):
                raise GFNetDynnError(f'argument {CONFIG_FLAG}: expected one argument')
            path = argv[i + 1]
        elif token.startswith(f'{CONFIG_FLAG}='):
            path = token.partition('=')[2]
    return path


def read_config(path: str) -> dict:
    """The file's mapping of keys to values; a missing, unreadable or non-mapping file is one line."""
    file = Path(path)
    if not file.is_file():
        raise GFNetDynnError(f'{CONFIG_FLAG} {path}: no such file; pass a YAML file of flag values '
                             f'(recipes/small_data.yaml is one)')
    try:
        values = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise GFNetDynnError(f'{CONFIG_FLAG} {path} is not valid YAML: {" ".join(str(error).split())}') from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise GFNetDynnError(f'{CONFIG_FLAG} {path} must hold a mapping of flag names to values (lr: 0.01), '
                             f'not a {type(values).__name__}')
    return values


def _flag_spellings(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Every key a config may use (a flag's dest, or any of its spellings without the leading dashes) -> its
    action; --help and --config itself are not values."""
    spellings = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in ('help', 'config'):
            continue
        spellings[action.dest] = action
        spellings.update({option.lstrip('-'): action for option in action.option_strings})
    return spellings


def _tokens(key: str, value, action: argparse.Action, path: str) -> list[str]:
    """One config entry as the command-line tokens that give it: `--flag v1 v2`, a bare switch, or nothing."""
    flag = action.option_strings[0]
    if action.nargs == 0:  # a switch (store_true)
        if not isinstance(value, bool):
            raise GFNetDynnError(f'{CONFIG_FLAG} {path}: {key} is a switch; give it true or false, not {value!r}')
        return [flag] if value else []
    if value is None:  # the flag's default
        return []
    values = value if isinstance(value, list) else [value]
    return [flag, *(str(v) for v in values)]


def expand_config(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """argv with the --config file's values put before it as flags; argv unchanged without --config. An unknown
    key is the same one-line error as an unknown flag."""
    path = config_path(argv)
    if path is None:
        return argv
    spellings = _flag_spellings(parser)
    tokens = []
    for key, value in read_config(path).items():
        action = spellings.get(str(key).lstrip('-'))
        if action is None:
            raise GFNetDynnError(f'unrecognized arguments: {key} (a key of {CONFIG_FLAG} {path}); see {parser.prog} '
                                 f'--help for the flags, written as their names (num_epoch) or spellings (min-lr)')
        tokens += _tokens(str(key), value, action, path)
    return tokens + argv
