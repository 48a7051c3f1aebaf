"""Reading checkpoint files safely (weights_only) and loading GFNet (or timm early-exit) weights with clear errors."""
import argparse
import logging
import pickle
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn

from errors import GFNetDynnError
from models.gfnet import checkpoint_filter_fn
from models.timm_dynn import TimmDynn, checkpoint_filter_fn as timm_dynn_filter_fn

_logger = logging.getLogger(__name__)

# Parameters a checkpoint may lack: they start fresh (a backbone checkpoint has no exits; a head of
# another class count was dropped by the filter).
_FRESH_OK = ('head.', 'intermediate_heads.', 'gates.')


# What other training scripts put beside the weights and is plain data all the same: GFNet's and DeiT's main.py
# store their argparse.Namespace, and numpy scalars and arrays turn up in metrics. Allowed in weights_only loading.
FOREIGN_PLAIN_DATA = [argparse.Namespace, np.dtype, np.ndarray, np._core.multiarray.scalar,
                      np._core.multiarray._reconstruct,
                      *(getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith('DType'))]


class LoadReport(NamedTuple):
    loaded: list[str]
    fresh: list[str]  # kept the model's own initialisation
    ignored: list[str]  # in the checkpoint, not in the model (exits loaded into a plain GFNet)


def read_checkpoint(path: str | Path, wanted: str = 'a .pth file a run wrote') -> dict:
    """torch.load with weights_only=True: a checkpoint is data, it cannot run code on load. `wanted`: what the
    job needs, for the error when the file does not exist."""
    path = Path(path)
    if not path.is_file():
        raise GFNetDynnError(f'checkpoint {path} does not exist or is not a file; pass {wanted}')
    try:
        with torch.serialization.safe_globals(FOREIGN_PLAIN_DATA):
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        code = re.search(r'GLOBAL (\S+)', str(error))
        if code is None:  # no foreign global named: a damaged file or another format, not code
            raise GFNetDynnError(f'{path} is not a readable PyTorch checkpoint (UnpicklingError); pass a .pth file '
                                 f'written by torch.save') from error
        raise GFNetDynnError(f'{path} holds pickled code or objects ({code.group(1)}), '
                             f'which could run when loaded, so it is not read; re-save its weights as plain data '
                             f"(torch.save({{'model': model.state_dict()}}, path))") from None
    except Exception as error:  # torch raises many types for a bad file; all mean "not a checkpoint"
        raise GFNetDynnError(f'{path} is not a readable PyTorch checkpoint ({type(error).__name__}); '
                             f'pass a .pth file written by torch.save') from error
    if not isinstance(checkpoint, dict):
        raise GFNetDynnError(f'{path} holds a {type(checkpoint).__name__}, not a state dict or a dict with '
                             f"'model'; pass a checkpoint written by this tool or an official GFNet one")
    check_finite_weights(checkpoint.get('model', checkpoint), path)
    return checkpoint


def non_finite_tensors(tree, prefix: str = '') -> list[str]:
    """The keys (dotted) of every floating tensor holding NaN or inf in nested dicts and lists."""
    if torch.is_tensor(tree):
        return [prefix] if tree.is_floating_point() and not torch.isfinite(tree).all() else []
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [key for name, value in items for key in non_finite_tensors(value, f'{prefix}.{name}'.lstrip('.'))]


def check_finite_weights(state, path: str | Path) -> None:
    """A checkpoint whose weights hold NaN or inf (a diverged run) is refused: its results would be meaningless."""
    bad = non_finite_tensors(state) if isinstance(state, dict) else []
    if bad:
        raise GFNetDynnError(f'{path} holds non-finite weights ({_key_list(bad, 3)}): the run that wrote it diverged; '
                             f'use an earlier checkpoint of it, or train again with a lower --lr')


def _key_list(keys: list[str], limit: int = 6) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f' and {len(keys) - limit} more' if len(keys) > limit else '')


def load_state(model: nn.Module, checkpoint: dict, source: str = 'checkpoint') -> LoadReport:
    """Load a `{'model': state_dict}` dict or a bare state dict into `model` (strict, after filtering)."""
    filter_fn, fresh_ok = checkpoint_filter_fn, _FRESH_OK
    if isinstance(model, TimmDynn):  # the backbone's keys under 'backbone.', its classifier named by timm
        filter_fn, fresh_ok = timm_dynn_filter_fn, _FRESH_OK + model.classifier_prefixes
    try:
        state = filter_fn(checkpoint, model)
    except ValueError as error:
        raise GFNetDynnError(f'{source}: {error}') from error
    target = model.state_dict()
    ignored = [k for k in state if k not in target and k.startswith(fresh_ok)]
    unexpected = [k for k in state if k not in target and k not in ignored]
    mismatched = [f'{k} {tuple(v.shape)} vs {tuple(target[k].shape)}' for k, v in state.items()
                  if k in target and v.shape != target[k].shape]
    missing = [k for k in target if k not in state]
    fresh = [k for k in missing if k.startswith(fresh_ok)]
    absent = [k for k in missing if k not in fresh]
    problems = [f'{label}: {_key_list(keys)}' for label, keys in
                (('shape mismatch', mismatched), ('missing', absent), ('unexpected', unexpected)) if keys]
    if problems:
        raise GFNetDynnError(f"{source} does not fit this model ({'; '.join(problems)}); pass a checkpoint "
                             f'of the same --arch and --patch-size')
    state = {k: v for k, v in state.items() if k not in ignored}
    model.load_state_dict({**{k: target[k] for k in fresh}, **state}, strict=True)
    if fresh:
        _logger.info('%s: %d tensors start fresh (%s)', source, len(fresh), _key_list(fresh, 3))
    return LoadReport(sorted(state), fresh, ignored)


def load_checkpoint(model: nn.Module, path: str | Path) -> LoadReport:
    """Read `path` safely and load its weights into `model`, resizing grids and skipping foreign heads."""
    return load_state(model, read_checkpoint(path), source=str(path))
