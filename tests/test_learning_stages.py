"""Behaviour of the training stages (docs/METHOD.md): warm-up patience and freezing, what each stage and
each joint phase may change, and the direction of the cost trade-off."""
import contextlib
import copy
import io
import math
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import TINY_FLAGS
from evaluation.exit_cache import collect_exit_outputs, conditional_exit_choice
from jobs.trained_run import reopen
from learning_helpers import warmup_stage
from learning_helpers.dynn_training import dynn_param_groups
from learning_helpers.joint_stage import (JointConfig, JointTrainer, _warn_if_only_gates_train, run_joint_stage,
                                          set_joint_trainable)
from learning_helpers.losses import WarmupLoss
from learning_helpers.optim import NonFiniteGuard, build_optimizer, build_scheduler
from learning_helpers.stage_common import FRESH_START, RunConfig, StartPoint
from learning_helpers.warmup_stage import ExitPatience, WarmupConfig, run_warmup_stage
from models.flops import exit_gflops
from models.model_factory import build_dynn
from models.weights import load_state, read_checkpoint

EXITS = [3, 7]  # two intermediate exits keep the scripted scenarios short


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_dynn('GFNet-ti-dynn', 3, 32, 8, 0.0, EXITS, 'unc')


def random_loader(batches: int = 2, batch: int = 8, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batches * batch, 3, 32, 32, generator=generator)
    targets = torch.randint(0, 3, (batches * batch,), generator=generator)
    return DataLoader(TensorDataset(images, targets), batch_size=batch, shuffle=True,
                      generator=torch.Generator().manual_seed(seed), drop_last=True)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed_keys(before: dict, after: dict) -> set[str]:
    return {name for name in before if not torch.equal(before[name], after[name])}


def assert_state_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


# ---- Stage 1: patience ---------------------------------------------------------------------------------

def test_exit_patience_freezes_after_exactly_patience_epochs_without_improvement():
    heads = torch.nn.ModuleList(torch.nn.Linear(4, 3) for _ in range(2))
    patience = ExitPatience(num_heads=2, patience=2)
    assert patience.update([50.0, 50.0], heads) == ([0, 1], [])
    best_1 = snapshot(heads[1])
    with torch.no_grad():
        heads[1].weight.add_(1.0)  # in place: the saved best must be a copy, not a view of the live head
    assert patience.update([60.0, 50.0], heads) == ([0], [])  # equal is no improvement: exit 1 waits 1
    assert patience.waited == [0, 1] and patience.frozen == [False, False]
    assert patience.update([55.0, 49.0], heads) == ([], [1])  # exit 0 waits 1, exit 1 waits 2 = patience
    assert patience.frozen == [False, True] and not patience.all_frozen
    assert_state_equal(patience.best_state[1], best_1)
    assert patience.update([10.0, 99.0], heads) == ([], [0])  # a frozen exit's accuracy is ignored
    assert patience.all_frozen and patience.best_acc == [60.0, 50.0]


def test_exit_patience_state_round_trips():
    heads = torch.nn.ModuleList(torch.nn.Linear(4, 3) for _ in range(2))
    patience = ExitPatience(2, 3)
    patience.update([40.0, 30.0], heads)
    patience.update([40.0, 35.0], heads)
    restored = ExitPatience(2, 3)
    restored.load_state_dict(copy.deepcopy(patience.state_dict()))
    assert (restored.best_acc, restored.waited, restored.frozen) == ([40.0, 35.0], [1, 0], [False, False])
    assert restored.update([40.0, 35.0], heads) == patience.update([40.0, 35.0], heads)


def run_scripted_warmup(tmp_path, monkeypatch, script: list[list[float]], max_epochs: int, patience: int):
    """run_warmup_stage on random data, with validation accuracies (exit 0, exit 1, final) taken from `script`
    instead of measured. Returns (model, epochs used, each head's weights as each validation saw them,
    the run and warm-up settings, the patience state of its last.pth)."""
    model = tiny_model()
    seen: list[list[dict]] = []

    def scripted_accuracy(_cache):
        seen.append([snapshot(head) for head in model.intermediate_heads])
        return script[len(seen) - 1]

    monkeypatch.setattr(warmup_stage, 'collect_exit_outputs', lambda *args, **kwargs: (None, []))
    monkeypatch.setattr(warmup_stage, 'per_exit_accuracy', scripted_accuracy)
    optimizer = build_optimizer([{'params': list(model.intermediate_heads.parameters())}], 'sgd', 5e-4, lr=0.05)
    run = RunConfig(num_epochs=max_epochs, seed=0, checkpoint_dir=tmp_path / 'ckpt',
                    run_args={'num_epoch': max_epochs})
    warmup = WarmupConfig(max_epochs=max_epochs, patience=patience, heads_dir=tmp_path / 'warmup')
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run_warmup_stage(model, random_loader(), random_loader(1), optimizer,
                                   build_scheduler(optimizer, max_epochs, 0.2), torch.device('cpu'), run, warmup,
                                   None, FRESH_START)
    state = torch.load(run.checkpoint_dir / 'last.pth', weights_only=True)['warmup']
    return model, summary.next_epoch, seen, (run, warmup), state


def test_warmup_freezes_each_exit_at_its_best_weights(tmp_path, monkeypatch):
    script = [[10.0, 10.0, 50.0],  # both improve
              [20.0, 5.0, 50.0],  # exit 0 improves; exit 1 waits 1
              [20.0, 15.0, 50.0],  # exit 0 waits 1; exit 1 improves
              [15.0, 12.0, 50.0],  # exit 0 waits 2: frozen at its epoch-1 weights; exit 1 waits 1
              [99.0, 14.0, 50.0]]  # exit 0 is frozen; exit 1 waits 2: frozen at its epoch-2 weights
    model, used, seen, (run, warmup), patience = run_scripted_warmup(tmp_path, monkeypatch, script, 10, 2)
    assert used == 5 and len(seen) == 5  # every exit frozen after epoch 4: epoch 5 never starts
    assert patience['frozen'] == [True, True]
    for epoch in range(1, 4):  # both heads trained in epochs 1-3: the weights the script refers to differ
        assert changed_keys(seen[epoch - 1][1], seen[epoch][1])
    assert changed_keys(seen[2][0], seen[3][0])  # exit 0 still trained in epoch 3: not frozen after 1 wait
    best = {0: seen[1][0], 1: seen[2][1]}
    for k, head in enumerate(model.intermediate_heads):
        assert_state_equal(snapshot(head), best[k])
        assert_state_equal(torch.load(warmup.heads_dir / f'{k}.pth', weights_only=True)['model'], best[k])
        assert all(param.requires_grad for param in head.parameters())  # unfrozen for the joint stage
    assert_state_equal(seen[4][0], best[0])  # frozen in epoch 3: restored, then untouched by epoch 4
    last = torch.load(run.checkpoint_dir / 'last.pth', weights_only=True)
    assert (last['stage'], last['epoch'], last['warmup']['frozen']) == ('warmup', 4, [True, True])


def test_warmup_restores_best_weights_of_unfrozen_exits_at_max_epochs(tmp_path, monkeypatch):
    script = [[30.0, 30.0, 50.0], [40.0, 20.0, 50.0], [35.0, 25.0, 50.0]]
    model, used, seen, _, patience = run_scripted_warmup(tmp_path, monkeypatch, script, 3, 5)
    assert used == 3 and patience['frozen'] == [False, False]
    assert changed_keys(seen[1][0], seen[2][0])  # the last epoch moved the heads away from their best
    assert_state_equal(snapshot(model.intermediate_heads[0]), seen[1][0])  # best at epoch 1
    assert_state_equal(snapshot(model.intermediate_heads[1]), seen[0][1])  # best at epoch 0


# ---- Stage 1 on the tiny trained backbone --------------------------------------------------------------

@pytest.fixture
def tiny_loaders(tiny_data):
    from data_loader_help import build_datasets, build_loaders
    train_set, val_set, _, _, _ = build_datasets('TINY', tiny_data, 32)
    return build_loaders(train_set, val_set, 8, 0, seed=0)


def trained_dynn(tiny_backbone) -> torch.nn.Module:
    model = tiny_model(seed=1)
    load_state(model, read_checkpoint(tiny_backbone.checkpoint))
    return model


class Scalars:
    """A SummaryWriter stand-in that keeps what it is given."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.values.setdefault(tag, []).append(value)


def validation_warmup_loss(model, loader) -> float:
    cache = collect_exit_outputs(model, loader, torch.device('cpu'))
    return WarmupLoss()(cache.logits, cache.targets).item()


@pytest.mark.slow
def test_warmup_trains_only_the_exit_heads_and_its_loss_falls(tiny_backbone, tiny_loaders, tmp_path):
    assert tiny_backbone.rc == 0
    train_loader, val_loader = tiny_loaders
    model = trained_dynn(tiny_backbone)
    before = snapshot(model)
    val_loss_before = validation_warmup_loss(model, val_loader)
    # the reference's SGD at --lr 1e-3: the training loss is noise (RandAugment recolours these colour-coded
    # classes, 3 batches an epoch), the validation loss is the learning signal
    optimizer = build_optimizer([{'params': list(model.intermediate_heads.parameters())}], 'sgd', 5e-4, lr=1e-3)
    run = RunConfig(num_epochs=3, seed=0, checkpoint_dir=tmp_path / 'ckpt', run_args={})
    writer = Scalars()
    with contextlib.redirect_stdout(io.StringIO()):
        run_warmup_stage(model, train_loader, val_loader, optimizer, build_scheduler(optimizer, 3, 0.2),
                         torch.device('cpu'), run, WarmupConfig(3, 10, tmp_path / 'warmup'), writer, FRESH_START)
    changed = changed_keys(before, snapshot(model))
    assert changed and all(name.startswith('intermediate_heads.') for name in changed), changed
    assert {f'intermediate_heads.{k}.weight' for k in range(len(EXITS))} <= changed
    losses = writer.values['warmup/loss']
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert validation_warmup_loss(model, val_loader) < val_loss_before


# ---- Stage 2: what each phase may change --------------------------------------------------------------

def joint_trainer(model, freeze_backbone: bool, lr: float = 0.1, ratio: float = 0.01,
                  classifier_loss: str = 'boosted', phase_counter: str = 'global',
                  bilevel_batch_count: int = 1, final_exit_loss: str = 'off',
                  gate_lr: float | None = None) -> JointTrainer:
    optimizer = build_optimizer(dynn_param_groups(model, lr, ratio, gate_lr), 'sgd', 5e-4, lr=lr)
    set_joint_trainable(model, freeze_backbone)
    config = joint_config(freeze_backbone, classifier_loss, phase_counter, bilevel_batch_count, final_exit_loss)
    costs = torch.tensor(exit_gflops(model))
    return JointTrainer(model, optimizer, costs / costs[-1], config, RUN, torch.device('cpu'))


RUN = RunConfig(num_epochs=2, seed=0, checkpoint_dir=Path('unused'), run_args={})


def joint_config(freeze_backbone: bool = False, classifier_loss: str = 'boosted', phase_counter: str = 'epoch',
                 bilevel_batch_count: int = 1, final_exit_loss: str = 'off', joint_momentum: str = 'keep') -> JointConfig:
    return JointConfig(tradeoff=0.75, bilevel_batch_count=bilevel_batch_count, phase_counter=phase_counter,
                       gate_objective='ce', classifier_loss=classifier_loss, freeze_backbone=freeze_backbone,
                       final_exit_loss=final_exit_loss, joint_momentum=joint_momentum)


def one_batch_epoch(trainer: JointTrainer, loader, epoch: int) -> str:
    phase = trainer.phase(0)
    trainer.train_one_epoch(loader, epoch, torch.ones(len(EXITS)), NonFiniteGuard(5))
    return phase


def is_backbone(name: str) -> bool:
    return not name.startswith(('gates.', 'intermediate_heads.'))


@pytest.mark.parametrize('joint_momentum, resumed, kept', [('keep', False, True), ('reset', False, False),
                                                           ('reset', True, True)])
def test_joint_momentum_reset_drops_the_warmups_momentum_when_joint_training_starts(joint_momentum, resumed, kept):
    """--joint-momentum reset: the momentum buffers the warm-up left are gone when the joint stage starts, and
    a resumed joint stage keeps its own; keep (the reference) carries the warm-up's on."""
    model = tiny_model()
    optimizer = build_optimizer(dynn_param_groups(model, 0.1, 0.01), 'sgd', 5e-4, lr=0.1)
    for parameter in model.intermediate_heads.parameters():  # a warm-up step: momentum buffers for the heads
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    buffers = {id(p): optimizer.state[p]['momentum_buffer'].clone() for p in model.intermediate_heads.parameters()}
    resumed_state = {'stage_start_epoch': 1, 'pos_weight': torch.ones(len(EXITS)), 'global_step': 0}
    start = StartPoint('joint', RUN.num_epochs, 0.0, resumed_state) if resumed else StartPoint(None, RUN.num_epochs,
                                                                                               0.0, {})
    costs = torch.tensor(exit_gflops(model))  # start.epoch == num_epochs: the stage starts and runs no epoch
    run_joint_stage(model, random_loader(), random_loader(), optimizer, build_scheduler(optimizer, 2, 0.1),
                    torch.device('cpu'), costs / costs[-1], (costs / costs[-1]).tolist(), RUN,
                    joint_config(joint_momentum=joint_momentum), None, start)
    if kept:
        assert all(torch.equal(optimizer.state[p]['momentum_buffer'], buffers[id(p)])
                   for p in model.intermediate_heads.parameters())
    else:
        assert not optimizer.state  # no parameter has a buffer left


def test_gate_lr_scales_the_gates_step_and_nothing_else():
    """--gate-lr puts the gates in a group of their own: their first SGD step is gate_lr / lr times the step at
    the shared lr; without it the groups are the reference's two, so older optimizer states still load."""
    lr, gate_lr = 0.01, 0.5
    assert len(dynn_param_groups(tiny_model(), lr, 0.01)) == 2
    steps = {}
    for given in (None, gate_lr):
        model = tiny_model()
        start = snapshot(model)
        assert one_batch_epoch(joint_trainer(model, False, lr=lr, gate_lr=given), random_loader(batches=1), 0) == 'gate'
        after = snapshot(model)
        assert changed_keys(start, after) == {name for name in start if name.startswith('gates.')}
        steps[given] = {name: after[name] - start[name] for name in start if name.startswith('gates.')}
    for name, step in steps[None].items():
        torch.testing.assert_close(steps[gate_lr][name], step * (gate_lr / lr), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize('freeze_backbone, classifier_loss, final_exit_loss', [
    (False, 'boosted', 'off'), (True, 'boosted', 'off'), (True, 'boosted', 'auto'), (False, 'gate_weighted', 'off'),
    (False, 'boosted', 'auto')])
def test_joint_phases_change_only_their_parameters(freeze_backbone, classifier_loss, final_exit_loss):
    """Off (the reference) and a frozen backbone leave the final head alone; the default (auto) with a
    training backbone trains it and the blocks after the last exit, as gate_weighted does."""
    model = tiny_model()
    trainer = joint_trainer(model, freeze_backbone, classifier_loss=classifier_loss, final_exit_loss=final_exit_loss)
    loader = random_loader(batches=1)
    start = snapshot(model)

    assert one_batch_epoch(trainer, loader, 0) == 'gate'
    after_gate = snapshot(model)
    gate_changed = changed_keys(start, after_gate)
    assert gate_changed and all(name.startswith('gates.') for name in gate_changed), gate_changed

    assert one_batch_epoch(trainer, loader, 1) == 'classifier'
    cls_changed = changed_keys(after_gate, snapshot(model))
    assert not any(name.startswith('gates.') for name in cls_changed), cls_changed
    assert {f'intermediate_heads.{k}.weight' for k in range(len(EXITS))} <= cls_changed
    backbone_changed = {name for name in cls_changed if is_backbone(name)}
    if freeze_backbone:
        assert not backbone_changed
        assert not any(p.requires_grad for n, p in model.named_parameters() if is_backbone(n))
    elif classifier_loss == 'boosted' and final_exit_loss == 'off':  # mean CE of the intermediate exits only:
        # nothing after the last one moves
        assert {'blocks.0.filter.complex_weight', 'patch_embed.proj.weight', 'norm.weight'} <= backbone_changed
        assert not any(name.startswith(('head.', 'blocks.8.', 'blocks.11.')) for name in backbone_changed)
    else:  # gate_weighted, or the final exit's CE added (auto), trains the final head
        assert {'head.weight', 'blocks.11.mlp.fc2.weight', 'patch_embed.proj.weight'} <= backbone_changed


def test_joint_backbone_steps_at_lr_times_transfer_ratio():
    """First SGD step (momentum buffer = gradient): p' = p - group_lr * (grad + wd * p), with the backbone's
    group_lr = lr * transfer_ratio and the exit heads' = lr."""
    lr, ratio, wd = 0.1, 0.01, 5e-4
    model = tiny_model()
    trainer = joint_trainer(model, freeze_backbone=False, lr=lr, ratio=ratio)
    loader = random_loader(batches=1)
    one_batch_epoch(trainer, loader, 0)  # gate phase
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    one_batch_epoch(trainer, loader, 1)  # classifier phase: the gradients stay on the parameters
    checked = 0
    for name, param in model.named_parameters():
        if name.startswith('gates.') or param.grad is None:
            continue
        group_lr = lr * ratio if is_backbone(name) else lr
        expected = before[name] - group_lr * (param.grad + wd * before[name])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)
        checked += 1
    assert checked > 10


def test_phase_counter_restarts_every_epoch_by_default_and_opens_with_the_gate_phase():
    trainer = JointTrainer(tiny_model(), None, torch.ones(3), joint_config(bilevel_batch_count=2), RUN,
                           torch.device('cpu'))
    assert [trainer.phase(step) for step in range(6)] == ['gate', 'gate', 'classifier', 'classifier', 'gate', 'gate']
    trainer.global_step = 3  # where the batch counter stands across epochs does not matter
    assert trainer.phase(0) == 'gate'


def test_global_phase_counter_runs_across_epochs():
    trainer = JointTrainer(tiny_model(), None, torch.ones(3),
                           joint_config(phase_counter='global', bilevel_batch_count=2), RUN, torch.device('cpu'))
    trainer.global_step = 3
    assert trainer.phase(0) == 'classifier'
    trainer.global_step = 4
    assert trainer.phase(0) == 'gate'


def test_identity_gates_skip_the_gate_phase():
    model = build_dynn('GFNet-ti-dynn', 3, 32, 8, 0.0, EXITS, 'identity')
    trainer = JointTrainer(model, None, torch.ones(3), joint_config(bilevel_batch_count=1), RUN, torch.device('cpu'))
    assert [trainer.phase(step) for step in range(4)] == ['classifier'] * 4


def test_epochs_shorter_than_one_phase_are_announced(caplog):
    _warn_if_only_gates_train(joint_config(bilevel_batch_count=60), batches_per_epoch=26, gates_learn=True)
    assert 'only the gates train' in caplog.text and '--phase-counter global' in caplog.text
    caplog.clear()
    _warn_if_only_gates_train(joint_config(bilevel_batch_count=60, phase_counter='global'), 26, True)
    _warn_if_only_gates_train(joint_config(bilevel_batch_count=20), 26, True)
    _warn_if_only_gates_train(joint_config(bilevel_batch_count=60), 26, gates_learn=False)
    assert not caplog.text


# ---- Stage 2: the trade-off --------------------------------------------------------------------------

def first_gate_probability_and_cost(checkpoint_path: Path, val_loader) -> tuple[float, float]:
    """Mean exit probability of the first gate, and the mean normalised cost under the training-time exit rule,
    on validation."""
    model = reopen(str(checkpoint_path)).model
    costs = torch.tensor(exit_gflops(model))
    cache = collect_exit_outputs(model, val_loader, torch.device('cpu'))
    chosen = conditional_exit_choice(cache.gate_probs)
    return cache.gate_probs[0].double().mean().item(), (costs / costs[-1])[chosen].double().mean().item()


@pytest.mark.slow
def test_higher_tradeoff_exits_earlier(tiny_backbone, tiny_data, tiny_loaders, tmp_path):
    from main_dynn import main
    assert tiny_backbone.rc == 0
    results = {}
    for lam in ('0.0', '50.0'):
        with contextlib.redirect_stdout(io.StringIO()):
            rc = main(['--stage', 'dynn', *TINY_FLAGS, '--checkpoint-path', str(tiny_backbone.checkpoint),
                       '--exit-positions', *map(str, EXITS), '--num_epoch', '4', '--max_warmup_epoch', '1',
                       '--freeze-backbone', '--lr', '0.05', '--ce_ic_tradeoff', lam, '--output-dir', str(tmp_path)])
        assert rc == 0
        last = tmp_path / 'checkpoint' / f'checkpoint_TINY_{lam}_confEE' / 'last.pth'
        results[lam] = first_gate_probability_and_cost(last, tiny_loaders[1])
    (gate_low, cost_low), (gate_high, cost_high) = results['0.0'], results['50.0']
    # lambda 0: the best exit is the most accurate one; lambda 50: the first exit for every sample
    assert gate_high > gate_low + 0.03 and cost_high <= cost_low, results


def test_a_frozen_cnn_backbone_keeps_its_batchnorm_statistics_in_the_joint_stage():
    """--freeze-backbone on a CNN: both phases leave every backbone tensor, BatchNorm running statistics
    included, as it was, so the exits keep reading the features they warmed up on."""
    torch.manual_seed(0)
    model = build_dynn('test_resnet', 3, 32, None, 0.0, [0, 1], 'unc')  # as many exits as EXITS
    costs = torch.tensor(exit_gflops(model))
    trainer = JointTrainer(model, build_optimizer(dynn_param_groups(model, 0.1, 0.01), 'sgd', 5e-4, lr=0.1),
                           costs / costs[-1], joint_config(True, phase_counter='global'), RUN, torch.device('cpu'))
    set_joint_trainable(model, True)
    start = snapshot(model)
    assert {one_batch_epoch(trainer, random_loader(batches=1), epoch) for epoch in (0, 1)} == {'gate', 'classifier'}
    changed = changed_keys(start, snapshot(model))
    assert changed and not {name for name in changed if is_backbone(name)}, changed
