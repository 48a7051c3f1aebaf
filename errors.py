"""The exceptions a user sees, and how an entry point reports them: one line on stderr, a meaningful exit code."""
import argparse
import sys
from typing import Callable

INTERRUPTED = 130  # what a shell reports for a command stopped by Ctrl-C (128 + SIGINT)


class GFNetDynnError(Exception):
    """A mistake the user can fix (bad flag, bad data folder, wrong checkpoint); the message says how."""


class Interrupted(Exception):
    """Ctrl-C: the message says where the work stopped and what was kept."""


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as our one-line user error instead of the whole usage block."""

    def error(self, message: str):
        raise GFNetDynnError(f'{message}; see {self.prog} --help')


def one_line(error: Exception) -> str:
    """The user-facing line of an error; a DataLoader worker re-raises ours with its traceback as the text,
    whose last line holds the original message."""
    last = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    prefix = f'{type(error).__module__}.{type(error).__name__}: '
    return last.removeprefix(prefix).removeprefix(f'{type(error).__name__}: ')


def stopped_while_loading(*_) -> None:
    """SIGINT handler while an entry point imports its libraries: one line and exit 130, not an import traceback."""
    print('interrupted: stopped while starting, before anything was written', file=sys.stderr)
    sys.exit(INTERRUPTED)


def exit_code(run: Callable[[], object]) -> int:
    """Run an entry point's work: 0 when it finishes; a user mistake prints `error: ...` on one line to stderr
    and gives 2; Ctrl-C prints `interrupted: ...` and gives 130; bugs keep their traceback."""
    try:
        run()
    except GFNetDynnError as error:
        print(f'error: {one_line(error)}', file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f'interrupted: {stop}', file=sys.stderr)
        return INTERRUPTED
    except KeyboardInterrupt:
        print('interrupted: stopped before anything was written', file=sys.stderr)
        return INTERRUPTED
    return 0
