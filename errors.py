"""The one exception type for user mistakes, and how an entry point reports it: one line, exit code 2."""
import sys
from typing import Callable


class GFNetDynnError(Exception):
    """A mistake the user can fix (bad flag, bad data folder, wrong checkpoint); the message says how."""


def one_line(error: GFNetDynnError) -> str:
    """The user-facing line of an error; a DataLoader worker re-raises ours with its traceback as the text,
    whose last line holds the original message."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    prefix = f'{type(error).__module__}.{type(error).__name__}: '
    return last.removeprefix(prefix).removeprefix(f'{type(error).__name__}: ')


def exit_code(run: Callable[[], object]) -> int:
    """Run an entry point's work: 0 when it finishes; a user mistake prints `error: ...` on one line to stderr
    and gives 2; bugs keep their traceback."""
    try:
        run()
    except GFNetDynnError as error:
        print(f'error: {one_line(error)}', file=sys.stderr)
        return 2
    return 0
