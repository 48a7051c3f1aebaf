"""Stage 2: joint training of gates and exits with the accuracy / inference-cost trade-off (JEI-DNN).

Phases alternate every `bilevel_batch_count` batches, gate phase first. Gate phase: gates learn to fire
from the exit that minimises CE + lambda * cost onward. Classifier phase: exits (and the backbone, at
lr * transfer-ratio, unless frozen) learn weighted by the mass the gates send them.
"""
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from learning_helpers.checkpoint import save_checkpoint
from learning_helpers.conformal import conformal_thresholds
from learning_helpers.distributed import all_reduce_sum, autocast, is_main_process, sync_gradients
from learning_helpers.evaluation import (best_exit_counts, collect_exit_outputs, per_exit_accuracy, sweep_point,
                                         updated_pos_weight)
from learning_helpers.losses import CLASSIFIER_LOSSES, GateLoss
from learning_helpers.optim import NonFiniteGuard, seed_epoch, set_requires_grad
from models.gfnet_dynn import GFNetDynn

_logger = logging.getLogger(__name__)

VALIDATION_THRESHOLD = 0.5  # gated accuracy during training: leave where P(exit) >= 0.5


@dataclass
class JointStageConfig:
    num_epochs: int  # --num_epoch: the run's total, warm-up epochs included
    tradeoff: float  # --ce_ic_tradeoff, lambda
    bilevel_batch_count: int
    gate_objective: str
    classifier_loss: str
    freeze_backbone: bool
    seed: int
    checkpoint_dir: Path
    run_args: dict
    max_batches: int | None = None
    amp: bool = False
    max_nan_skips: int = 5


def joint_param_groups(model: GFNetDynn, lr: float, transfer_ratio: float, freeze_backbone: bool) -> list[dict]:
    """Gates and exit heads at lr; backbone and final head at lr * transfer_ratio, or frozen."""
    exit_params = {id(p) for p in list(model.gates.parameters()) + list(model.intermediate_heads.parameters())}
    backbone = [p for p in model.parameters() if id(p) not in exit_params]
    set_requires_grad(model, True)
    groups = [{'params': list(model.gates.parameters()), 'lr': lr},
              {'params': list(model.intermediate_heads.parameters()), 'lr': lr}]
    if freeze_backbone:
        for param in backbone:
            param.requires_grad_(False)
    else:
        groups.append({'params': backbone, 'lr': lr * transfer_ratio})
    return [g for g in groups if g['params']]


def _trainable(params) -> list:
    return [p for p in params if p.requires_grad]


class JointTrainer:
    """One epoch of alternating phases; the batch counter that picks the phase survives across epochs."""

    def __init__(self, model: GFNetDynn, optimizer, costs: torch.Tensor, config: JointStageConfig,
                 device: torch.device, global_step: int = 0):
        self.model, self.optimizer, self.costs, self.config, self.device = model, optimizer, costs, config, device
        self.gate_loss = GateLoss(config.tradeoff, config.gate_objective)
        self.classifier_loss = CLASSIFIER_LOSSES[config.classifier_loss]()
        self.global_step = global_step
        self.classifier_params = _trainable(p for n, p in model.named_parameters() if not n.startswith('gates.'))

    def phase(self) -> str:
        if not self.classifier_params:  # every exit frozen: only the gates can learn
            return 'gate'
        return 'gate' if (self.global_step // self.config.bilevel_batch_count) % 2 == 0 else 'classifier'

    def gate_step(self, images: torch.Tensor, targets: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # exits are fixed in this phase; only the gates see gradients
            logits = self.model(images).logits
        gate_logits = torch.stack([gate(exit_logits) for gate, exit_logits in zip(self.model.gates, logits)])
        return self.gate_loss(gate_logits, logits.float(), targets, self.costs, pos_weight)

    def classifier_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.config.freeze_backbone:
            with torch.no_grad():
                pooled = self.model.forward_pooled(images)
            out = self.model.heads_and_gates(pooled)
        else:
            out = self.model(images)
        return self.classifier_loss(out.logits.float(), out.gate_logits, targets)

    def train_one_epoch(self, loader, epoch: int, pos_weight: torch.Tensor, guard: NonFiniteGuard) -> dict:
        self.model.train()
        totals = torch.zeros(4, device=self.device)  # gate loss, gate batches, classifier loss, classifier batches
        max_batches = self.config.max_batches
        total = min(len(loader), max_batches or len(loader))
        for step, (images, targets) in enumerate(tqdm(loader, desc=f'joint epoch {epoch}', leave=False, total=total,
                                                      disable=not is_main_process())):
            if max_batches is not None and step >= max_batches:
                break
            images, targets = images.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)
            phase = self.phase()
            with autocast(self.device, self.config.amp):
                loss = (self.gate_step(images, targets, pos_weight) if phase == 'gate'
                        else self.classifier_step(images, targets))
            self.global_step += 1
            self.optimizer.zero_grad(set_to_none=True)
            if not guard.allows(loss, epoch, step):
                continue
            loss.backward()
            sync_gradients(self.model.parameters())
            self.optimizer.step()
            slot = 0 if phase == 'gate' else 2
            totals[slot] += loss.detach().float()
            totals[slot + 1] += 1
        gate_sum, gate_batches, cls_sum, cls_batches = all_reduce_sum(totals).tolist()
        return {'gate_loss': gate_sum / max(gate_batches, 1), 'classifier_loss': cls_sum / max(cls_batches, 1)}


def validate_joint(model: GFNetDynn, val_loader, device: torch.device, costs: torch.Tensor, tradeoff: float,
                   objective: str, *, max_batches: int | None = None, amp: bool = False) -> dict:
    """Gated accuracy at P(exit) >= 0.5, per-exit accuracy, mean cost, exit shares, the new pos_weight and
    conformal thresholds, all from one pass over the validation set."""
    cache, _ = collect_exit_outputs(model, val_loader, device, max_batches=max_batches, amp=amp)
    point = sweep_point(cache, VALIDATION_THRESHOLD, costs.tolist())
    return {'gated_acc': point['accuracy'], 'mean_cost': point['expected_gflops'],  # costs are normalised
            'exit_share': point['exit_share'], 'exit_acc': per_exit_accuracy(cache),
            'pos_weight': updated_pos_weight(best_exit_counts(cache, costs.cpu(), tradeoff, objective)),
            'conformal': conformal_thresholds(cache)}


def run_joint_stage(model: GFNetDynn, train_loader, val_loader, optimizer, scheduler, device: torch.device,
                    costs: torch.Tensor, config: JointStageConfig, writer: SummaryWriter | None, *,
                    start_epoch: int, stage_start_epoch: int, pos_weight: torch.Tensor, global_step: int = 0,
                    best_acc: float = 0.0) -> dict:
    """Epochs start_epoch..num_epochs-1: train, validate, save, rebalance the gates, log."""
    trainer = JointTrainer(model, optimizer, costs.to(device), config, device, global_step)
    guard = NonFiniteGuard(config.max_nan_skips)
    lam = config.tradeoff
    last = {'gated_acc': best_acc}
    for epoch in range(start_epoch, config.num_epochs):
        started = time.perf_counter()
        seed_epoch(config.seed, epoch, train_loader)
        stats = trainer.train_one_epoch(train_loader, epoch, pos_weight.to(device), guard)
        last = validate_joint(model, val_loader, device, costs, lam, config.gate_objective,
                              max_batches=config.max_batches, amp=config.amp)
        pos_weight = last['pos_weight']
        lr = optimizer.param_groups[0]['lr']
        scheduler.step()
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
            save_checkpoint(config.checkpoint_dir / f"ckpt_epoch{epoch}_{lam}_{last['gated_acc']:.2f}.pth",
                            {'model': model.state_dict(), 'acc': last['gated_acc'], 'epoch': epoch, 'stage': 'joint',
                             'args': config.run_args})
            save_checkpoint(config.checkpoint_dir / 'last.pth', payload)
            _log_epoch(writer, epoch, stats, last, lr)
            print(f"joint epoch {epoch + 1}/{config.num_epochs} | gate loss {stats['gate_loss']:.4f} | "
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
