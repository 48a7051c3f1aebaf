"""Stages 1-2 in order, as the reference runs them: one optimizer for both, the warm-up until it stops, then
joint training to --num_epoch; a resumed run picks up in whichever stage it stopped."""
import logging

import torch
from torch.utils.tensorboard import SummaryWriter

from evaluation.latency import latency_exit_costs
from learning_helpers.joint_stage import JointConfig, run_joint_stage
from learning_helpers.optim import build_optimizer, build_scheduler
from learning_helpers.stage_common import RunConfig, StageSummary, StartPoint
from learning_helpers.warmup_stage import WarmupConfig, run_warmup_stage
from models.early_exit_net import EarlyExitNetwork
from models.exit_costs import EXIT_COSTS, CostInputs
from models.flops import normalized_exit_costs

_logger = logging.getLogger(__name__)


def exit_cost_vector(model: EarlyExitNetwork, name: str, recorded: list[float] | None = None) -> list[float]:
    """The exit costs the gates trade against: the vector the run recorded when it has one (a resumed run keeps
    the latencies it measured when it started), else `name`'s."""
    if recorded is not None:
        return list(recorded)
    return EXIT_COSTS[name].build(CostInputs(model, next(model.parameters()).device, latency_exit_costs))


def dynn_param_groups(model: EarlyExitNetwork, lr: float, transfer_ratio: float,
                      gate_lr: float | None = None) -> list[dict]:
    """Exit heads and gates at lr (the gates at gate_lr, in a group of their own, when given), the backbone (final
    head included) at lr * transfer_ratio. Which of them train is set by requires_grad: a parameter without a
    gradient is skipped by the optimizer, weight decay and momentum included."""
    heads, gates = list(model.intermediate_heads.parameters()), list(model.gates.parameters())
    exit_ids = {id(p) for p in heads + gates}
    backbone = [p for p in model.parameters() if id(p) not in exit_ids]
    if gate_lr is None:  # the two groups checkpoints written before --gate-lr hold, so their optimizer state loads
        return [{'params': heads + gates, 'lr': lr}, {'params': backbone, 'lr': lr * transfer_ratio}]
    return [{'params': heads, 'lr': lr}, {'params': backbone, 'lr': lr * transfer_ratio},
            {'params': gates, 'lr': gate_lr}]


def dynn_optimizer(model: EarlyExitNetwork, name: str, weight_decay: float, *, lr: float, transfer_ratio: float,
                   min_lr: float, num_epochs: int, gate_lr: float | None = None):
    """The one optimizer of stages 1-2 and its cosine schedule over --num_epoch, stepped after joint epochs
    only (so the warm-up runs at the constant lr)."""
    optimizer = build_optimizer(dynn_param_groups(model, lr, transfer_ratio, gate_lr), name, weight_decay, lr=lr)
    return optimizer, build_scheduler(optimizer, num_epochs, min_lr / lr)


def train_dynn(model: EarlyExitNetwork, train_loader, val_loader, optimizer, scheduler, device: torch.device,
               run: RunConfig, warmup: WarmupConfig, joint: JointConfig, exit_costs: list[float],
               writer: SummaryWriter | None, start: StartPoint) -> StageSummary:
    """The warm-up (unless the resumed checkpoint is past it), then joint training against `exit_costs`
    (`exit_cost_vector`)."""
    if start.stage != 'joint':
        summary = run_warmup_stage(model, train_loader, val_loader, optimizer, scheduler, device, run, warmup,
                                   writer, start)
        if summary.next_epoch >= run.num_epochs:
            _logger.warning('the warm-up used all %d epochs: the gates were not trained and no best.pth was '
                            'written; pass a --num_epoch larger than --max_warmup_epoch %d', run.num_epochs,
                            warmup.max_epochs)
            return summary
        start = StartPoint(None, summary.next_epoch, 0.0, {})
    return run_joint_stage(model, train_loader, val_loader, optimizer, scheduler, device, torch.tensor(exit_costs),
                           normalized_exit_costs(model), run, joint, writer, start)
