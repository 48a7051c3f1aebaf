"""Stage 0: train a plain GFNet (or any timm classifier) on the dataset, optionally distilled from a teacher."""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from timm.data import Mixup
from torch.utils.tensorboard import SummaryWriter

from learning_helpers.loop import train_batches
from learning_helpers.losses import DistillationLoss
from learning_helpers.optim import NonFiniteGuard, seed_epoch
from learning_helpers.stage_common import (RunConfig, StageSummary, StartPoint, log_epoch, save_epoch,
                                           training_checkpoint)
from runtime.batches import batches
from runtime.distributed import all_reduce_sum, autocast, is_main_process, unwrap


def _student_outputs(model: nn.Module, images: torch.Tensor, criterion: DistillationLoss):
    """Logits, and the token maps frequency distillation compares (None otherwise). The maps are caught by
    forward hooks so the forward still goes through `model`: under torchrun that is the DDP wrapper, whose
    backward averages the gradients over ranks."""
    if criterion.kind != 'freq':
        return model(images), None
    maps = []
    blocks = unwrap(model).blocks
    hooks = [blocks[i].register_forward_hook(lambda _module, _inputs, output: maps.append(output))
             for i in sorted(set(criterion.frequency.student_depths))]  # the blocks forward_tokens collects
    try:
        logits = model(images)
    finally:
        for hook in hooks:
            hook.remove()
    return logits, maps


@dataclass(frozen=True)
class BackboneStep:
    """What stage 0 does to each batch besides the loss: timm's Mixup/CutMix (None: off) and gradient clipping."""
    mixup: Mixup | None = None
    clip_grad: float = 0.0


def train_one_epoch(model: nn.Module, criterion: DistillationLoss, loader, optimizer, device: torch.device,
                    epoch: int, guard: NonFiniteGuard, run: RunConfig, step: BackboneStep) -> dict[str, float]:
    """One pass over the training set; returns mean loss and accuracy (%, under Mixup against each mixed
    target's larger share)."""
    model.train()

    def step_loss(_step: int, images: torch.Tensor, targets: torch.Tensor):
        if step.mixup is not None:
            images, targets = step.mixup(images, targets)  # targets (B, classes); the teacher sees the mixed images
        logits, maps = _student_outputs(model, images, criterion)
        loss = criterion(images, logits, targets, maps, getattr(unwrap(model), 'grid_size', None))  # None: no GFNet
        labels = targets.argmax(-1) if targets.ndim == 2 else targets
        count = torch.tensor(len(targets), device=device)
        return loss, torch.stack([loss.detach().float() * count, (logits.argmax(-1) == labels).sum(), count])

    # freq's projections live outside the DDP-wrapped model: their gradients are averaged by hand
    sync = criterion.frequency.parameters() if criterion.frequency is not None else ()
    loss_sum, correct, seen = train_batches(loader, step_loss, optimizer, desc=f'backbone epoch {epoch}',
                                            epoch=epoch, device=device, guard=guard, sync=sync, num_stats=3,
                                            max_batches=run.max_batches, amp=run.amp,
                                            clip_grad=step.clip_grad).tolist()
    return {'loss': loss_sum / max(seen, 1), 'acc': 100 * correct / max(seen, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, run: RunConfig) -> dict[str, float]:
    """Validation loss and top-1 accuracy (%) of a plain classifier."""
    model.eval()
    totals = torch.zeros(3, device=device)
    for images, targets in batches(loader, 'validation', run.max_batches):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, run.amp):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), targets, reduction='sum')
        totals += torch.stack([loss, (logits.argmax(-1) == targets).sum(), torch.tensor(len(targets), device=device)])
    loss_sum, correct, seen = all_reduce_sum(totals).tolist()
    return {'loss': loss_sum / max(seen, 1), 'acc': 100 * correct / max(seen, 1)}


def run_backbone_stage(model: nn.Module, criterion: DistillationLoss, train_loader, val_loader, optimizer,
                       scheduler, device: torch.device, run: RunConfig, writer: SummaryWriter | None,
                       start: StartPoint, step: BackboneStep = BackboneStep()) -> StageSummary:
    """Epochs start.epoch..num_epochs-1: train, evaluate, step the schedule (timm's, told the next epoch), save,
    log."""
    guard = NonFiniteGuard(run.max_nan_skips)
    best_acc, val_stats = start.best_acc, {'acc': start.best_acc}
    if is_main_process() and start.epoch < run.num_epochs:
        print(f'backbone training: epochs {start.epoch}-{run.num_epochs - 1} (counted from 0)')
    for epoch in range(start.epoch, run.num_epochs):
        started = time.perf_counter()
        seed_epoch(run.seed, epoch, train_loader)
        train_stats = train_one_epoch(model, criterion, train_loader, optimizer, device, epoch, guard, run, step)
        # unwrapped: evaluation needs no gradient sync, and the ranks' validation shards may differ in length
        val_stats = evaluate(unwrap(model), val_loader, device, run)
        lr = optimizer.param_groups[0]['lr']
        scheduler.step(epoch + 1)
        is_best = val_stats['acc'] > best_acc or epoch == 0  # epoch 0 always writes best.pth, even at 0%
        best_acc = max(best_acc, val_stats['acc'])
        save_epoch(run.checkpoint_dir, training_checkpoint(
            'backbone', unwrap(model), run, epoch=epoch, acc=val_stats['acc'], best_acc=best_acc,
            optimizer=optimizer, scheduler=scheduler, criterion=criterion.learned_state_dict()), best=is_best)
        log_epoch(writer, 'backbone', epoch, {'train_loss': train_stats['loss'], 'train_acc': train_stats['acc'],
                                              'val_loss': val_stats['loss'], 'val_acc': val_stats['acc'], 'lr': lr})
        if is_main_process():
            print(f"backbone epoch {epoch} | loss {train_stats['loss']:.4f} | train acc {train_stats['acc']:.2f} | "
                  f"val acc {val_stats['acc']:.2f} (best {best_acc:.2f}) | lr {lr:.2e} | "
                  f'{time.perf_counter() - started:.1f} s', flush=True)
    return StageSummary(run.num_epochs, val_stats['acc'], best_acc, run.checkpoint_dir / 'best.pth',
                        run.checkpoint_dir / 'last.pth')
