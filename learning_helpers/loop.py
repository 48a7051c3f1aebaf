"""The training step every stage shares, around the runtime's batch iterator: device transfer, mixed precision,
the non-finite guard and its roll-back, the optimizer step, where Ctrl-C stopped."""
from typing import Callable, Iterable

import torch

from learning_helpers.optim import NonFiniteGuard, StepUndo
from runtime.batches import batches
from runtime.distributed import all_reduce_sum, autocast, sync_gradients

# step_loss(step, images, targets) -> (loss, stats): the stage's forward pass; `stats` is added to the
# epoch's totals when the step is taken (a skipped non-finite step adds nothing)
StepLoss = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class TrainingStopped(KeyboardInterrupt):
    """Ctrl-C inside a training epoch; its text says where ('backbone epoch 3, batch 7', counted from 0)."""


def train_batches(loader, step_loss: StepLoss, optimizer: torch.optim.Optimizer, *, desc: str, epoch: int,
                  device: torch.device, guard: NonFiniteGuard, sync: Iterable[torch.nn.Parameter] = (),
                  num_stats: int, max_batches: int | None = None, amp: bool = False,
                  clip_grad: float = 0.0) -> torch.Tensor:
    """One epoch of optimizer steps; returns the stats summed over batches and processes. `sync`: parameters
    whose gradients are averaged over processes by hand (what DDP does not wrap); clip_grad > 0: the norm of all
    the optimizer's gradients is clipped to it before each step."""
    sync = list(sync)
    trained = [param for group in optimizer.param_groups for param in group['params']]
    totals = torch.zeros(num_stats, device=device)
    undo = StepUndo(optimizer)
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
            if clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(trained, clip_grad)
            undo.save()
            optimizer.step()
            if not guard.keeps(undo.params, epoch, step):
                undo.restore()
                continue
            totals += stats
    except KeyboardInterrupt:
        raise TrainingStopped(f'{desc}, batch {step}') from None
    return all_reduce_sum(totals)
