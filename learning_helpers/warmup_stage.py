"""Stage 1: warm up the exit heads on a frozen backbone, freezing each head when it stops improving.

The learning rate stays constant here: the one optimizer of stages 1-2 is shared with joint training, whose
cosine schedule starts when it does (as in the reference)."""
import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from learning_helpers.checkpoint import save_checkpoint
from learning_helpers.distributed import is_main_process
from learning_helpers.exit_cache import collect_exit_outputs, per_exit_accuracy
from learning_helpers.loop import train_batches
from learning_helpers.losses import WarmupLoss
from learning_helpers.optim import NonFiniteGuard, seed_epoch, set_requires_grad
from models.gfnet_dynn import GFNetDynn

_logger = logging.getLogger(__name__)


@dataclass
class WarmupStageConfig:
    max_epochs: int  # --max_warmup_epoch
    patience: int
    seed: int
    warmup_dir: Path  # checkpoint_warmup/{dataset}_{arch}_{size}: best weights of each exit head
    checkpoint_dir: Path
    run_args: dict
    max_batches: int | None = None
    amp: bool = False
    max_nan_skips: int = 5


class ExitPatience:
    """Per-exit best validation accuracy, best weights and patience; freezes an exit after `patience`
    epochs without improvement."""

    def __init__(self, num_heads: int, patience: int):
        self.patience = patience
        self.best_acc = [-1.0] * num_heads
        self.waited = [0] * num_heads
        self.frozen = [False] * num_heads
        self.best_state: list[dict | None] = [None] * num_heads

    def update(self, accuracies: list[float], heads: torch.nn.ModuleList) -> tuple[list[int], list[int]]:
        """Record one epoch's accuracies; returns (exits that improved, exits that froze now)."""
        improved, froze = [], []
        for k, acc in enumerate(accuracies):
            if self.frozen[k]:
                continue
            if acc > self.best_acc[k]:
                self.best_acc[k], self.waited[k] = acc, 0
                self.best_state[k] = copy.deepcopy(heads[k].state_dict())
                improved.append(k)
            else:
                self.waited[k] += 1
                if self.waited[k] >= self.patience:
                    self.frozen[k] = True
                    froze.append(k)
        return improved, froze

    @property
    def all_frozen(self) -> bool:
        return all(self.frozen)

    def state_dict(self) -> dict:
        return {'best_acc': self.best_acc, 'waited': self.waited, 'frozen': self.frozen,
                'best_state': self.best_state}

    def load_state_dict(self, state: dict) -> None:
        self.best_acc, self.waited = list(state['best_acc']), list(state['waited'])
        self.frozen, self.best_state = list(state['frozen']), list(state['best_state'])


def warmup_train_one_epoch(model: GFNetDynn, loader, optimizer, device: torch.device, epoch: int,
                           guard: NonFiniteGuard, *, max_batches: int | None = None, amp: bool = False) -> dict:
    """Train the exit heads on features the frozen backbone computes without autograd."""
    model.eval()  # frozen backbone: no drop path, no dropout
    criterion = WarmupLoss()

    def step_loss(_step: int, images: torch.Tensor, targets: torch.Tensor):
        with torch.no_grad():
            pooled = model.forward_pooled(images)  # (E, B, D)
        loss = criterion(model.heads_and_gates(pooled.float()).logits.float(), targets)
        return loss, torch.stack([loss.detach().float(), torch.tensor(1.0, device=device)])

    loss_sum, batches = train_batches(loader, step_loss, optimizer, desc=f'warm-up epoch {epoch}', epoch=epoch,
                                      device=device, guard=guard, sync=model.intermediate_heads.parameters(),
                                      num_stats=2, max_batches=max_batches, amp=amp).tolist()
    return {'loss': loss_sum / max(batches, 1)}


def _save_head(path: Path, state: dict) -> None:
    if is_main_process():
        save_checkpoint(path, {'model': state})


def run_warmup_stage(model: GFNetDynn, train_loader, val_loader, optimizer, scheduler, device: torch.device,
                     config: WarmupStageConfig, writer: SummaryWriter | None, patience_state: ExitPatience,
                     start_epoch: int = 0) -> int:
    """Warm up until every exit is frozen or max_epochs pass; returns the number of epochs used. Ends with
    every exit at its best weights and all exits trainable again. `scheduler` is saved, not stepped."""
    guard = NonFiniteGuard(config.max_nan_skips)
    set_requires_grad(model, False)
    for k, head in enumerate(model.intermediate_heads):
        set_requires_grad(head, not patience_state.frozen[k])
    epoch = start_epoch
    for epoch in range(start_epoch, config.max_epochs):
        if patience_state.all_frozen:
            break
        started = time.perf_counter()
        seed_epoch(config.seed, epoch, train_loader)
        stats = warmup_train_one_epoch(model, train_loader, optimizer, device, epoch, guard,
                                       max_batches=config.max_batches, amp=config.amp)
        cache, _ = collect_exit_outputs(model, val_loader, device, max_batches=config.max_batches, amp=config.amp)
        accuracies = per_exit_accuracy(cache)
        improved, froze = patience_state.update(accuracies[:-1], model.intermediate_heads)
        for k in improved:
            _save_head(config.warmup_dir / f'{k}.pth', patience_state.best_state[k])
        for k in froze:  # back to its best weights, then frozen
            model.intermediate_heads[k].load_state_dict(patience_state.best_state[k])
            set_requires_grad(model.intermediate_heads[k], False)
        lr = optimizer.param_groups[0]['lr']
        if is_main_process():
            save_checkpoint(config.checkpoint_dir / 'last.pth', {
                'model': model.state_dict(), 'acc': accuracies[-1], 'epoch': epoch, 'stage': 'warmup',
                'args': config.run_args, 'optimizer': optimizer.state_dict(), 'scheduler': scheduler.state_dict(),
                'warmup': patience_state.state_dict()})
            if writer is not None:
                writer.add_scalar('warmup/loss', stats['loss'], epoch)
                for k, acc in enumerate(accuracies):
                    writer.add_scalar(f'warmup/exit{k}_acc', acc, epoch)
            frozen = ''.join('F' if f else '.' for f in patience_state.frozen)
            print(f"warm-up epoch {epoch} | loss {stats['loss']:.4f} | exit acc "
                  f"{' '.join(f'{a:.1f}' for a in accuracies)} | frozen {frozen} | lr {lr:.2e} | "
                  f'{time.perf_counter() - started:.1f} s', flush=True)
    else:
        epoch = config.max_epochs
    for k, head in enumerate(model.intermediate_heads):
        if not patience_state.frozen[k] and patience_state.best_state[k] is not None:
            head.load_state_dict(patience_state.best_state[k])
        set_requires_grad(head, True)
    return epoch
