"""Stage 1: warm up the exit heads on a frozen backbone, freezing each head when it stops improving.

The learning rate stays constant here: the one optimizer of stages 1-2 is shared with joint training, whose
cosine schedule starts when it does (as in the reference)."""
import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from evaluation.exit_cache import collect_exit_outputs, per_exit_accuracy
from learning_helpers.checkpoint import save_checkpoint
from learning_helpers.loop import train_batches
from learning_helpers.losses import ExitDistillation, WarmupLoss
from learning_helpers.optim import NonFiniteGuard, seed_epoch, set_requires_grad
from learning_helpers.stage_common import (RunConfig, StageSummary, StartPoint, log_epoch, save_epoch,
                                           training_checkpoint)
from models.early_exit_net import EarlyExitNetwork
from runtime.distributed import is_main_process


@dataclass(frozen=True)
class WarmupConfig:
    max_epochs: int  # --max_warmup_epoch (at most --num_epoch)
    patience: int
    heads_dir: Path  # checkpoint_warmup/...: a record of each exit head's best weights
    distillation: ExitDistillation | None = None  # --exit-distill (None: the reference)


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


def train_one_epoch(model: EarlyExitNetwork, loader, optimizer, device: torch.device, epoch: int, guard: NonFiniteGuard,
                    run: RunConfig, distillation: ExitDistillation | None = None) -> dict:
    """Train the exit heads on features the frozen backbone computes without autograd."""
    model.eval()  # frozen backbone: no drop path, no dropout
    criterion = WarmupLoss(distillation)

    def step_loss(_step: int, images: torch.Tensor, targets: torch.Tensor):
        with torch.no_grad():
            pooled = model.forward_pooled(images)  # (E, B, D), or E of (B, D_k) when exit widths differ
        loss = criterion(model.heads_and_gates([p.float() for p in pooled]).logits.float(), targets)
        return loss, torch.stack([loss.detach().float(), torch.tensor(1.0, device=device)])

    loss_sum, steps = train_batches(loader, step_loss, optimizer, desc=f'warm-up epoch {epoch}', epoch=epoch,
                                    device=device, guard=guard, sync=model.intermediate_heads.parameters(),
                                    num_stats=2, max_batches=run.max_batches, amp=run.amp).tolist()
    return {'loss': loss_sum / max(steps, 1)}


def evaluate(model: EarlyExitNetwork, loader, device: torch.device, run: RunConfig) -> dict:
    """Validation accuracy (%) of every exit, first to final."""
    cache = collect_exit_outputs(model, loader, device, max_batches=run.max_batches, amp=run.amp)
    return {'exit_acc': per_exit_accuracy(cache)}


def run_warmup_stage(model: EarlyExitNetwork, train_loader, val_loader, optimizer, scheduler, device: torch.device,
                     run: RunConfig, warmup: WarmupConfig, writer: SummaryWriter | None,
                     start: StartPoint) -> StageSummary:
    """Warm up until every exit is frozen or max_epochs pass; next_epoch is where joint training starts. Ends
    with every exit at its best weights and all exits trainable again. `scheduler` is saved, not stepped."""
    patience = ExitPatience(len(model.exit_positions), warmup.patience)
    if start.stage == 'warmup':
        patience.load_state_dict(start.state['warmup'])
    guard = NonFiniteGuard(run.max_nan_skips)
    set_requires_grad(model, False)
    for k, head in enumerate(model.intermediate_heads):
        set_requires_grad(head, not patience.frozen[k])
    epoch, accuracies = start.epoch, [start.best_acc]
    for epoch in range(start.epoch, warmup.max_epochs):
        if patience.all_frozen:
            break
        started = time.perf_counter()
        seed_epoch(run.seed, epoch, train_loader)
        stats = train_one_epoch(model, train_loader, optimizer, device, epoch, guard, run, warmup.distillation)
        accuracies = evaluate(model, val_loader, device, run)['exit_acc']
        _update_patience(model, patience, accuracies[:-1], warmup.heads_dir)
        lr = optimizer.param_groups[0]['lr']
        save_epoch(run.checkpoint_dir, training_checkpoint(
            'warmup', model, run, epoch=epoch, acc=accuracies[-1], best_acc=accuracies[-1], optimizer=optimizer,
            scheduler=scheduler, warmup=patience.state_dict()), best=False)
        log_epoch(writer, 'warmup', epoch, {'loss': stats['loss'], 'exit_acc': accuracies})
        if is_main_process():
            frozen = ''.join('F' if f else '.' for f in patience.frozen)
            print(f"warm-up epoch {epoch} | loss {stats['loss']:.4f} | exit acc "
                  f"{' '.join(f'{a:.1f}' for a in accuracies)} | frozen {frozen} | lr {lr:.2e} | "
                  f'{time.perf_counter() - started:.1f} s', flush=True)
    else:
        epoch = warmup.max_epochs
    for k, head in enumerate(model.intermediate_heads):
        if not patience.frozen[k] and patience.best_state[k] is not None:
            head.load_state_dict(patience.best_state[k])
        set_requires_grad(head, True)
    return StageSummary(epoch, accuracies[-1], accuracies[-1], None, run.checkpoint_dir / 'last.pth')


def _update_patience(model: EarlyExitNetwork, patience: ExitPatience, accuracies: list[float], heads_dir: Path) -> None:
    """Record the epoch's exit accuracies: an improved head is kept (and written to heads_dir), a head out of
    patience goes back to its best weights and freezes."""
    improved, froze = patience.update(accuracies, model.intermediate_heads)
    if is_main_process():
        for k in improved:
            save_checkpoint(heads_dir / f'{k}.pth', {'model': patience.best_state[k]})
    for k in froze:
        model.intermediate_heads[k].load_state_dict(patience.best_state[k])
        set_requires_grad(model.intermediate_heads[k], False)
