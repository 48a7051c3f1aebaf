"""The one atomic file writer: a temp file in the same folder, flushed to disk, renamed over the target, so a
crash leaves the old file whole. Checkpoints, JSON outputs and ONNX exports all write through it."""
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def _umask_mode() -> int:
    """The permissions a plain open() would give a new file: 0o666 minus the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _writer_alive(temp: Path) -> bool:
    """Whether the process that owns temp file `.NAME.PID.RANDOM.tmp` still runs (a foreign name counts as
    alive: it is left alone)."""
    try:
        pid = int(temp.name.split('.')[-3])
        os.kill(pid, 0)
    except (ValueError, IndexError):
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through a temp file in the same folder and rename it over `path`: a crash leaves the old file.
    The temp name holds the writer's PID, so that cleaning up after a killed writer never touches the live
    temp file of another process writing the same path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.{os.getpid()}.', suffix='.tmp')
    try:
        with os.fdopen(handle, 'wb') as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(tmp_name, _umask_mode())  # mkstemp makes 0600; outputs get the usual permissions
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    # A writer killed mid-write (SIGKILL) leaves its temp file behind; the next good write of `path` removes it.
    for stale in path.parent.glob(f'.{glob.escape(path.name)}.*.tmp'):
        if not _writer_alive(stale):
            stale.unlink(missing_ok=True)


def save_json(path: str | Path, data: dict) -> Path:
    """Write JSON atomically."""
    return save_text(path, json.dumps(data, indent=2))


def save_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    path = Path(path)
    atomic_write(path, lambda stream: stream.write(text.encode()))
    return path
