"""Losses: distillation for the backbone stage, and the early-exit losses (warm-up, gate, classifier phase).

The formulas are written out in docs/METHOD.md."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.exit_rule import best_exit, exit_mass, gate_targets, level_error, per_exit_cross_entropy


class SoftDistillation(nn.Module):
    """F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target) * T^2, averaged per element (DeiT's 'soft').

    The T^2 keeps the gradient's scale independent of T (Hinton et al.)."""

    def __init__(self, tau: float):
        super().__init__()
        self.tau = tau

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.tau
        return F.kl_div(F.log_softmax(student_logits / t, dim=-1), F.log_softmax(teacher_logits / t, dim=-1),
                        reduction='sum', log_target=True) * (t * t) / student_logits.numel()


def frequency_amplitude(tokens: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """(B, N, D) tokens on an a x b grid -> (B, a, b//2+1, D) amplitude of rfft2 over the grid."""
    batch, _, dim = tokens.shape
    grid = tokens.float().reshape(batch, grid_size[0], grid_size[1], dim)
    return torch.fft.rfft2(grid, dim=(1, 2), norm='ortho').abs()


class FrequencyDistillation(nn.Module):
    """Match student and teacher token maps in the frequency domain at aligned depths:
    mean over depths of MSE(|rfft2(P s_l)|, |rfft2(t_l)|), P a learned Linear(D_s, D_t) when widths differ.
    A teacher grid of another size is resized (bilinear) to the student's frequency grid."""

    def __init__(self, student_dim: int, teacher_dim: int, student_depth: int, teacher_depth: int,
                 num_depths: int = 4):
        super().__init__()
        self.student_depths = aligned_depths(student_depth, num_depths)
        self.teacher_depths = aligned_depths(teacher_depth, num_depths)
        self.projections = nn.ModuleList(
            nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity()
            for _ in range(num_depths))

    def forward(self, student_maps: list, teacher_maps: list, student_grid: tuple[int, int],
                teacher_grid: tuple[int, int]) -> torch.Tensor:
        losses = []
        for projection, student, teacher in zip(self.projections, student_maps, teacher_maps):
            student_amp = frequency_amplitude(projection(student), student_grid)  # (B, a, w, Dt)
            teacher_amp = frequency_amplitude(teacher, teacher_grid)
            if teacher_amp.shape[1:3] != student_amp.shape[1:3]:
                teacher_amp = F.interpolate(teacher_amp.permute(0, 3, 1, 2), size=student_amp.shape[1:3],
                                            mode='bilinear', align_corners=False).permute(0, 2, 3, 1)
            losses.append(F.mse_loss(student_amp, teacher_amp))
        return torch.stack(losses).mean()


def aligned_depths(depth: int, count: int = 4) -> list[int]:
    """Block indices at equal fractions of the depth (1/4, 2/4, 3/4, 4/4 for count 4)."""
    return [max(0, round(depth * (i + 1) / count) - 1) for i in range(count)]


class ExitDistillation(nn.Module):
    """Self-distillation of the intermediate exits from the final exit (Phuong & Lampert 2019): for each exit
    k = 0..G-1, d_k = w * T^2 * mean_b KL(softmax(z_G / T) || softmax(z_k / T)). Returns (G,). z_G is detached:
    the final exit is the teacher, not a path for gradients; the T^2 keeps the gradient's scale independent of T."""

    def __init__(self, weight: float, tau: float):
        super().__init__()
        self.weight, self.tau = weight, tau

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        t = self.tau
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 under --amp -> float32
        teacher = F.log_softmax(logits[-1].detach() / t, dim=-1)  # (B, C)
        student = F.log_softmax(logits[:-1] / t, dim=-1)  # (G, B, C)
        kl = (teacher.exp() * (teacher - student)).sum(dim=-1).mean(dim=-1)  # (G,)
        return self.weight * t * t * kl


def exit_distillation(weight: float, tau: float) -> ExitDistillation | None:
    """The --exit-distill term, None when its weight is 0 (the reference)."""
    return ExitDistillation(weight, tau) if weight > 0 else None


class WarmupLoss(nn.Module):
    """Stage 1: CE(final) + sum_k (G + 1 - k) * (CE(exit_k) + d_k), k = 0..G-1; earlier exits weigh more. d_k is
    exit k's self-distillation term (ExitDistillation), 0 without one (the reference)."""

    def __init__(self, distillation: ExitDistillation | None = None):
        super().__init__()
        self.distillation = distillation

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_gates = logits.shape[0] - 1
        distilled = self.distillation(logits) if self.distillation is not None else None
        loss = F.cross_entropy(logits[-1], targets)
        for k in range(num_gates):
            term = F.cross_entropy(logits[k], targets) + (distilled[k] if distilled is not None else 0)
            loss = loss + (num_gates + 1 - k) * term
        return loss


class GateLoss(nn.Module):
    """Gate phase: mean BCE-with-logits over gates and samples against `gate_targets`, where the
    positives of gate k weigh pos_weight_k (rebalanced after each validation)."""

    def __init__(self, tradeoff: float, objective: str = 'ce'):
        super().__init__()
        self.tradeoff = tradeoff
        self.objective = objective

    def forward(self, gate_logits: torch.Tensor, exit_logits: torch.Tensor, targets: torch.Tensor,
                costs: torch.Tensor, pos_weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the targets are labels for the gates, not a path for gradients
            best = best_exit(level_error(exit_logits, targets, self.objective), costs, self.tradeoff)
            labels = gate_targets(best, gate_logits.shape[0])
        return F.binary_cross_entropy_with_logits(gate_logits.float(), labels,
                                                  pos_weight=pos_weight.unsqueeze(1))


class BoostedClassifierLoss(nn.Module):
    """Classifier phase as the reference trains it (`--classifier_loss boosted`), over the G intermediate exits:
    mean_{b,k} P_k L_k r, with L_k = CE(exit_k), P_k the exit mass of the gates (no gradient) and
    r = sum_j L_j / sum_j P_j L_j per sample, *not* detached.

    With the masses constant and r differentiable, sum_k P_k L_k r = sum_k L_k for every sample, so value and
    gradients equal the plain mean cross-entropy over the intermediate exits; the final head is not trained.
    Written out as the reference does so the equivalence is a tested fact, not an assumption."""

    takes_final_exit = False  # takes the (G, B, C) logits of the intermediate exits

    def forward(self, exit_logits: torch.Tensor, gate_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = per_exit_cross_entropy(exit_logits, targets)  # (G, B)
        with torch.no_grad():
            mass = exit_mass(torch.sigmoid(gate_logits.float()))[:-1]  # (G, B)
        weighted = mass * ce
        ratio = ce.sum(dim=0) / weighted.sum(dim=0)  # (B,)
        return (weighted * ratio).mean()


class GateWeightedClassifierLoss(nn.Module):
    """Our extension (`--classifier_loss gate_weighted`), over all E exits, the final head included:
    mean_{b,k} P_k L_k r with r = sum_j L_j / sum_j P_j L_j detached, so the gate masses really weight the
    exits while each sample keeps the scale of its summed CE (samples sent early do not vanish)."""

    takes_final_exit = True  # takes the (E, B, C) logits of every exit

    def forward(self, exit_logits: torch.Tensor, gate_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = per_exit_cross_entropy(exit_logits, targets)  # (E, B)
        mass = exit_mass(torch.sigmoid(gate_logits.detach().float()))
        weighted = mass * ce
        scale = (ce.sum(dim=0) / weighted.sum(dim=0).clamp_min(1e-12)).detach()
        return (weighted * scale).mean()


CLASSIFIER_LOSSES = {'boosted': BoostedClassifierLoss, 'gate_weighted': GateWeightedClassifierLoss}
FINAL_EXIT_LOSS = ('auto', 'off')  # --final-exit-loss


class WithFinalExit(nn.Module):
    """A classifier-phase loss over the G intermediate exits plus the final exit's cross-entropy:
    loss(exits_0..G-1) + CE(final) / G. The intermediate exits' gradients are exactly those of `loss`; the final
    exit weighs what one intermediate exit weighs in boosted's mean over exits. It keeps the full network's
    accuracy when the joint stage trains the shared blocks (see `--final-exit-loss`)."""

    takes_final_exit = True  # takes the (E, B, C) logits of every exit

    def __init__(self, loss: nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, exit_logits: torch.Tensor, gate_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        num_gates = exit_logits.shape[0] - 1
        final = F.cross_entropy(exit_logits[-1].float(), targets)
        return self.loss(exit_logits[:-1], gate_logits, targets) + final / num_gates


class WithExitDistillation(nn.Module):
    """A classifier-phase loss plus the mean self-distillation term of the intermediate exits:
    loss + mean_k d_k (ExitDistillation; the boosted loss averages the exits' CE the same way)."""

    takes_final_exit = True  # the final exit's logits are the teacher

    def __init__(self, loss: nn.Module, distillation: ExitDistillation):
        super().__init__()
        self.loss, self.distillation = loss, distillation

    def forward(self, exit_logits: torch.Tensor, gate_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        own = exit_logits if self.loss.takes_final_exit else exit_logits[:-1]
        return self.loss(own, gate_logits, targets) + self.distillation(exit_logits).mean()


def classifier_loss(name: str, final_exit_loss: str = 'off', backbone_trains: bool = False,
                    distillation: ExitDistillation | None = None) -> nn.Module:
    """The `--classifier_loss` module; with final_exit_loss 'auto' and a backbone that trains, a loss that
    leaves the final exit out gets its cross-entropy added (WithFinalExit), and with a distillation its term
    (WithExitDistillation). 'off', a frozen backbone and no distillation is the reference's loss exactly."""
    loss = CLASSIFIER_LOSSES[name]()
    if final_exit_loss == 'auto' and backbone_trains and not loss.takes_final_exit:
        loss = WithFinalExit(loss)
    return WithExitDistillation(loss, distillation) if distillation is not None else loss


class DistillationLoss(nn.Module):
    """(1 - alpha) * CE + alpha * KD, the teacher run frozen and without gradients (DeiT's wrapper).

    KD: 'soft' (SoftDistillation), 'hard' (CE against the teacher's argmax), 'freq' (soft +
    freq_weight * FrequencyDistillation over token maps at aligned depths); 'none' is CE alone."""

    def __init__(self, base: nn.Module, teacher: nn.Module | None, kind: str, alpha: float, tau: float,
                 frequency: FrequencyDistillation | None = None, freq_weight: float = 1.0):
        super().__init__()
        self.base, self.kind, self.alpha, self.freq_weight = base, kind, alpha, freq_weight
        self.teacher = teacher
        self.soft = SoftDistillation(tau)
        self.frequency = frequency

    def learned_state_dict(self) -> dict:
        """What the loss itself learns (freq's projections), for checkpoints: the frozen teacher is not saved
        with every epoch, --resume reloads it from --teacher-path."""
        return self.frequency.state_dict() if self.frequency is not None else {}

    def load_learned_state_dict(self, state: dict) -> None:
        if self.frequency is not None:
            self.frequency.load_state_dict(state)

    def forward(self, images: torch.Tensor, student_logits: torch.Tensor, targets: torch.Tensor,
                student_maps: list | None = None, student_grid: tuple[int, int] | None = None) -> torch.Tensor:
        base_loss = self.base(student_logits, targets)
        if self.kind == 'none':
            return base_loss
        with torch.no_grad():
            if self.kind == 'freq':
                teacher_tokens, teacher_maps = self.teacher.forward_tokens(
                    images, collect=self.frequency.teacher_depths)
                teacher_logits = self.teacher.forward_head(teacher_tokens)
            else:
                teacher_logits = self.teacher(images)
        if self.kind == 'hard':
            kd = F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
        else:
            kd = self.soft(student_logits, teacher_logits)
        if self.kind == 'freq':
            kd = kd + self.freq_weight * self.frequency(student_maps, teacher_maps, student_grid,
                                                         self.teacher.grid_size)
        return (1 - self.alpha) * base_loss + self.alpha * kd
