"""Optimizers, the dynn stages' cosine schedule, per-epoch seeding, and the step that skips non-finite losses."""
import logging
import math
import random
from functools import partial

import numpy as np
import torch

from errors import GFNetDynnError
from runtime.distributed import all_reduce_sum

_logger = logging.getLogger(__name__)


def build_optimizer(param_groups: list[dict], name: str, weight_decay: float, *,
                    lr: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, the reference's for the dynn stages) or AdamW."""
    if name == 'sgd':
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
    return torch.optim.AdamW(param_groups, lr=lr, weight_decay=weight_decay)


def restore_optimizer(optimizer: torch.optim.Optimizer, scheduler, checkpoint: dict, source: str) -> None:
    """Load a --resume checkpoint's optimizer and schedule; a checkpoint whose parameter groups differ (written
    by an older version of this tool) is a one-line error."""
    try:
        optimizer.load_state_dict(checkpoint['optimizer'])
    except ValueError as error:
        raise GFNetDynnError(f'{source}: its optimizer state does not fit this version ({error}); start the stage '
                             f'again from the previous stage\'s best.pth') from error
    scheduler.load_state_dict(checkpoint['scheduler'])


def lr_factor(epoch: int, *, total_epochs: int, min_ratio: float, offset: int) -> float:
    """Multiplier of every group's base lr at absolute epoch `offset + epoch`: cosine from 1 down to min_ratio
    at total_epochs."""
    progress = min(1.0, (epoch + offset) / max(total_epochs, 1))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_epochs: int, min_ratio: float, *,
                    start_epoch: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine annealing over the run's absolute epochs, as a factor of each group's lr, so a group at
    lr * transfer-ratio keeps its ratio and a later stage (start_epoch > 0) continues the same curve.
    Step once per epoch."""
    factor = partial(lr_factor, total_epochs=total_epochs, min_ratio=min_ratio, offset=start_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def seed_epoch(seed: int, epoch: int, loader: torch.utils.data.DataLoader) -> None:
    """Reseed every RNG from (seed, epoch): an epoch's shuffle, augmentation and dropout then do not depend
    on what ran before it, which is what makes --resume reproduce an uninterrupted run."""
    epoch_seed = seed * 1000 + epoch
    random.seed(epoch_seed)
    np.random.seed(epoch_seed % 2**32)
    torch.manual_seed(epoch_seed)
    if loader.generator is not None:
        loader.generator.manual_seed(epoch_seed)
    for part in (loader.sampler, loader.dataset):  # the shuffle of a distributed sampler, the augmentation seeds
        if hasattr(part, 'set_epoch'):
            part.set_epoch(epoch)


def any_non_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether any element of `tensors` is NaN or inf, as a bool tensor: their L2 norms first (one cheap pass; NaN
    and inf carry into a norm), then, only when a norm is not finite, the exact test (a norm also overflows for
    finite values beyond about 1e19)."""
    if not tensors:
        return torch.tensor(False)
    detached = [t.detach() for t in tensors]
    if bool(torch.isfinite(torch.stack(torch._foreach_norm(detached))).all()):
        return torch.tensor(False, device=detached[0].device)
    return torch.stack([(~torch.isfinite(t)).any() for t in detached]).any()


class NonFiniteGuard:
    """Skips optimizer steps whose loss is NaN or inf, and rolls back steps that leave a weight NaN or inf; too
    many in a row stops the run with a clear error."""

    def __init__(self, max_skips: int):
        self.max_skips = max_skips
        self.in_a_row = 0

    def allows(self, loss: torch.Tensor, epoch: int, batch: int) -> bool:
        """True if the step may proceed (epoch and batch counted from 0, like the epoch lines). One host sync
        per step, the price of never stepping on NaN. Under torchrun the ranks decide together: a rank that
        skipped alone would leave the others waiting in the gradient all-reduce."""
        return self._judge((~torch.isfinite(loss.detach())).any(), f'non-finite loss ({loss.item()} on this '
                           f'process)', 'step skipped', epoch, batch, taken=False)

    def keeps(self, params: list[torch.Tensor], epoch: int, batch: int) -> bool:
        """True if every weight the step changed is finite (the step is taken: the count in a row restarts);
        False: the caller rolls the step back."""
        return self._judge(any_non_finite(params), 'non-finite weights after the step', 'step rolled back', epoch,
                           batch, taken=True)

    def _judge(self, non_finite: torch.Tensor, what: str, action: str, epoch: int, batch: int, taken: bool) -> bool:
        if all_reduce_sum(non_finite.float()).item() == 0:
            self.in_a_row = 0 if taken else self.in_a_row
            return True
        self.in_a_row += 1
        _logger.warning('%s at epoch %d batch %d: %s (%d in a row)', what, epoch, batch, action, self.in_a_row)
        if self.in_a_row > self.max_skips:
            raise GFNetDynnError(f'the loss or the weights were non-finite for {self.in_a_row} batches in a row, '
                                 f'more than --max-nan-skips {self.max_skips} (epoch {epoch}, batch {batch}); '
                                 f'lower --lr (and --gate-lr) or check the data; the last good checkpoint is kept')
        return False


class StepUndo:
    """The weights a step is about to change and their optimizer state, copied before it (`save`) to put back when
    the step leaves a weight non-finite (`restore`: the last finite state). The copies go into buffers kept across
    steps: allocating a copy of every weight and moment each step cost a ResNet-50 step 14 %."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.params: list[torch.Tensor] = []
        self._weights: dict[torch.Tensor, torch.Tensor] = {}
        self._states: dict[torch.Tensor, dict | None] = {}  # None: the parameter had no optimizer state yet

    @torch.no_grad()
    def save(self) -> None:
        self.params = [p for group in self.optimizer.param_groups for p in group['params'] if p.grad is not None]
        for param in self.params:
            self._weights[param] = _copy_into(self._weights.get(param), param)
            state, kept = self.optimizer.state.get(param), self._states.get(param) or {}
            self._states[param] = {key: _copy_into(kept.get(key), value) if torch.is_tensor(value) else value
                                   for key, value in state.items()} if state else None

    @torch.no_grad()
    def restore(self) -> None:
        for param in self.params:
            param.copy_(self._weights[param])
            saved = self._states[param]
            if saved is None:
                self.optimizer.state.pop(param, None)
                continue
            self.optimizer.state[param] = {key: value.clone() if torch.is_tensor(value) else value
                                           for key, value in saved.items()}


def _copy_into(buffer: torch.Tensor | None, tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s values in `buffer` when it fits, else in a new copy."""
    if buffer is not None and buffer.shape == tensor.shape and buffer.dtype == tensor.dtype and \
            buffer.device == tensor.device:
        return buffer.copy_(tensor)
    return tensor.detach().clone()


def set_requires_grad(module: torch.nn.Module, flag: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(flag)
