"""Stage 0: train a plain GFNet on the dataset, optionally distilled from a teacher."""
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.tensorboard import SummaryWriter

from learning_helpers.checkpoint import save_checkpoint
from learning_helpers.distributed import all_reduce_sum, autocast, is_main_process, unwrap
from learning_helpers.loop import batches, train_batches
from learning_helpers.losses import DistillationLoss
from learning_helpers.optim import NonFiniteGuard, seed_epoch

_logger = logging.getLogger(__name__)


@dataclass
class BackboneStageConfig:
    num_epochs: int
    seed: int
    checkpoint_dir: Path
    run_args: dict  # stored in checkpoints so --eval and --resume can rebuild the run
    max_batches: int | None = None  # --barely_train: a few batches per epoch for smoke tests
    amp: bool = False
    max_nan_skips: int = 5


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


def train_one_epoch(model: nn.Module, criterion: DistillationLoss, loader, optimizer, device: torch.device,
                    epoch: int, guard: NonFiniteGuard, *, max_batches: int | None = None,
                    amp: bool = False) -> dict[str, float]:
    """One pass over the training set; returns mean loss and accuracy (%)."""
    model.train()

    def step_loss(_step: int, images: torch.Tensor, targets: torch.Tensor):
        logits, maps = _student_outputs(model, images, criterion)
        loss = criterion(images, logits, targets, maps, unwrap(model).grid_size)
        count = torch.tensor(len(targets), device=device)
        return loss, torch.stack([loss.detach().float() * count, (logits.argmax(-1) == targets).sum(), count])

    # freq's projections live outside the DDP-wrapped model: their gradients are averaged by hand
    sync = criterion.frequency.parameters() if criterion.frequency is not None else ()
    loss_sum, correct, seen = train_batches(loader, step_loss, optimizer, desc=f'backbone epoch {epoch}',
                                            epoch=epoch, device=device, guard=guard, sync=sync, num_stats=3,
                                            max_batches=max_batches, amp=amp).tolist()
    return {'loss': loss_sum / max(seen, 1), 'acc': 100 * correct / max(seen, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, *, max_batches: int | None = None,
             amp: bool = False) -> dict[str, float]:
    """Validation loss and top-1 accuracy (%) of a plain classifier."""
    model.eval()
    totals = torch.zeros(3, device=device)
    for images, targets in batches(loader, 'validation', max_batches):
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        loss = nn.functional.cross_entropy(logits.float(), targets, reduction='sum')
        totals += torch.stack([loss, (logits.argmax(-1) == targets).sum(), torch.tensor(len(targets), device=device)])
    loss_sum, correct, seen = all_reduce_sum(totals).tolist()
    return {'loss': loss_sum / max(seen, 1), 'acc': 100 * correct / max(seen, 1)}


def run_backbone_stage(model: nn.Module, criterion: DistillationLoss, train_loader, val_loader, optimizer,
                       scheduler, device: torch.device, config: BackboneStageConfig, writer: SummaryWriter | None,
                       start_epoch: int = 0, best_acc: float = 0.0) -> dict:
    """Epoch loop: train, evaluate, step the schedule, save best/last, log. Returns the final summary."""
    guard = NonFiniteGuard(config.max_nan_skips)
    val_stats = {'acc': best_acc}
    if is_main_process() and start_epoch < config.num_epochs:
        print(f'backbone training: epochs {start_epoch}-{config.num_epochs - 1} (counted from 0)')
    for epoch in range(start_epoch, config.num_epochs):
        started = time.perf_counter()
        seed_epoch(config.seed, epoch, train_loader)
        train_stats = train_one_epoch(model, criterion, train_loader, optimizer, device, epoch, guard,
                                      max_batches=config.max_batches, amp=config.amp)
        # unwrapped: evaluation needs no gradient sync, and the ranks' validation shards may differ in length
        val_stats = evaluate(unwrap(model), val_loader, device, max_batches=config.max_batches, amp=config.amp)
        lr = optimizer.param_groups[0]['lr']
        scheduler.step()
        is_best = val_stats['acc'] > best_acc or epoch == 0  # epoch 0 always writes best.pth, even at 0%
        best_acc = max(best_acc, val_stats['acc'])
        if is_main_process():
            payload = {'model': unwrap(model).state_dict(), 'acc': val_stats['acc'], 'best_acc': best_acc,
                       'epoch': epoch, 'stage': 'backbone', 'args': config.run_args,
                       'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                       'criterion': criterion.learned_state_dict()}
            # last.pth goes last: once it names this epoch, every file of the epoch is complete, so a run
            # killed at any moment resumes from a consistent set
            if is_best:
                save_checkpoint(config.checkpoint_dir / 'best.pth', payload)
            save_checkpoint(config.checkpoint_dir / 'last.pth', payload)
            if writer is not None:
                for name, value in (('train/loss', train_stats['loss']), ('train/acc', train_stats['acc']),
                                    ('val/loss', val_stats['loss']), ('val/acc', val_stats['acc']), ('lr', lr)):
                    writer.add_scalar(f'backbone/{name}', value, epoch)
            print(f"backbone epoch {epoch} | loss {train_stats['loss']:.4f} | "
                  f"train acc {train_stats['acc']:.2f} | val acc {val_stats['acc']:.2f} (best {best_acc:.2f}) | "
                  f'lr {lr:.2e} | {time.perf_counter() - started:.1f} s', flush=True)
    return {'acc': val_stats['acc'], 'best_acc': best_acc, 'best_path': config.checkpoint_dir / 'best.pth',
            'last_path': config.checkpoint_dir / 'last.pth'}
