"""Stage 2: joint training of gates and exits with the accuracy / inference-cost trade-off (JEI-DNN).

Phases alternate every `bilevel_batch_count` batches, gate phase first; the batch counter restarts each epoch
(the reference) or runs across epochs (`--phase-counter global`). Gate phase: gates learn to fire from the
exit that minimises CE + lambda * cost onward. Classifier phase: the exits (and the backbone, at
lr * transfer-ratio, unless frozen) learn with the `--classifier_loss`, plus the final exit's CE when the
backbone trains (`--final-exit-loss auto`). docs/METHOD.md has the formulas.
"""
import logging
import time
from dataclasses import dataclass

import torch
from torch.utils.tensorboard import SummaryWriter

from evaluation.conformal import conformal_thresholds
from evaluation.exit_cache import (best_exit_counts, collect_exit_outputs, conditional_exit_choice, exit_point,
                                   per_exit_accuracy, updated_pos_weight)
from learning_helpers.loop import train_batches
from learning_helpers.losses import ExitDistillation, GateLoss, classifier_loss
from learning_helpers.optim import NonFiniteGuard, seed_epoch, set_requires_grad
from learning_helpers.stage_common import (RunConfig, StageSummary, StartPoint, log_epoch, save_epoch,
                                           training_checkpoint)
from models.early_exit_net import EarlyExitNetwork
from runtime.batches import batches_per_epoch
from runtime.distributed import is_main_process

_logger = logging.getLogger(__name__)

PHASE_COUNTERS = ('epoch', 'global')  # where the gate / classifier phase counter restarts


@dataclass(frozen=True)
class JointConfig:
    tradeoff: float  # --ce_ic_tradeoff, lambda
    bilevel_batch_count: int
    phase_counter: str  # 'epoch' (the reference) or 'global'
    gate_objective: str
    classifier_loss: str
    freeze_backbone: bool
    final_exit_loss: str  # 'auto': the final exit's CE joins the classifier phase when the backbone trains; 'off'
    distillation: ExitDistillation | None = None  # --exit-distill in the classifier phase (None: the reference)
    joint_momentum: str = 'keep'  # 'keep': the warm-up's optimizer state carries on (the reference); 'reset'


def forget_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Drop every parameter's optimizer state (SGD's momentum buffers) as joint training starts: the warm-up weights
    exit k by G + 1 - k in a sum, the joint loss averages over the exits, so the warm-up's momentum alone would carry
    the first heads far for a gradient many times smaller."""
    optimizer.state.clear()


def set_joint_trainable(model: EarlyExitNetwork, freeze_backbone: bool) -> None:
    """Stage 2 trains exits and gates, and the backbone unless frozen."""
    set_requires_grad(model, not freeze_backbone)
    set_requires_grad(model.intermediate_heads, True)
    set_requires_grad(model.gates, True)


class JointTrainer:
    """One epoch of alternating phases; with the global counter the batch counter survives across epochs."""

    def __init__(self, model: EarlyExitNetwork, optimizer, costs: torch.Tensor, config: JointConfig, run: RunConfig,
                 device: torch.device, global_step: int = 0):
        self.model, self.optimizer, self.costs, self.config, self.device = model, optimizer, costs, config, device
        self.run = run
        self.gate_loss = GateLoss(config.tradeoff, config.gate_objective)
        self.classifier_loss = classifier_loss(config.classifier_loss, config.final_exit_loss,
                                               backbone_trains=not config.freeze_backbone,
                                               distillation=config.distillation)
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
            logits = self.model.forward_exits(images).logits
        gate_logits = torch.stack([gate(exit_logits) for gate, exit_logits in zip(self.model.gates, logits)])
        return self.gate_loss(gate_logits, logits.float(), targets, self.costs, pos_weight)

    def classifier_step(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # the blocks after the last intermediate exit run only if the loss reads the final exit: parameters
        # outside the loss get no gradient, so weight decay leaves them alone
        through_final = self.classifier_loss.takes_final_exit
        if self.config.freeze_backbone:
            with torch.no_grad():
                pooled = self.model.forward_pooled(images, through_final)
            out = self.model.heads_and_gates(pooled)
        else:
            out = self.model.forward_exits(images, through_final)
        return self.classifier_loss(out.logits.float(), out.gate_logits, targets)

    def train_one_epoch(self, loader, epoch: int, pos_weight: torch.Tensor, guard: NonFiniteGuard) -> dict:
        if self.config.freeze_backbone:
            # a frozen backbone stays in eval mode: in train mode a CNN's BatchNorm statistics would drift and
            # the heads would read shifted features (GFNet at drop path 0 computes the same either way)
            self.model.eval()
            self.model.intermediate_heads.train()
            self.model.gates.train()
        else:
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
            guard=guard, sync=self.model.parameters(), num_stats=4, max_batches=self.run.max_batches,
            amp=self.run.amp).tolist()
        return {'gate_loss': gate_sum / max(gate_batches, 1), 'classifier_loss': cls_sum / max(cls_batches, 1)}


def evaluate(model: EarlyExitNetwork, loader, device: torch.device, costs: torch.Tensor, flops_share: list[float],
             config: JointConfig, run: RunConfig) -> dict:
    """One pass over the validation set: gated accuracy under the training-time exit rule, its mean compute
    (a share of the full network's true FLOPs), per-exit accuracy, exit shares, the next pos_weight (from the
    gates' cost vector `costs`) and the conformal thresholds."""
    cache = collect_exit_outputs(model, loader, device, max_batches=run.max_batches, amp=run.amp)
    chosen = conditional_exit_choice(cache.gate_probs)
    point = exit_point(cache, chosen, flops_share)
    counts = best_exit_counts(cache, costs.cpu(), config.tradeoff, config.gate_objective)
    return {'gated_acc': point['accuracy'], 'mean_cost': point['expected_gflops'],
            'exit_share': point['exit_share'], 'exit_acc': per_exit_accuracy(cache),
            'pos_weight': updated_pos_weight(counts), 'conformal': conformal_thresholds(cache, chosen)}


def snapshot_name(epoch: int, tradeoff: float, gated_acc: float) -> str:
    """ckpt_epoch{E}_{lambda}_{acc}.pth as the reference names them: 0-based epoch, accuracy rounded to two
    decimals and printed as Python prints it (ckpt_epoch81_0.75_68.8.pth)."""
    return f'ckpt_epoch{epoch}_{tradeoff}_{round(gated_acc, 2)}.pth'


def _warn_if_only_gates_train(config: JointConfig, batches_per_epoch: int, gates_learn: bool) -> None:
    if config.phase_counter == 'epoch' and gates_learn and batches_per_epoch <= config.bilevel_batch_count:
        _logger.warning('an epoch has %d batches, no more than --bilevel_batch_count %d: with the phase counter '
                        'restarting every epoch (the reference) only the gates train in stage 2; lower '
                        '--bilevel_batch_count or pass --phase-counter global to train the exits too',
                        batches_per_epoch, config.bilevel_batch_count)


def run_joint_stage(model: EarlyExitNetwork, train_loader, val_loader, optimizer, scheduler, device: torch.device,
                    costs: torch.Tensor, flops_share: list[float], run: RunConfig, config: JointConfig,
                    writer: SummaryWriter | None, start: StartPoint) -> StageSummary:
    """Epochs start.epoch..num_epochs-1: train, validate, rebalance the gates, step the schedule, save, log.
    `costs` are the exit costs the gates trade against (normalised), `flops_share` the true ones. A fresh
    start (not a resumed joint checkpoint) begins with pos_weight 1 and writes best.pth in its first epoch."""
    resumed = start.stage == 'joint'
    stage_start = start.state['stage_start_epoch'] if resumed else start.epoch
    pos_weight = start.state['pos_weight'] if resumed else torch.ones(len(model.exit_positions))
    best_acc = start.best_acc if resumed else 0.0
    set_joint_trainable(model, config.freeze_backbone)
    if config.joint_momentum == 'reset' and not resumed:
        forget_momentum(optimizer)
    trainer = JointTrainer(model, optimizer, costs.to(device), config, run, device,
                           start.state['global_step'] if resumed else 0)
    _warn_if_only_gates_train(config, batches_per_epoch(train_loader, run.max_batches), trainer.gates_learn)
    guard = NonFiniteGuard(run.max_nan_skips)
    last = {'gated_acc': best_acc}
    if is_main_process() and start.epoch < run.num_epochs:
        print(f'joint training: epochs {start.epoch}-{run.num_epochs - 1} (counted from 0, warm-up included)')
    for epoch in range(start.epoch, run.num_epochs):
        started = time.perf_counter()
        seed_epoch(run.seed, epoch, train_loader)
        stats = trainer.train_one_epoch(train_loader, epoch, pos_weight.to(device), guard)
        last = evaluate(model, val_loader, device, costs, flops_share, config, run)
        pos_weight = last['pos_weight']
        lr = optimizer.param_groups[0]['lr']
        scheduler.step()  # the cosine schedule moves only after joint epochs, as in the reference
        is_best = last['gated_acc'] > best_acc or epoch == stage_start  # the first always writes best.pth
        best_acc = max(best_acc, last['gated_acc'])
        checkpoint = training_checkpoint(
            'joint', model, run, epoch=epoch, acc=last['gated_acc'], best_acc=best_acc, optimizer=optimizer,
            scheduler=scheduler, stage_start_epoch=stage_start, global_step=trainer.global_step,
            pos_weight=pos_weight)
        checkpoint.update(conformal=last['conformal'], exit_acc=last['exit_acc'])
        snapshot = {key: checkpoint[key] for key in ('model', 'acc', 'epoch', 'stage', 'args', 'conformal')}
        save_epoch(run.checkpoint_dir, checkpoint, best=is_best,
                   snapshot=(snapshot_name(epoch, config.tradeoff, last['gated_acc']), snapshot))
        log_epoch(writer, 'joint', epoch, {**stats, 'gated_acc': last['gated_acc'], 'mean_cost': last['mean_cost'],
                                           'lr': lr, 'exit_acc': last['exit_acc'], 'exit_share': last['exit_share']})
        if is_main_process():
            print(f"joint epoch {epoch} | gate loss {stats['gate_loss']:.4f} | "
                  f"cls loss {stats['classifier_loss']:.4f} | gated acc {last['gated_acc']:.2f} | cost "
                  f"{last['mean_cost']:.3f} | exit acc {' '.join(f'{a:.1f}' for a in last['exit_acc'])} | "
                  f'lr {lr:.2e} | {time.perf_counter() - started:.1f} s', flush=True)
    return StageSummary(run.num_epochs, last['gated_acc'], best_acc, run.checkpoint_dir / 'best.pth',
                        run.checkpoint_dir / 'last.pth')
