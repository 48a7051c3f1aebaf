"""Checkpoint files: plain data only (weights_only loading), written atomically (runtime.atomic)."""
from pathlib import Path

import torch

from errors import GFNetDynnError
from models.weights import non_finite_tensors, read_checkpoint
from runtime.atomic import atomic_write


def save_checkpoint(path: str | Path, payload: dict) -> Path:
    """torch.save `payload` atomically. Keep it plain data (tensors, numbers, str, lists, dicts). A payload with a
    NaN or inf tensor is never written: the file already there (the last finite state) is kept."""
    path = Path(path)
    bad = non_finite_tensors(payload)
    if bad:
        raise GFNetDynnError(f"not writing {path}: {', '.join(bad[:3])} hold NaN or inf (training diverged); "
                             f'{path.name} keeps its last finite state; lower --lr (and --gate-lr)')
    atomic_write(path, lambda stream: torch.save(payload, stream))
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
