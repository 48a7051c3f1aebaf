"""The batch loops every stage shares: one pass over a loader under a progress bar, and the training step
around it (device transfer, mixed precision, the non-finite guard and its roll-back, the optimizer step, where
Ctrl-C stopped)."""
from typing import Callable, Iterable, Iterator

import torch
from tqdm import tqdm

from learning_helpers.distributed import all_reduce_sum, autocast, is_main_process, sync_gradients
from learning_helpers.optim import NonFiniteGuard, StepUndo

# step_loss(step, images, targets) -> (loss, stats): the stage's forward pass; `stats` is added to the
# epoch's totals when the step is taken (a skipped non-finite step adds nothing)
StepLoss = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TrainingStopped(KeyboardInterrupt):
    """Ctrl-C inside a training epoch; its text says where ('backbone epoch 3, batch 7', counted from 0)."""


def batches_per_epoch(loader, max_batches: int | None) -> int:
    return min(len(loader), max_batches or len(loader))


def batches(loader, desc: str, max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's (images, targets) batches under a progress bar, at most max_batches of them."""
    bar = tqdm(loader, desc=desc, leave=False, disable=not is_main_process(),
               total=batches_per_epoch(loader, max_batches))
    for step, batch in enumerate(bar):
        if max_batches is not None and step >= max_batches:
            break
        yield batch


def train_batches(loader, step_loss: StepLoss, optimizer: torch.optim.Optimizer, *, desc: str, epoch: int,
                  device: torch.device, guard: NonFiniteGuard, sync: Iterable[torch.nn.Parameter] = (),
                  num_stats: int, max_batches: int | None = None, amp: bool = False) -> torch.Tensor:
    """One epoch of optimizer steps; returns the stats summed over batches and processes. `sync`: parameters
    whose gradients are averaged over processes by hand (what DDP does not wrap)."""
    sync = list(sync)
    totals = torch.zeros(num_stats, device=device)
    step = 0
    try:
        for step, (images, targets) in enumerate(batches(loader, desc, max_batches)):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast(device, amp):
                loss, stats = step_loss(step, images, targets)
            optimizer.zero_grad(set_to_none=True)
            if not guard.allows(loss, epoch, step):
                continue
            loss.backward()
            sync_gradients(sync)
            undo = StepUndo(optimizer)
            optimizer.step()
            if not guard.keeps(undo.params, epoch, step):
                undo.restore()
                continue
            totals += stats
    except KeyboardInterrupt:
        raise TrainingStopped(f'{desc}, batch {step}') from None
    return all_reduce_sum(totals)
