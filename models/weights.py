"""Reading checkpoint files safely (weights_only) and loading GFNet (or timm early-exit) weights with clear errors."""
import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn

from errors import GFNetDynnError
from models.gfnet import checkpoint_filter_fn
from models.timm_dynn import TimmDynn, checkpoint_filter_fn as timm_dynn_filter_fn

_logger = logging.getLogger(__name__)

# Parameters a checkpoint may lack: they start fresh (a backbone checkpoint has no exits; a head of
# another class count was dropped by the filter).
_FRESH_OK = ('head.', 'intermediate_heads.', 'gates.')


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
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # torch raises many types for a bad file; all mean "not a checkpoint"
        raise GFNetDynnError(f'{path} is not a readable PyTorch checkpoint ({type(error).__name__}); '
                             f'pass a .pth file written by torch.save') from error
    if not isinstance(checkpoint, dict):
        raise GFNetDynnError(f'{path} holds a {type(checkpoint).__name__}, not a state dict or a dict with '
                             f"'model'; pass a checkpoint written by this tool or an official GFNet one")
    return checkpoint


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
