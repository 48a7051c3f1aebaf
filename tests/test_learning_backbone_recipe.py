"""Stage 0's recipe as the command line builds it: GFNet's transfer values by default (optimizer groups, the
warm-up + cosine schedule, clipping, Mixup), the dynn stages' defaults untouched."""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy

from errors import GFNetDynnError
from jobs.flags import with_stage_defaults
from jobs.train_jobs import backbone_recipe
from learning_helpers.backbone_recipe import (base_criterion, build_backbone_optimizer, build_backbone_scheduler,
                                              build_mixup)
from learning_helpers.loop import train_batches
from learning_helpers.losses import DistillationLoss
from learning_helpers.optim import NonFiniteGuard
from main_dynn import get_args_parser
from models import model_factory


def _recipe(*argv: str):
    args = with_stage_defaults(get_args_parser().parse_args(['--stage', 'backbone', *argv]), 'backbone')
    return args, backbone_recipe(args)


def _lrs(recipe, epochs: int, total_batch: int = 64) -> list[float]:
    """The lr each epoch trains at, stepped as the stage steps it."""
    optimizer = build_backbone_optimizer(torch.nn.Linear(2, 2), torch.nn.Module(), recipe, total_batch)
    scheduler = build_backbone_scheduler(optimizer, recipe)
    seen = []
    for epoch in range(epochs):
        seen.append(optimizer.param_groups[0]['lr'])
        scheduler.step(epoch + 1)
    return seen


def test_defaults_are_gfnets_transfer_recipe():
    args, recipe = _recipe()
    assert (recipe.opt, recipe.lr, recipe.lr_base_batch, recipe.weight_decay) == ('adamw', 1e-4, 512, 1e-4)
    assert (recipe.min_lr, recipe.warmup_lr, recipe.warmup_epochs, recipe.cooldown_epochs) == (1e-5, 1e-6, 5, 0)
    assert (recipe.clip_grad, recipe.smoothing, args.drop_path) == (1.0, 0.1, 0.0)
    assert (recipe.mixup, recipe.cutmix, recipe.mixup_prob, recipe.mixup_switch_prob, recipe.mixup_mode) == (
        0.8, 1.0, 1.0, 0.5, 'batch')


def test_dynn_stage_keeps_the_reference_sgd_recipe():
    args = with_stage_defaults(get_args_parser().parse_args([]), 'dynn')
    assert (args.opt, args.lr, args.min_lr, args.wd) == ('sgd', 1e-3, 2e-4, 5e-4)
    adamw = with_stage_defaults(get_args_parser().parse_args(['--opt', 'adamw']), 'dynn')
    assert adamw.wd == 0.05


def test_optimizer_exempts_norms_biases_and_pos_embed_from_weight_decay():
    _, recipe = _recipe()
    model = model_factory.build_backbone('GFNet-ti-dynn', 3, 32, 8, 0.0, None)
    optimizer = build_backbone_optimizer(model, torch.nn.Module(), recipe, total_batch=64)
    assert isinstance(optimizer, torch.optim.AdamW)
    by_decay = {group['weight_decay']: {id(p) for p in group['params']} for group in optimizer.param_groups}
    assert set(by_decay) == {0.0, 1e-4}
    names = {id(p): name for name, p in model.named_parameters()}
    exempt = {name for name, p in model.named_parameters() if p.ndim <= 1 or name == 'pos_embed'}
    assert {names[i] for i in by_decay[0.0]} == exempt
    assert {names[i] for i in by_decay[1e-4]} == set(names.values()) - exempt
    assert 'blocks.0.filter.complex_weight' in {names[i] for i in by_decay[1e-4]}


def test_learned_loss_parameters_join_under_the_same_rule():
    _, recipe = _recipe()
    extra = torch.nn.Linear(4, 4)  # stands for freq's projections
    optimizer = build_backbone_optimizer(torch.nn.Linear(2, 2), extra, recipe, total_batch=64)
    decay = {id(p): group['weight_decay'] for group in optimizer.param_groups for p in group['params']}
    assert decay[id(extra.weight)] == 1e-4 and decay[id(extra.bias)] == 0.0


def test_lr_is_scaled_by_total_batch_over_512():
    _, recipe = _recipe('--warmup-epochs', '0')
    assert _lrs(recipe, 1, total_batch=64)[0] == pytest.approx(1e-4 * 64 / 512)
    assert _lrs(recipe, 1, total_batch=512)[0] == pytest.approx(1e-4)
    _, unscaled = _recipe('--warmup-epochs', '0', '--lr-base-batch', '0', '--lr', '2e-3')
    assert _lrs(unscaled, 1, total_batch=64)[0] == pytest.approx(2e-3)


def test_schedule_warms_up_from_warmup_lr_then_cosine_to_min_lr():
    _, recipe = _recipe('--num_epoch', '20')
    base, low = 1e-4 * 64 / 512, 1e-5
    lrs = _lrs(recipe, 21)
    assert lrs[0] == pytest.approx(1e-6)  # warm-up start
    assert lrs[4] == pytest.approx(1e-6 + 4 * (base - 1e-6) / 5)  # last warm-up epoch
    # warm-up end: timm's cosine counts from epoch 0 (no warm-up prefix), as GFNet's scheduler does
    assert lrs[5] == pytest.approx(low + 0.5 * (base - low) * (1 + math.cos(math.pi * 5 / 20)))
    assert lrs[19] == pytest.approx(low + 0.5 * (base - low) * (1 + math.cos(math.pi * 19 / 20)))
    assert lrs[20] == pytest.approx(low)  # the floor


def test_cooldown_epochs_run_at_min_lr_within_num_epoch():
    _, recipe = _recipe('--num_epoch', '10', '--cooldown-epochs', '3', '--warmup-epochs', '0')
    lrs = _lrs(recipe, 10)
    assert lrs[6] > 1e-5 and lrs[7:] == pytest.approx([1e-5] * 3)
    with pytest.raises(GFNetDynnError, match='--cooldown-epochs 10 leaves no epoch'):
        _recipe('--num_epoch', '10', '--cooldown-epochs', '10')


def test_clipping_bounds_the_step():
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([weight], lr=1.0)

    def step_loss(_step, images, _targets):
        return (images[0] * weight).sum(), torch.zeros(1)  # gradient = images[0]

    batch = [(torch.tensor([[30.0, 40.0, 0.0]]), torch.zeros(1))]  # gradient norm 50
    train_batches(batch, step_loss, optimizer, desc='t', epoch=0, device=torch.device('cpu'),
                  guard=NonFiniteGuard(0), num_stats=1, clip_grad=1.0)
    torch.testing.assert_close(weight.detach(), torch.tensor([-0.6, -0.8, 0.0]))


def test_mixup_is_active_with_smoothing_inside_and_a_soft_target_loss():
    _, recipe = _recipe()
    mixup = build_mixup(recipe, num_classes=5, batch=4)
    assert (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.label_smoothing, mixup.mix_prob) == (0.8, 1.0, 0.1, 1.0)
    assert isinstance(base_criterion(recipe), SoftTargetCrossEntropy)
    torch.manual_seed(0)
    images, targets = mixup(torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    assert targets.shape == (4, 5)
    torch.testing.assert_close(targets.sum(-1), torch.ones(4))
    assert targets.min() >= 0.1 / 5 - 1e-6  # smoothing spreads 0.1 over the classes
    _, off = _recipe('--mixup', '0', '--cutmix', '0')
    assert build_mixup(off, num_classes=5, batch=3) is None
    assert not isinstance(base_criterion(off), SoftTargetCrossEntropy)


def test_mixup_refuses_an_odd_batch():
    _, recipe = _recipe()
    with pytest.raises(GFNetDynnError, match='need an even --batch, got 7'):
        build_mixup(recipe, num_classes=5, batch=7)


def test_distillation_reads_mixed_targets_and_shows_the_teacher_mixed_images():
    """(1 - alpha) * soft-target CE on the mixed targets + alpha * CE against the teacher's argmax on the mixed
    images, against a float64 hand computation."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).double()
    images, student = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    targets = torch.softmax(torch.randn(4, 3, dtype=torch.float64), -1)
    loss = DistillationLoss(SoftTargetCrossEntropy(), teacher, 'hard', 0.3, 1.0)(images, student, targets)
    soft_ce = -(targets * torch.log_softmax(student, -1)).sum(-1).mean()
    hard = F.cross_entropy(student, teacher(images).argmax(-1))
    torch.testing.assert_close(loss, 0.7 * soft_ce + 0.3 * hard)
