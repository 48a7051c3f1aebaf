"""Losses against hand computations: distillation (soft, hard, frequency), warm-up, gate targets and gate
loss, exit masses and the classifier loss."""
import math

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close

import models  # noqa: F401  (registers the GFNet variants with timm)
from learning_helpers.losses import (CLASSIFIER_LOSSES, DistillationLoss, ExitDistillation, FrequencyDistillation,
                                     GateLoss, GateWeightedClassifierLoss, SoftDistillation, WarmupLoss,
                                     WithExitDistillation, WithFinalExit, aligned_depths, classifier_loss,
                                     exit_distillation)
from models.exit_rule import best_exit, exit_mass, gate_targets, level_error, per_exit_cross_entropy


def _log_softmax_by_hand(logits: torch.Tensor) -> torch.Tensor:
    """log(exp(z_c) / sum_j exp(z_j)) in float64, from the definition (no torch softmax)."""
    z = logits.double()
    return z - z.exp().sum(dim=-1, keepdim=True).log()


def _ce_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(B,) cross-entropy -log softmax(z)[y] in float64."""
    return -_log_softmax_by_hand(logits)[torch.arange(len(targets)), targets]


def _rfft2_amplitude_by_hand(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, D) tokens -> (B, a, b//2+1, D) |DFT| over the grid with 'ortho' scaling, as explicit sums."""
    a, b = grid
    x = tokens.double().reshape(tokens.shape[0], a, b, tokens.shape[2])
    out = torch.zeros(x.shape[0], a, b // 2 + 1, x.shape[3], dtype=torch.complex128)
    for u in range(a):
        for v in range(b // 2 + 1):
            for m in range(a):
                for n in range(b):
                    angle = -2 * math.pi * (u * m / a + v * n / b)
                    out[:, u, v] += x[:, m, n] * complex(math.cos(angle), math.sin(angle))
    return out.abs() / math.sqrt(a * b)


def _trained_loss_drop(loss_fn, steps: int = 50, lr: float = 0.5) -> tuple[float, float]:
    """Train a Linear(6, 4) student for `steps` SGD steps on fixed random inputs against a fixed teacher (a
    Linear of the same inputs, so the student can match it); returns (first, last) loss."""
    torch.manual_seed(0)
    inputs = torch.randn(16, 6)
    with torch.no_grad():
        teacher_logits = 3 * nn.Linear(6, 4)(inputs)
    student = nn.Linear(6, 4)
    optimizer = torch.optim.SGD(student.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_fn(student(inputs), teacher_logits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses[0], losses[-1]


class _FixedTeacher(nn.Module):
    """A teacher whose logits are a fixed table, looked up by the first pixel of each image."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer('table', logits)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.table[images[:, 0, 0, 0].long()]


# soft distillation

def test_soft_distillation_equals_kl_by_hand():
    torch.manual_seed(0)
    student, teacher, tau = torch.randn(3, 5), torch.randn(3, 5), 2.0
    log_s, log_t = _log_softmax_by_hand(student / tau), _log_softmax_by_hand(teacher / tau)
    kl = (log_t.exp() * (log_t - log_s)).sum()  # KL(teacher || student), summed over batch and classes
    expected = kl * tau ** 2 / student.numel()
    assert_close(SoftDistillation(tau)(student, teacher).double(), expected, rtol=1e-5, atol=1e-7)


def test_soft_distillation_is_zero_when_student_equals_teacher():
    logits = torch.randn(4, 3)
    assert_close(SoftDistillation(1.0)(logits, logits.clone()), torch.tensor(0.0), atol=1e-7, rtol=0)


def test_soft_distillation_falls_when_student_trains_on_teacher():
    first, last = _trained_loss_drop(SoftDistillation(2.0))
    assert last < 0.2 * first


# hard distillation

def test_hard_distillation_is_ce_against_teacher_argmax():
    torch.manual_seed(1)
    teacher_table = torch.randn(4, 3)
    images = torch.arange(4).float().view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    student, targets, alpha = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), 0.3
    loss = DistillationLoss(nn.CrossEntropyLoss(), _FixedTeacher(teacher_table), 'hard', alpha, tau=1.0)
    base = _ce_by_hand(student, targets).mean()
    kd = _ce_by_hand(student, teacher_table.argmax(dim=-1)).mean()
    assert_close(loss(images, student, targets).double(), (1 - alpha) * base + alpha * kd, rtol=1e-5, atol=1e-7)


def test_hard_distillation_falls_when_student_trains_on_teacher():
    images = torch.arange(16).float().view(16, 1, 1, 1).expand(16, 3, 1, 1).contiguous()  # image i -> row i

    def hard_only(student_logits, teacher_logits):  # alpha 1: the distillation term alone
        loss = DistillationLoss(nn.CrossEntropyLoss(), _FixedTeacher(teacher_logits), 'hard', 1.0, 1.0)
        return loss(images, student_logits, torch.zeros(16, dtype=torch.long))

    first, last = _trained_loss_drop(hard_only)
    assert last < 0.2 * first


def test_soft_distillation_loss_mixes_ce_and_kd_with_alpha():
    torch.manual_seed(2)
    teacher_table = torch.randn(3, 4)
    images = torch.arange(3).float().view(3, 1, 1, 1).expand(3, 3, 2, 2).contiguous()
    student, targets, alpha, tau = torch.randn(3, 4), torch.tensor([3, 1, 0]), 0.4, 1.5
    loss = DistillationLoss(nn.CrossEntropyLoss(), _FixedTeacher(teacher_table), 'soft', alpha, tau)
    log_s, log_t = _log_softmax_by_hand(student / tau), _log_softmax_by_hand(teacher_table / tau)
    kd = (log_t.exp() * (log_t - log_s)).sum() * tau ** 2 / student.numel()
    expected = (1 - alpha) * _ce_by_hand(student, targets).mean() + alpha * kd
    assert_close(loss(images, student, targets).double(), expected, rtol=1e-5, atol=1e-7)


def test_no_distillation_is_the_base_loss_alone():
    student, targets = torch.randn(3, 4), torch.tensor([0, 1, 2])
    loss = DistillationLoss(nn.CrossEntropyLoss(), None, 'none', 0.5, 1.0)
    assert_close(loss(torch.zeros(3, 3, 2, 2), student, targets).double(), _ce_by_hand(student, targets).mean(),
                 rtol=1e-5, atol=1e-7)


# frequency distillation

def test_aligned_depths_are_equal_fractions_of_the_depth():
    assert aligned_depths(12) == [2, 5, 8, 11]
    assert aligned_depths(19) == [4, 9, 13, 18]
    assert aligned_depths(4) == [0, 1, 2, 3]


def test_frequency_distillation_equals_amplitude_mse_by_hand_for_equal_widths():
    torch.manual_seed(0)
    grid, dim = (4, 3), 5
    loss = FrequencyDistillation(dim, dim, student_depth=4, teacher_depth=4, num_depths=2)
    assert all(isinstance(p, nn.Identity) for p in loss.projections)
    students = [torch.randn(2, 12, dim) for _ in range(2)]
    teachers = [torch.randn(2, 12, dim) for _ in range(2)]
    expected = torch.stack([((_rfft2_amplitude_by_hand(s, grid) - _rfft2_amplitude_by_hand(t, grid)) ** 2).mean()
                            for s, t in zip(students, teachers)]).mean()
    assert_close(loss(students, teachers, grid, grid).double(), expected, rtol=1e-5, atol=1e-7)


def test_frequency_distillation_projects_the_student_when_widths_differ():
    torch.manual_seed(0)
    grid = (2, 4)
    loss = FrequencyDistillation(3, 6, student_depth=8, teacher_depth=12, num_depths=2)
    assert all(isinstance(p, nn.Linear) and p.weight.shape == (6, 3) for p in loss.projections)
    students = [torch.randn(2, 8, 3, requires_grad=True) for _ in range(2)]
    teachers = [torch.randn(2, 8, 6) for _ in range(2)]
    with torch.no_grad():
        projected = [p(s) for p, s in zip(loss.projections, students)]
    expected = torch.stack([((_rfft2_amplitude_by_hand(s, grid) - _rfft2_amplitude_by_hand(t, grid)) ** 2).mean()
                            for s, t in zip(projected, teachers)]).mean()
    value = loss(students, teachers, grid, grid)
    assert_close(value.double(), expected, rtol=1e-5, atol=1e-7)
    value.backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in loss.projections)


def test_frequency_distillation_falls_when_student_trains_on_teacher():
    torch.manual_seed(0)
    grid = (4, 4)
    inputs = [torch.randn(4, 16, 6) for _ in range(2)]  # (B, N, D_in) at two depths
    with torch.no_grad():
        teacher = nn.Linear(6, 8)
        teachers = [teacher(x) for x in inputs]  # (B, N, 8): a fixed teacher of another width
    student = nn.Linear(6, 6)
    loss = FrequencyDistillation(6, 8, student_depth=2, teacher_depth=2, num_depths=2)  # projections train too
    optimizer = torch.optim.SGD(list(student.parameters()) + list(loss.parameters()), lr=0.5)
    values = []
    for _ in range(50):
        value = loss([student(x) for x in inputs], teachers, grid, grid)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(value.item())
    assert values[-1] < 0.5 * values[0]


def test_freq_distillation_loss_is_soft_plus_weighted_frequency_term():
    torch.manual_seed(0)
    teacher = timm.create_model('gfnet_ti', num_classes=3, img_size=16, patch_size=8, depth=4, embed_dim=8).eval()
    student = timm.create_model('gfnet_ti', num_classes=3, img_size=16, patch_size=8, depth=2, embed_dim=4)
    frequency = FrequencyDistillation(4, 8, student_depth=2, teacher_depth=4)
    alpha, tau, weight = 0.5, 2.0, 0.7
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'freq', alpha, tau, frequency, weight)
    images, targets = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    tokens, maps = student.forward_tokens(images, collect=frequency.student_depths)
    logits = student.forward_head(tokens)
    with torch.no_grad():
        teacher_tokens, teacher_maps = teacher.forward_tokens(images, collect=aligned_depths(4))
        teacher_logits = teacher.forward_head(teacher_tokens)
        expected = ((1 - alpha) * F.cross_entropy(logits, targets)
                    + alpha * (SoftDistillation(tau)(logits, teacher_logits)
                               + weight * frequency(maps, teacher_maps, student.grid_size, teacher.grid_size)))
    assert_close(loss(images, logits, targets, maps, student.grid_size), expected)


# warm-up loss

def test_warmup_loss_weighs_exit_k_by_g_plus_1_minus_k():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 2, 3), torch.tensor([2, 0])  # E=3: G=2 intermediate exits + final
    ce = [_ce_by_hand(logits[k], targets).mean() for k in range(3)]
    expected = ce[2] + 3 * ce[0] + 2 * ce[1]  # (G + 1 - k): 3 for exit 0, 2 for exit 1, 1 for the final
    assert_close(WarmupLoss()(logits, targets).double(), expected, rtol=1e-5, atol=1e-7)


def test_per_exit_cross_entropy_is_ce_of_every_exit_and_sample():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 4, 5), torch.tensor([4, 0, 1, 1])
    expected = torch.stack([_ce_by_hand(logits[k], targets) for k in range(3)])
    assert_close(per_exit_cross_entropy(logits, targets).double(), expected, rtol=1e-5, atol=1e-7)
    assert_close(level_error(logits, targets).double(), expected, rtol=1e-5, atol=1e-7)


def test_zero_one_level_error_marks_misclassified_exits():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[0.0, 2.0], [0.0, 2.0]]])  # (E=2, B=2, C=2)
    assert torch.equal(level_error(logits, torch.tensor([0, 0]), 'zero_one'), torch.tensor([[0.0, 1.0], [1.0, 1.0]]))


# gate targets

COSTS = torch.tensor([0.3, 0.6, 1.0])
ERRORS = torch.tensor([[1.0], [0.5], [0.0]])  # (E=3, B=1): later exits are more accurate


@pytest.mark.parametrize('tradeoff, expected', [(0.0, 2), (1.0, 2), (1.5, 1), (2.0, 0)])
def test_best_exit_is_argmin_of_error_plus_lambda_cost(tradeoff, expected):
    # level losses: lambda 1.0 -> 1.3 1.1 1.0; 1.5 -> 1.45 1.4 1.5; 2.0 -> 1.6 1.7 2.0
    assert best_exit(ERRORS, COSTS, tradeoff).tolist() == [expected]


def test_best_exit_ties_go_to_the_earliest_exit():
    assert best_exit(torch.tensor([[1.0], [1.0], [1.0]]), torch.zeros(3), 0.0).tolist() == [0]


def test_gate_targets_fire_from_the_best_exit_on():
    targets = gate_targets(torch.tensor([0, 1, 2]), num_gates=2)  # (G=2, B=3)
    assert torch.equal(targets, torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))


def test_gate_targets_change_with_lambda():
    low = gate_targets(best_exit(ERRORS, COSTS, 0.1), 2)
    high = gate_targets(best_exit(ERRORS, COSTS, 2.0), 2)
    assert low.flatten().tolist() == [0.0, 0.0]  # lambda 0.1: stay to the final head
    assert high.flatten().tolist() == [1.0, 1.0]  # lambda 2.0: leave at exit 0


def test_gate_targets_are_monotone():
    torch.manual_seed(0)
    best = best_exit(torch.rand(5, 64), torch.linspace(0.2, 1.0, 5), 0.7)
    targets = gate_targets(best, 4)
    assert torch.all(targets[1:] >= targets[:-1])  # once a gate says "leave", every later gate does
    assert torch.equal(targets.sum(dim=0), (4 - best).clamp(min=0).float())


# gate loss

def test_gate_loss_is_bce_with_pos_weight_by_hand():
    torch.manual_seed(0)
    # exit logits chosen so the best exits (lambda 0.75) are known: sample 0 confident and right at exit 0,
    # sample 1 right only at the final head, sample 2 right from exit 1 on
    exit_logits = torch.tensor([[[9.0, 0.0], [0.0, 0.0], [0.0, 0.0]],
                                [[9.0, 0.0], [0.0, 0.0], [0.0, 9.0]],
                                [[9.0, 0.0], [0.0, 9.0], [0.0, 9.0]]])  # (E=3, B=3, C=2)
    targets = torch.tensor([0, 1, 1])
    costs = torch.tensor([0.4, 0.7, 1.0])
    best = best_exit(per_exit_cross_entropy(exit_logits, targets), costs, 0.75)
    assert best.tolist() == [0, 2, 1]
    labels = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 1.0]])  # (G=2, B=3)
    gate_logits = torch.randn(2, 3)
    pos_weight = torch.tensor([2.0, 0.5])
    x, pw = gate_logits.double(), pos_weight.double().unsqueeze(1)
    sig = 1 / (1 + torch.exp(-x))
    bce = -(pw * labels * torch.log(sig) + (1 - labels) * torch.log(1 - sig))
    value = GateLoss(0.75)(gate_logits, exit_logits, targets, costs, pos_weight)
    assert_close(value.double(), bce.mean(), rtol=1e-5, atol=1e-7)


def test_gate_loss_sends_gradients_to_the_gates_only():
    exit_logits = torch.randn(3, 4, 5, requires_grad=True)
    gate_logits = torch.randn(2, 4, requires_grad=True)
    GateLoss(0.5)(gate_logits, exit_logits, torch.tensor([0, 1, 2, 3]), torch.tensor([0.3, 0.6, 1.0]),
                  torch.ones(2)).backward()
    assert exit_logits.grad is None
    assert gate_logits.grad is not None and gate_logits.grad.abs().sum() > 0


# exit mass

def _exit_mass_by_hand(g: list[float]) -> list[float]:
    masses, before = [], 0.0
    for gk in g + [1.0]:  # the final exit has g = 1: it takes what is left
        masses.append(max(0.0, min(gk, 1.0 - before)))
        before += gk
    return masses


def test_exit_mass_equals_the_formula_with_the_clamp_at_zero():
    g = [[0.7, 0.2], [0.6, 0.3], [0.2, 0.1]]  # (G=3, B=2); sample 0 overshoots 1 at gate 1
    mass = exit_mass(torch.tensor(g))
    expected = torch.tensor([_exit_mass_by_hand([row[b] for row in g]) for b in range(2)]).T
    assert_close(mass, expected)
    assert_close(mass[:, 0], torch.tensor([0.7, 0.3, 0.0, 0.0]))  # clamped at 0 after the overshoot
    assert_close(mass[:, 1], torch.tensor([0.2, 0.3, 0.1, 0.4]))  # the final exit takes the remainder


def test_exit_masses_sum_to_one_when_gates_sum_to_at_most_one():
    torch.manual_seed(0)
    g = torch.rand(4, 32)
    g = g / g.sum(dim=0, keepdim=True) * torch.rand(1, 32)  # sum_k g_k in [0, 1)
    mass = exit_mass(g)
    assert_close(mass.sum(dim=0), torch.ones(32))
    assert_close(mass[:-1], g)
    assert torch.all(mass >= 0)


# classifier loss

def _reference_weighted_loss(exit_logits: torch.Tensor, gate_logits: torch.Tensor,
                             targets: torch.Tensor) -> torch.Tensor:
    """A transcription of the reference's classifier-phase loss (JEI-DNN's weighted mode, which its 'boosted'
    mode falls back to): masses from the sigmoided gates exit by exit, then mean(P * L * ratio)."""
    num_gates, batch = gate_logits.shape
    summed_g = torch.zeros(batch, 1, dtype=torch.float64)
    masses, losses = [], []
    for k in range(num_gates):
        with torch.no_grad():
            g = torch.sigmoid(gate_logits[k].double())[:, None]
        masses.append(torch.max(torch.zeros(batch, 1, dtype=torch.float64), torch.min(g, 1 - summed_g)))
        summed_g = summed_g + g
        losses.append(F.cross_entropy(exit_logits[k].double(), targets, reduction='none')[:, None])
    P, L = torch.cat(masses, dim=1), torch.cat(losses, dim=1)
    weighted = P * L
    ratio = (L.sum(dim=1) / weighted.sum(dim=1))[:, None]
    return torch.mean(weighted * ratio)


def test_boosted_loss_equals_a_transcription_of_the_reference_with_its_gradients():
    torch.manual_seed(0)
    exit_logits = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)  # (E=4, B=6, C=5)
    gate_logits = torch.randn(3, 6, dtype=torch.float64) * 2
    targets = torch.tensor([0, 3, 4, 1, 2, 2])
    ours = CLASSIFIER_LOSSES['boosted']()(exit_logits[:-1], gate_logits, targets)  # intermediate exits only
    ours_grad, = torch.autograd.grad(ours, exit_logits)
    theirs = _reference_weighted_loss(exit_logits, gate_logits, targets)
    theirs_grad, = torch.autograd.grad(theirs, exit_logits)
    assert_close(ours.double(), theirs, rtol=1e-6, atol=1e-9)
    assert_close(ours_grad.double(), theirs_grad, rtol=1e-5, atol=1e-9)


def test_boosted_loss_value_and_gradients_are_the_mean_ce_over_intermediate_exits():
    torch.manual_seed(1)
    exit_logits = torch.randn(4, 8, 5, dtype=torch.float64, requires_grad=True)
    gate_logits = torch.randn(3, 8, dtype=torch.float64, requires_grad=True) * 3
    targets = torch.randint(0, 5, (8,))
    boosted = CLASSIFIER_LOSSES['boosted']()(exit_logits[:-1], gate_logits, targets)
    boosted_grad, = torch.autograd.grad(boosted, exit_logits)
    plain = torch.stack([F.cross_entropy(exit_logits[k], targets) for k in range(3)]).mean()
    plain_grad, = torch.autograd.grad(plain, exit_logits)
    assert_close(boosted, plain, rtol=1e-9, atol=1e-12)
    assert_close(boosted_grad, plain_grad, rtol=1e-7, atol=1e-12)
    assert torch.all(boosted_grad[-1] == 0)  # the final head is not trained by this phase
    assert not CLASSIFIER_LOSSES['boosted'].takes_final_exit
    assert CLASSIFIER_LOSSES['gate_weighted'].takes_final_exit


def test_boosted_loss_sends_no_gradient_to_the_gates():
    exit_logits = torch.randn(3, 4, 5, requires_grad=True)
    gate_logits = torch.randn(2, 4, requires_grad=True)
    CLASSIFIER_LOSSES['boosted']()(exit_logits[:-1], gate_logits, torch.tensor([0, 1, 2, 3])).backward()
    assert gate_logits.grad is None


def test_gate_weighted_loss_equals_the_hand_formula():
    torch.manual_seed(0)
    exit_logits, gate_logits = torch.randn(3, 4, 5), torch.randn(2, 4)
    targets = torch.tensor([0, 3, 4, 1])
    ce = torch.stack([_ce_by_hand(exit_logits[k], targets) for k in range(3)])  # (E, B)
    g = (1 / (1 + torch.exp(-gate_logits.double()))).T.tolist()  # per sample
    mass = torch.tensor([_exit_mass_by_hand(row) for row in g], dtype=torch.float64).T  # (E, B)
    scale = ce.sum(dim=0) / (mass * ce).sum(dim=0)
    expected = (mass * ce * scale).mean()
    assert_close(GateWeightedClassifierLoss()(exit_logits, gate_logits, targets).double(), expected,
                 rtol=1e-5, atol=1e-7)


def test_gate_weighted_loss_weights_exits_by_their_mass_unlike_boosted():
    # one sample the gates send out at exit 0 (mass 0.99): gate_weighted puts its gradient there
    exit_logits = torch.zeros(3, 1, 4, requires_grad=True)
    gate_logits = torch.tensor([[5.0], [0.0]])
    targets = torch.tensor([1])
    grad, = torch.autograd.grad(GateWeightedClassifierLoss()(exit_logits, gate_logits, targets), exit_logits)
    norms = grad.abs().sum(dim=(1, 2))
    assert norms[0] > 10 * norms[1] and norms[0] > 10 * norms[2]
    grad, = torch.autograd.grad(CLASSIFIER_LOSSES['boosted']()(exit_logits[:-1], gate_logits, targets), exit_logits)
    norms = grad.abs().sum(dim=(1, 2))
    assert_close(norms[0], norms[1]) and norms[2] == 0


def test_gate_weighted_loss_sends_no_gradient_to_the_gates():
    exit_logits = torch.randn(3, 4, 5, requires_grad=True)
    gate_logits = torch.randn(2, 4, requires_grad=True)
    GateWeightedClassifierLoss()(exit_logits, gate_logits, torch.tensor([0, 1, 2, 3])).backward()
    assert gate_logits.grad is None
    assert exit_logits.grad is not None and exit_logits.grad.abs().sum() > 0


def test_final_exit_loss_adds_the_final_ce_over_g_and_keeps_boosted_gradients_on_the_intermediate_exits():
    torch.manual_seed(0)
    exit_logits = torch.randn(5, 4, 3, dtype=torch.float64, requires_grad=True)  # G = 4 gates, E = 5 exits
    gate_logits, targets = torch.randn(4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    loss = classifier_loss('boosted', 'auto', backbone_trains=True)
    assert isinstance(loss, WithFinalExit) and loss.takes_final_exit
    boosted = CLASSIFIER_LOSSES['boosted']()(exit_logits[:-1], gate_logits, targets)
    total = loss(exit_logits, gate_logits, targets)
    assert_close(total, boosted + F.cross_entropy(exit_logits[-1], targets) / 4)
    grad, = torch.autograd.grad(total, exit_logits)
    boosted_grad, = torch.autograd.grad(boosted, exit_logits)
    assert_close(grad[:-1], boosted_grad[:-1]) and grad[-1].abs().sum() > 0


@pytest.mark.parametrize('name, final_exit_loss, backbone_trains', [
    ('boosted', 'off', True), ('boosted', 'auto', False), ('gate_weighted', 'auto', True)])
def test_final_exit_loss_leaves_the_loss_as_it_is_when_off_frozen_or_already_there(name, final_exit_loss,
                                                                                   backbone_trains):
    assert type(classifier_loss(name, final_exit_loss, backbone_trains)) is CLASSIFIER_LOSSES[name]


# self-distillation of the exits from the final exit (--exit-distill)

def _exit_distillation_by_hand(logits: torch.Tensor, weight: float, tau: float) -> torch.Tensor:
    """(G,) w * T^2 * mean_b sum_c p_final,c (log p_final,c - log p_k,c), softmaxes at temperature T, float64."""
    teacher = _log_softmax_by_hand(logits[-1] / tau)
    terms = []
    for k in range(logits.shape[0] - 1):
        student = _log_softmax_by_hand(logits[k] / tau)
        terms.append((teacher.exp() * (teacher - student)).sum(dim=-1).mean())
    return weight * tau ** 2 * torch.stack(terms)


def test_exit_distillation_equals_the_hand_formula_and_spares_the_final_exit():
    torch.manual_seed(0)
    logits = (3 * torch.randn(4, 5, 6, dtype=torch.float64)).requires_grad_()  # G = 3 exits + final, B 5, C 6
    distilled = ExitDistillation(0.7, 2.5)(logits)
    assert_close(distilled, _exit_distillation_by_hand(logits.detach(), 0.7, 2.5), rtol=1e-6, atol=1e-9)
    grad, = torch.autograd.grad(distilled.sum(), logits)
    assert grad[-1].abs().sum() == 0 and grad[:-1].abs().sum() > 0  # the teacher is detached
    assert torch.all(ExitDistillation(1.0, 1.0)(logits[[-1, -1]]).abs() < 1e-12)  # an exit equal to it: 0


def test_exit_distillation_is_off_at_weight_zero():
    assert exit_distillation(0.0, 4.0) is None and isinstance(exit_distillation(0.5, 4.0), ExitDistillation)


def test_warmup_loss_adds_each_exits_distillation_with_its_ce_weight():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 4, 5), torch.tensor([2, 0, 4, 1])  # G = 2
    ce = [_ce_by_hand(logits[k], targets).mean() for k in range(3)]
    d = _exit_distillation_by_hand(logits, 0.5, 3.0)
    expected = ce[2] + 3 * (ce[0] + d[0]) + 2 * (ce[1] + d[1])
    assert_close(WarmupLoss(ExitDistillation(0.5, 3.0))(logits, targets).double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name', sorted(CLASSIFIER_LOSSES))
def test_classifier_phase_adds_the_mean_distillation_to_its_loss(name):
    torch.manual_seed(0)
    exit_logits, gate_logits = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(3, 6, dtype=torch.float64)
    targets = torch.randint(0, 5, (6,))
    loss = classifier_loss(name, distillation=ExitDistillation(0.5, 2.0))
    assert isinstance(loss, WithExitDistillation) and loss.takes_final_exit  # the final exit is read as teacher
    own = exit_logits if CLASSIFIER_LOSSES[name].takes_final_exit else exit_logits[:-1]
    expected = CLASSIFIER_LOSSES[name]()(own, gate_logits, targets) + _exit_distillation_by_hand(
        exit_logits, 0.5, 2.0).mean()
    assert_close(loss(exit_logits, gate_logits, targets), expected, rtol=1e-9, atol=1e-12)
