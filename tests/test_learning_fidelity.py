"""The early-exit stages run the reference's training path by default: one optimizer and schedule across
warm-up and joint training, per-epoch phases, the conditional exit rule choosing checkpoints, the exit-cost
vector of choice, conformal thresholds in every joint checkpoint, identity gates, and input sizes the patch
does not divide."""
import contextlib
import io
import json
import math
import re

import pytest
import torch

import dataset_config
import main_dynn
from conftest import TINY_FLAGS, tiny_entry
from evaluation.exit_cache import collect_exit_outputs, conditional_exit_choice, exit_point
from jobs.trained_run import reopen
from learning_helpers import dynn_training
from learning_helpers.joint_stage import snapshot_name
from models.flops import exit_gflops, normalized_exit_costs, reference_normalized_exit_costs

EXITS = ['3', '7']
LR, MIN_LR, RATIO = 0.01, 2e-4, 0.01


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def reference_path_run(tiny_backbone, tmp_path_factory):
    """A dynn run with the default training path (1 warm-up + 2 joint epochs, phases of one batch, default exit
    costs), with spies on the optimizer factory and on the costs the joint stage receives."""
    out = tmp_path_factory.mktemp('reference_path')
    built, seen_costs = [], []
    real_build, real_joint = dynn_training.build_optimizer, dynn_training.run_joint_stage

    def counting_build(*args, **kwargs):
        built.append(args[1])  # the optimizer's name
        return real_build(*args, **kwargs)

    def spying_joint(model, train_loader, val_loader, optimizer, scheduler, device, costs, *args, **kwargs):
        seen_costs.append((costs.tolist(), reference_normalized_exit_costs(model), normalized_exit_costs(model),
                           list(args[0])))  # args[0]: the true FLOP shares the joint stage reports with
        return real_joint(model, train_loader, val_loader, optimizer, scheduler, device, costs, *args, **kwargs)

    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(tiny_backbone.data))
        patch.setattr(dynn_training, 'build_optimizer', counting_build)
        patch.setattr(dynn_training, 'run_joint_stage', spying_joint)
        rc = main_dynn.main([*TINY_FLAGS, '--checkpoint-path', str(tiny_backbone.checkpoint), '--num_epoch', '3',
                             '--max_warmup_epoch', '1', '--exit-positions', *EXITS, '--bilevel_batch_count', '1',
                             '--lr', str(LR), '--min-lr', str(MIN_LR), '--output-dir', str(out)])
    return {'rc': rc, 'out': out, 'stdout': stdout.getvalue(), 'built': built, 'costs': seen_costs,
            'folder': out / 'checkpoint' / 'checkpoint_TINY_0.75_confEE', 'data': tiny_backbone.data}


def _cosine(step: int, total: int) -> float:
    """torch's CosineAnnealingLR in closed form, eta_min = --min-lr, T_max = --num_epoch."""
    return MIN_LR + (LR - MIN_LR) * (1 + math.cos(math.pi * step / total)) / 2


@pytest.mark.slow
def test_one_sgd_optimizer_for_both_stages_and_cosine_steps_only_after_joint_epochs(reference_path_run):
    assert reference_path_run['rc'] == 0
    assert reference_path_run['built'] == ['sgd']  # built once, shared by warm-up and joint training
    lrs = [float(m) for m in re.findall(r'(?:warm-up|joint) epoch \d+ \|.* lr (\S+) \|', reference_path_run['stdout'])]
    # warm-up epoch 0 and joint epoch 1 at the constant lr; joint epoch 2 after one cosine step over 3 epochs
    assert lrs == pytest.approx([LR, LR, _cosine(1, 3)], rel=1e-2)  # printed with 3 digits
    groups = _load(reference_path_run['folder'] / 'last.pth')['optimizer']['param_groups']
    assert [g['lr'] for g in groups] == pytest.approx([_cosine(2, 3), _cosine(2, 3) * RATIO], rel=1e-12)
    assert all(g['momentum'] == 0.9 and g['weight_decay'] == 5e-4 for g in groups)


@pytest.mark.slow
def test_gates_train_against_the_reference_costs_by_default_and_reports_stay_true_flops(reference_path_run):
    (costs, reference, true, reported), = reference_path_run['costs']
    assert costs == pytest.approx(reference)
    assert costs[-1] == 1.0 and costs[0] > true[0] + 0.01  # the reference counter's flatter vector
    assert reported == pytest.approx(true)  # the mean cost each epoch prints is a share of true FLOPs
    assert _load(reference_path_run['folder'] / 'best.pth')['args']['exit_costs'] == 'reference'


@pytest.mark.slow
def test_snapshots_and_best_follow_the_conditional_exit_rule(reference_path_run, tiny_data):
    folder = reference_path_run['folder']
    last = _load(folder / 'last.pth')
    model = reopen(last, 'last.pth').model
    from data_loader_help import build_datasets, build_loaders
    _, val_loader = build_loaders(*build_datasets('TINY', reference_path_run['data'], 32)[:2], 8, 0, seed=0)
    cache = collect_exit_outputs(model, val_loader, torch.device('cpu'))
    gflops = exit_gflops(model)
    accuracy = exit_point(cache, conditional_exit_choice(cache.gate_probs), gflops)['accuracy']
    assert last['acc'] == pytest.approx(accuracy)
    assert (folder / snapshot_name(last['epoch'], 0.75, accuracy)).is_file()
    assert snapshot_name(81, 0.75, 68.8) == 'ckpt_epoch81_0.75_68.8.pth'  # the reference's released names


@pytest.mark.slow
def test_every_joint_checkpoint_stores_the_conformal_thresholds(reference_path_run):
    paths = sorted(reference_path_run['folder'].glob('*.pth'))
    assert len(paths) == 4  # best, last, two snapshots
    for path in paths:
        conformal = _load(path)['conformal']
        assert conformal['alphas'] == pytest.approx([0.01 + 0.005 * i for i in range(9)])
        assert len(conformal['general']) == 9
        assert all(len(row) == len(EXITS) + 1 for row in conformal['gated'])


@pytest.mark.slow
def test_eval_reports_conformal_coverage_and_set_size(reference_path_run, tiny_data, tmp_path, capsys):
    json_path = tmp_path / 'results.json'
    rc = main_dynn.main([*TINY_FLAGS, '--eval', '--checkpoint-path', str(reference_path_run['folder'] / 'best.pth'),
                         '--results-json', str(json_path)])
    out = capsys.readouterr().out
    assert rc == 0
    conformal = json.loads(json_path.read_text())['conformal']
    assert [row['alpha'] for row in conformal['overall']] == pytest.approx([0.01 + 0.005 * i for i in range(9)])
    for row in conformal['overall']:
        for kind in ('general', 'gated', 'all', 'strict'):
            assert 0 <= row[kind]['coverage'] <= 100 and row[kind]['mean_set_size'] >= 0
        # calibrated on these very images when the checkpoint was written: coverage holds
        assert row['general']['coverage'] >= 100 * (1 - row['alpha'])
    assert len(conformal['per_exit']) == 9 * (len(EXITS) + 1)
    assert 'conformal prediction sets' in out


@pytest.mark.slow
def test_short_epochs_train_only_the_gates_and_say_so(tiny_backbone, tiny_data, tmp_path, capsys):
    """3 batches an epoch, phases of 60 (the default): every joint epoch is a gate phase, as in the reference."""
    args = [*TINY_FLAGS, '--checkpoint-path', str(tiny_backbone.checkpoint), '--exit-positions', *EXITS,
            '--max_warmup_epoch', '1', '--output-dir', str(tmp_path)]
    assert main_dynn.main([*args, '--num_epoch', '1']) == 0  # the warm-up alone
    warmed = _load(tmp_path / 'checkpoint' / 'checkpoint_TINY_0.75_confEE' / 'last.pth')['model']
    assert main_dynn.main([*args, '--num_epoch', '3', '--output-dir', str(tmp_path / 'joint')]) == 0
    err = capsys.readouterr().err
    assert 'only the gates train in stage 2' in err
    joint = _load(tmp_path / 'joint' / 'checkpoint' / 'checkpoint_TINY_0.75_confEE' / 'last.pth')['model']
    changed = {key for key in warmed if not torch.equal(warmed[key], joint[key])}
    assert changed and all(key.startswith('gates.') for key in changed), changed


@pytest.mark.slow
def test_identity_gates_train_and_evaluate_as_the_max_probability_baseline(tiny_backbone, tiny_data, tmp_path,
                                                                          capsys):
    rc = main_dynn.main([*TINY_FLAGS, '--checkpoint-path', str(tiny_backbone.checkpoint), '--gate', 'identity',
                         '--exit-positions', *EXITS, '--num_epoch', '2', '--max_warmup_epoch', '1',
                         '--bilevel_batch_count', '1', '--output-dir', str(tmp_path)])
    assert rc == 0, capsys.readouterr().err
    best = tmp_path / 'checkpoint' / 'checkpoint_TINY_0.75_confEE' / 'best.pth'
    assert not any(key.startswith('gates.') for key in _load(best)['model'])  # nothing to learn, nothing stored
    json_path = tmp_path / 'results.json'
    assert main_dynn.main([*TINY_FLAGS, '--eval', '--checkpoint-path', str(best), '--results-json', str(json_path),
                           '--thresholds', '0.5', '0.99']) == 0
    results = json.loads(json_path.read_text())
    model = reopen(str(best)).model
    with torch.no_grad():
        probs = model.forward_exits(torch.randn(4, 3, 32, 32))
    max_prob = probs.logits[:-1].softmax(-1).amax(-1)
    assert torch.allclose(torch.sigmoid(probs.gate_logits), max_prob, atol=1e-5)  # the gate is max probability
    assert [point['threshold'] for point in results['sweep']] == [0.5, 0.99]


@pytest.mark.slow
def test_input_size_the_patch_does_not_divide_trains_on_the_floored_grid(tiny_backbone, tiny_data, tmp_path,
                                                                        capsys):
    """36 px with 8 px patches: a 4 x 4 grid, as the official GFNet floors it (AID's default 600 px at patch 16
    is 37 x 37)."""
    rc = main_dynn.main(['--stage', 'backbone', *TINY_FLAGS, '--input-size', '36', '--num_epoch', '1',
                         '--barely_train', '--output-dir', str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert 'input 36 px with 8 px patches: a 4 x 4 token grid; the last 4 pixels' in err
    best = _load(tmp_path / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'best.pth')
    assert best['model']['pos_embed'].shape == (1, 16, 256) and best['args']['input_size'] == 36
