"""Checkpoint files: plain data only (weights_only loading), written atomically (temp file, then rename)."""
import glob
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from errors import GFNetDynnError
from models.weights import non_finite_tensors, read_checkpoint


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


def _atomic_write(path: Path, write: Any) -> None:
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


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """torch.save `payload` atomically. Keep it plain data (tensors, numbers, str, lists, dicts). A payload with a
    NaN or inf tensor is never written: the file already there (the last finite state) is kept."""
    path = Path(path)
    bad = non_finite_tensors(payload)
    if bad:
        raise GFNetDynnError(f"not writing {path}: {', '.join(bad[:3])} hold NaN or inf (training diverged); "
                             f'{path.name} keeps its last finite state; lower --lr (and --gate-lr)')
    _atomic_write(path, lambda stream: torch.save(payload, stream))
    return path


def save_json(path: str | Path, data: dict) -> Path:
    """Write JSON atomically."""
    return save_text(path, json.dumps(data, indent=2))


def save_text(path: str | Path, text: str) -> Path:
    """Write text atomically."""
    path = Path(path)
    _atomic_write(path, lambda stream: stream.write(text.encode()))
    return path


def suggested_checkpoint(output_dir: str | Path, pattern: str, what: str, default: Path | None = None) -> str:
    """What to pass where a checkpoint is missing: `what`, with an existing file matching `pattern` under
    OUTPUT/checkpoint/ as the example, else the path a run writes it to by default (said to be the default)."""
    found = sorted(Path(output_dir).glob(f'checkpoint/{pattern}'))
    if found:
        return f'{what}, e.g. {found[0]}'
    return f'{what} (a run writes it to {default} by default)' if default else what


def load_training_checkpoint(path: str | Path, wanted: str = 'a .pth file a run wrote') -> dict:
    """Read a checkpoint this tool wrote, for --resume or --eval; it must carry its stage and args."""
    checkpoint = read_checkpoint(path, wanted)
    missing = [key for key in ('model', 'stage', 'args') if key not in checkpoint]
    if missing:
        raise GFNetDynnError(f"{path} lacks {', '.join(missing)}: it was not written by main_dynn.py; for "
                             f'weights only, pass it as --checkpoint-path instead')
    return checkpoint
