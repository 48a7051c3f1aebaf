"""Stage 2: joint training of gates and exits with the accuracy / inference-cost trade-off (JEI-DNN).

Phases alternate every `bilevel_batch_count` batches, gate phase first; the batch counter restarts each epoch
(the reference) or runs across epochs (`--phase-counter global`). Gate phase: gates learn to fire from the
exit that minimises CE + lambda * cost onward. Classifier phase: the exits (and the backbone, at
lr * transfer-ratio, unless frozen) learn with the `--classifier_loss`. docs/METHOD.md has the formulas.
"""
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from learning_helpers.checkpoint import save_checkpoint
from learning_helpers.conformal import conformal_thresholds
from learning_helpers.distributed import is_main_process
from learning_helpers.exit_cache import (best_exit_counts, collect_exit_outputs, conditional_exit_choice,
                                         exit_point, per_exit_accuracy, updated_pos_weight)
from learning_helpers.loop import batches_per_epoch, train_batches
from learning_helpers.losses import CLASSIFIER_LOSSES, GateLoss
from learning_helpers.optim import NonFiniteGuard, seed_epoch, set_requires_grad
from models.gfnet_dynn import GFNetDynn

_logger = logging.getLogger(__name__)

PHASE_COUNTERS = ('epoch', 'global')  # where the gate / classifier phase counter restarts


@dataclass
class JointStageConfig:
    num_epochs: int  # --num_epoch: the run's total, warm-up epochs included
    tradeoff: float  # --ce_ic_tradeoff, lambda
    bilevel_batch_count: int
    phase_counter: str  # 'epoch' (the reference) or 'global'
    gate_objective: str
    classifier_loss: str
    freeze_backbone: bool
    seed: int
    checkpoint_dir: Path
    run_args: dict
    max_batches: int | None = None
    amp: bool = False
    max_nan_skips: int = 5


def dynn_param_groups(model: GFNetDynn, lr: float, transfer_ratio: float) -> list[dict]:
    """The one optimizer of stages 1-2: exit heads and gates at lr, the backbone (final head included) at
    lr * transfer_ratio. Which of them train is set by requires_grad: a parameter without a gradient is
    skipped by the optimizer, weight decay and momentum included."""
    exit_params = list(model.intermediate_heads.parameters()) + list(model.gates.parameters())
    exit_ids = {id(p) for p in exit_params}
    backbone = [p for p in model.parameters() if id(p) not in exit_ids]
    return [{'params': exit_params, 'lr': lr}, {'params': backbone, 'lr': lr * transfer_ratio}]


def set_joint_trainable(model: GFNetDynn, freeze_backbone: bool) -> None:
    """Stage 2 trains exits and gates, and the backbone unless frozen."""
    set_requires_grad(model, not freeze_backbone)
    set_requires_grad(model.intermediate_heads, True)
    set_requires_grad(model.gates, True)


class JointTrainer:
    """One epoch of alternating phases; with the global counter the batch counter survives across epochs."""

    def __init__(self, model: GFNetDynn, optimizer, costs: torch.Tensor, config: JointStageConfig,
                 device: torch.device, global_step: int = 0):
        self.model, self.optimizer, self.costs, self.config, self.device = model, optimizer, costs, config, device
        self.gate_loss = GateLoss(config.tradeoff, config.gate_objective)
        self.classifier_loss = CLASSIFIER_LOSSES[config.classifier_loss]()
        self.global_step = global_step
        # identity gates have nothing to learn: their phase is skipped
        self.gates_learn = any(True for _ in model.gates.parameters())

    def phase(self, step_in_epoch: int) -> str:
        if not self.gates_learn:
            return 'classifier'
        if not any(p.requires_grad for p in self.model.intermediate_heads.parameters()):
            return 'gate'  # every exit frozen: only the gates can learn
        step = self.global_step if self.config.phase_counter == 'global' else step_in_epoch
        return 'gate' if (step // self.config.bilevel_batch_count) % 2 == 0 else 'classifier'

    def gate_step(self, images: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # exits are fixed in this phase; only the gates see gradients
            logits = self.model(images).logits
        gate_logits = torch.stack([gate(exit_logits) for gate, exit_logits in zip(self.model.gates, logits)])
        return self.gate_loss(gate_logits, logits.float(), targets, self.costs, pos_weight)

    def classifier_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # the blocks after the last intermediate exit run only if the loss trains the final exit: parameters
        # outside the loss get no gradient, so weight decay leaves them alone
        through_final = self.classifier_loss.trains_final_exit
        if self.config.freeze_backbone:
            with torch.no_grad():
                pooled = self.model.forward_pooled(images, through_final)
            out = self.model.heads_and_gates(pooled)
        else:
            out = self.model(images, through_final)
        return self.classifier_loss(out.logits.float(), out.gate_logits, targets)

    def train_one_epoch(self, loader, epoch: int, pos_weight: torch.Tensor, guard: NonFiniteGuard) -> dict:
        self.model.train()

        def step_loss(step: int, images: torch.Tensor, targets: torch.Tensor):
            phase = self.phase(step)
            loss = (self.gate_step(images, targets, pos_weight) if phase == 'gate'
                    else self.classifier_step(images, targets))
            self.global_step += 1
            stats = torch.zeros(4, device=self.device)  # gate loss, gate batches, classifier loss, classifier batches
            slot = 0 if phase == 'gate' else 2
            stats[slot], stats[slot + 1] = loss.detach().float(), 1
            return loss, stats

        gate_sum, gate_batches, cls_sum, cls_batches = train_batches(
            loader, step_loss, self.optimizer, desc=f'joint epoch {epoch}', epoch=epoch, device=self.device,
            guard=guard, sync=self.model.parameters(), num_stats=4, max_batches=self.config.max_batches,
            amp=self.config.amp).tolist()
        return {'gate_loss': gate_sum / max(gate_batches, 1), 'classifier_loss': cls_sum / max(cls_batches, 1)}


def validate_joint(model: GFNetDynn, val_loader, device: torch.device, costs: torch.Tensor, flops_share: list[float],
                   tradeoff: float, objective: str, *, max_batches: int | None = None, amp: bool = False) -> dict:
    """One pass over the validation set: gated accuracy under the training-time exit rule, its mean compute
    (a share of the full network's true FLOPs), per-exit accuracy, exit shares, the next pos_weight (from the
    gates' cost vector `costs`) and the conformal thresholds."""
    cache, _ = collect_exit_outputs(model, val_loader, device, max_batches=max_batches, amp=amp)
    chosen = conditional_exit_choice(cache.gate_probs)
    point = exit_point(cache, chosen, flops_share)
    return {'gated_acc': point['accuracy'], 'mean_cost': point['expected_gflops'],
            'exit_share': point['exit_share'], 'exit_acc': per_exit_accuracy(cache),
            'pos_weight': updated_pos_weight(best_exit_counts(cache, costs.cpu(), tradeoff, objective)),
            'conformal': conformal_thresholds(cache, chosen)}


def snapshot_name(epoch: int, tradeoff: float, gated_acc: float) -> str:
    """ckpt_epoch{E}_{lambda}_{acc}.pth as the reference names them: 0-based epoch, accuracy rounded to two
    decimals and printed as Python prints it (ckpt_epoch81_0.75_68.8.pth)."""
    return f'ckpt_epoch{epoch}_{tradeoff}_{round(gated_acc, 2)}.pth'


def _warn_if_only_gates_train(config: JointStageConfig, batches_per_epoch: int, gates_learn: bool) -> None:
    if config.phase_counter == 'epoch' and gates_learn and batches_per_epoch <= config.bilevel_batch_count:
        _logger.warning('an epoch has %d batches, no more than --bilevel_batch_count %d: with the phase counter '
                        'restarting every epoch (the reference) only the gates train in stage 2; lower '
                        '--bilevel_batch_count or pass --phase-counter global to train the exits too',
                        batches_per_epoch, config.bilevel_batch_count)


def run_joint_stage(model: GFNetDynn, train_loader, val_loader, optimizer, scheduler, device: torch.device,
                    costs: torch.Tensor, flops_share: list[float], config: JointStageConfig,
                    writer: SummaryWriter | None, *, start_epoch: int, stage_start_epoch: int,
                    pos_weight: torch.Tensor, global_step: int = 0, best_acc: float = 0.0) -> dict:
    """Epochs start_epoch..num_epochs-1: train, validate, save, rebalance the gates, step the schedule, log.
    `costs` are the exit costs the gates trade against (normalised), `flops_share` the true ones."""
    set_joint_trainable(model, config.freeze_backbone)
    trainer = JointTrainer(model, optimizer, costs.to(device), config, device, global_step)
    _warn_if_only_gates_train(config, batches_per_epoch(train_loader, config.max_batches), trainer.gates_learn)
    guard = NonFiniteGuard(config.max_nan_skips)
    lam = config.tradeoff
    last = {'gated_acc': best_acc}
    if is_main_process() and start_epoch < config.num_epochs:
        print(f'joint training: epochs {start_epoch}-{config.num_epochs - 1} (counted from 0, warm-up included)')
    for epoch in range(start_epoch, config.num_epochs):
        started = time.perf_counter()
        seed_epoch(config.seed, epoch, train_loader)
        stats = trainer.train_one_epoch(train_loader, epoch, pos_weight.to(device), guard)
        last = validate_joint(model, val_loader, device, costs, flops_share, lam, config.gate_objective,
                              max_batches=config.max_batches, amp=config.amp)
        pos_weight = last['pos_weight']
        lr = optimizer.param_groups[0]['lr']
        scheduler.step()  # the cosine schedule moves only after joint epochs, as in the reference
        is_best = last['gated_acc'] > best_acc or epoch == stage_start_epoch  # the first always writes best.pth
        best_acc = max(best_acc, last['gated_acc'])
        if is_main_process():
            payload = {'model': model.state_dict(), 'acc': last['gated_acc'], 'best_acc': best_acc, 'epoch': epoch,
                       'stage': 'joint', 'args': config.run_args, 'optimizer': optimizer.state_dict(),
                       'scheduler': scheduler.state_dict(), 'stage_start_epoch': stage_start_epoch,
                       'global_step': trainer.global_step, 'pos_weight': pos_weight,
                       'conformal': last['conformal'], 'exit_acc': last['exit_acc']}
            # last.pth goes last: once it names this epoch, every file of the epoch is complete, so a run
            # killed at any moment resumes from a consistent set
            if is_best:
                save_checkpoint(config.checkpoint_dir / 'best.pth', payload)
            save_checkpoint(config.checkpoint_dir / snapshot_name(epoch, lam, last['gated_acc']),
                            {'model': model.state_dict(), 'acc': last['gated_acc'], 'epoch': epoch, 'stage': 'joint',
                             'args': config.run_args, 'conformal': last['conformal']})
            save_checkpoint(config.checkpoint_dir / 'last.pth', payload)
            _log_epoch(writer, epoch, stats, last, lr)
            print(f"joint epoch {epoch} | gate loss {stats['gate_loss']:.4f} | "
                  f"cls loss {stats['classifier_loss']:.4f} | gated acc {last['gated_acc']:.2f} | cost "
                  f"{last['mean_cost']:.3f} | exit acc {' '.join(f'{a:.1f}' for a in last['exit_acc'])} | "
                  f'lr {lr:.2e} | {time.perf_counter() - started:.1f} s', flush=True)
    return {'acc': last['gated_acc'], 'best_acc': best_acc, 'best_path': config.checkpoint_dir / 'best.pth',
            'last_path': config.checkpoint_dir / 'last.pth'}


def _log_epoch(writer: SummaryWriter | None, epoch: int, stats: dict, metrics: dict, lr: float) -> None:
    if writer is None:
        return
    for name, value in stats.items():
        writer.add_scalar(f'joint/{name}', value, epoch)
    writer.add_scalar('joint/gated_acc', metrics['gated_acc'], epoch)
    writer.add_scalar('joint/mean_cost', metrics['mean_cost'], epoch)
    writer.add_scalar('joint/lr', lr, epoch)
    for k, (acc, share) in enumerate(zip(metrics['exit_acc'], metrics['exit_share'])):
        writer.add_scalar(f'joint/exit{k}_acc', acc, epoch)
        writer.add_scalar(f'joint/exit{k}_share', share, epoch)
