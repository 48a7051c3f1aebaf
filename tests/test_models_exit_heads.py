"""Exit heads: the layout-keeping pool head against a hand computation, its FLOPs against the analytic count, the
reference's head unchanged; end to end on GFNet, a CNN and a ViT: each head with --exit-norm and --exit-distill
trains, resumes, evaluates, exports (float and int8) and runs in the torch-free runner."""
import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import one_error, resume_one_epoch_longer
from test_deployment_onnx import PORTABLE_OPS
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.testing import assert_close

from deployment.onnx_runner import OnnxEarlyExit, image_files, preprocess
from deployment.onnx_runner import main as runner_main
from jobs.run_setup import dynn_run_folder
from jobs.trained_run import reopen
from main_dynn import main
from models.early_exit import EarlyExitEngine
from models.exit_heads import ExitHead, ExitHeadConfig, adaptive_windows, build_exit_head, grid_pool
from models.flops import count_flops, exit_gflops
from models.gfnet import VARIANTS
from models.model_factory import build_dynn

POOL = ExitHeadConfig('pool', 'layernorm', 2)
ARCHS = {'gfnet': ('GFNet-ti-dynn', 16, 8), 'cnn': ('test_resnet', 16, None), 'vit': ('test_vit', 32, None)}


def _model(family: str, config: ExitHeadConfig) -> nn.Module:
    arch, size, patch = ARCHS[family]
    torch.manual_seed(0)
    return build_dynn(arch, 3, size, patch, 0.0, None, 'unc', config).eval()


def test_grid_pool_equals_the_max_and_mean_of_each_quadrant_by_hand():
    maps = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)  # rows 0-3, 4-7, 8-11, 12-15
    # quadrants: top-left {0, 1, 4, 5}, top-right {2, 3, 6, 7}, bottom-left {8, 9, 12, 13},
    # bottom-right {10, 11, 14, 15}
    expected = torch.tensor([[5, 7, 13, 15, 2.5, 4.5, 10.5, 12.5]], dtype=torch.float64)
    assert torch.equal(grid_pool(maps, 2), expected)


@pytest.mark.parametrize('height, width, cells', [(5, 7, 2), (1, 1, 2), (14, 14, 3), (6, 3, 4)])
def test_grid_pool_cuts_windows_as_adaptive_pooling_does(height, width, cells):
    torch.manual_seed(0)
    maps = torch.randn(2, 3, height, width)
    expected = torch.cat([F.adaptive_max_pool2d(maps, cells).flatten(1), F.adaptive_avg_pool2d(maps, cells).flatten(1)],
                         dim=1)
    assert_close(grid_pool(maps, cells), expected)
    assert adaptive_windows(7, 2) == [(0, 4), (3, 7)]  # torch's overlapping windows for an odd size


def test_pool_head_equals_mixing_norm_and_linear_by_hand():
    torch.manual_seed(0)
    head = ExitHead(8, 3, mixes=True, norm=True, dtype=torch.float64)
    with torch.no_grad():
        head.alpha.fill_(0.3)
        head.norm.weight.uniform_(0.5, 1.5)
        head.norm.bias.uniform_(-0.1, 0.1)
    pooled = torch.randn(5, 8, dtype=torch.float64)
    mixed = 0.3 * pooled[:, :4] + 0.7 * pooled[:, 4:]
    centred = mixed - mixed.mean(dim=1, keepdim=True)
    normed = centred / (centred.pow(2).mean(dim=1, keepdim=True) + 1e-5).sqrt() * head.norm.weight + head.norm.bias
    assert_close(head(pooled), normed @ head.fc.weight.T + head.fc.bias)


def test_the_reference_head_stays_a_plain_linear_layer():
    for family in ARCHS:
        model = _model(family, ExitHeadConfig())
        assert all(type(head) is nn.Linear for head in model.intermediate_heads)
        assert 'intermediate_heads.0.weight' in model.state_dict()
    linear_norm = build_exit_head(ExitHeadConfig('linear', 'layernorm'), 16, 3)
    assert linear_norm.alpha is None and isinstance(linear_norm.norm, nn.LayerNorm) and linear_norm.fc.in_features == 16


@pytest.mark.parametrize('family', sorted(ARCHS))
def test_pool_head_reads_the_grid_whose_average_is_the_global_pool(family):
    """The grid's average cells, averaged, give the reference's global pool (GFNet, CNN); a ViT's grid holds its
    normed patch tokens."""
    model = _model(family, POOL)
    images = torch.randn(2, 3, *model.input_size)
    with torch.no_grad():
        features = model.run_segment(0, images)
        grid = model.feature_grid(0, features)
        pooled = model.head_input(0, features)
    channels = grid.shape[1]
    assert pooled.shape == (2, 2 * channels * 4)
    average_cells = pooled[:, channels * 4:].reshape(2, channels, 4)
    if family == 'vit':
        tokens = model.backbone.norm(features)[:, model.backbone.num_prefix_tokens:]
        assert_close(grid.flatten(2).transpose(1, 2), tokens)
    else:
        assert_close(average_cells.mean(dim=2), model.pool_features(0, features))
    assert model.intermediate_heads[0].fc.in_features == channels * 4


@pytest.mark.parametrize('family', sorted(ARCHS))
def test_pool_head_flops_are_the_analytic_count_and_join_the_exit_costs(family):
    """The head's Linear on C * 4 mixed cells: 2 * C * 4 * classes FLOPs per image (pooling, mixing and the norm
    are element-wise, uncounted as the stock counter leaves them); every exit cost from exit k on grows by the
    heads' extra FLOPs up to k."""
    linear, pool = _model(family, ExitHeadConfig()), _model(family, POOL)
    extra = []
    for k, head in enumerate(pool.intermediate_heads):
        width = head.fc.in_features
        assert count_flops(head, torch.randn(1, 2 * width)) == 2 * width * 3
        extra.append(2 * width * 3 - 2 * linear.intermediate_heads[k].in_features * 3)
    growth = [p - q for p, q in zip(exit_gflops(pool), exit_gflops(linear))]
    expected = [sum(extra[:k + 1]) / 1e9 for k in range(len(extra))] + [sum(extra) / 1e9]
    assert_close(torch.tensor(growth, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                 rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize('flags, message', [
    (['--exit-grid', '3'], '--exit-grid sizes the grid of --exit-head pool; --exit-head linear pools over all '
                           'positions'),
    (['--exit-distill-tau', '2'], '--exit-distill-tau given without --exit-distill'),
    (['--exit-distill', '-1'], '--exit-distill must be >= 0'),
    (['--exit-head', 'pool', '--eval', '--checkpoint-path', 'x.pth'], '--exit-head has no effect with --eval')])
def test_exit_head_flags_that_cannot_act_are_one_error_line(flags, message, tmp_path, capsys):
    assert message in one_error(capsys, [*flags, '--output-dir', str(tmp_path)], main)
    assert not any(tmp_path.iterdir())


# End to end through main_dynn.main, in this process: stages 1-2 (one exit, so two ONNX segments) with each head,
# --resume, --eval, --export onnx --quantize int8 and the torch-free runner. Every backbone runs both heads, each
# head with and without --exit-distill across the backbones. An export costs seconds, so the first tier runs each
# backbone once: the pool head with distillation on GFNet, the linear head with it on the CNN, the pool head without
# it on the ViT (the linear head without it is the reference's, which the rest of the first tier trains and exports
# on GFNet); the second tier runs the other three.
HEAD_FLAGS = {'linear': [], 'pool': ['--exit-head', 'pool', '--exit-grid', '2', '--exit-norm', 'layernorm']}
DISTILL_FLAGS = ['--exit-distill', '0.5', '--exit-distill-tau', '2']
RUNS = [('gfnet', 'pool', True), ('cnn', 'linear', True), ('vit', 'pool', False),
        *(pytest.param(*run, marks=pytest.mark.slow) for run in (('gfnet', 'linear', False), ('cnn', 'pool', False),
                                                                 ('vit', 'linear', True)))]
HEAD_ARGS = ('exit_head', 'exit_grid', 'exit_norm', 'exit_distill', 'exit_distill_tau')


def _train_and_resume(family: str, head: str, distill: bool, out, capsys) -> list[str]:
    """Stages 1-2 (one warm-up and one joint epoch) on a fresh backbone, then --resume of one more joint epoch, which
    keeps the run's head; the flags later jobs share."""
    arch, size, patch = ARCHS[family]
    common = ['--data-set', 'TINY', '--arch', arch, *(['--patch-size', str(patch)] if patch else []), '--num_workers',
              '0', '--batch', '8', '--device', 'cpu', '--barely_train']
    flags = [*HEAD_FLAGS[head], *(DISTILL_FLAGS if distill else [])]
    assert main([*common, '--input-size', str(size), '--output-dir', str(out), '--num_epoch', '2',
                 '--max_warmup_epoch', '1', '--exit-positions', '0', *flags]) == 0
    last = out / 'checkpoint' / dynn_run_folder('.', 'TINY', 0.75, arch).name / 'last.pth'
    saved, resumed = resume_one_epoch_longer(last, capsys)
    assert saved['args']['exit_head'] == head and saved['args']['exit_distill'] == (0.5 if distill else 0.0)
    assert {key: resumed['args'][key] for key in HEAD_ARGS} == {key: saved['args'][key] for key in HEAD_ARGS}
    return common


def _check_float_segments(onnx_dir, model: nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each float segment gives what torch gives on the same input (standard ops only), and the chained segments
    take the engine's exits; the float predictions and exits."""
    runner = OnnxEarlyExit(onnx_dir)
    for name in runner.manifest['segments']:
        assert {node.op_type for node in onnx.load(onnx_dir / name).graph.node} <= PORTABLE_OPS, name
    with torch.no_grad():
        features, logits, gate_logits = model.forward_segment(0, torch.from_numpy(images))
        final = model.forward_segment(1, features)[1]
    onnx_features, onnx_logits, onnx_gate = runner.run_segment(0, images)
    assert_close(torch.from_numpy(onnx_features), features, rtol=1e-4, atol=1e-4)
    assert_close(torch.from_numpy(onnx_logits), logits, rtol=1e-4, atol=1e-4)
    assert_close(torch.from_numpy(onnx_gate), torch.sigmoid(gate_logits), rtol=1e-4, atol=1e-5)
    assert_close(torch.from_numpy(runner.run_segment(1, features.numpy())[0]), final, rtol=1e-4, atol=1e-4)
    expected = EarlyExitEngine(model, 0.5)(torch.from_numpy(images))
    predictions, exits = runner.predict(images)
    assert exits.tolist() == expected.exit_index.tolist()
    assert predictions.tolist() == expected.predictions.tolist()
    return predictions, exits


@pytest.mark.parametrize('family, head, distill', RUNS)
def test_each_head_trains_resumes_evaluates_exports_and_runs_without_torch(family, head, distill, small_data,
                                                                         tmp_path, capsys, monkeypatch):
    # GFNet-Ti cut to 2 blocks of width 32: the same code path, at a fraction of the cost of tracing 12 blocks
    monkeypatch.setitem(VARIANTS, 'gfnet_ti', {**VARIANTS['gfnet_ti'], 'depth': 2, 'embed_dim': 32})
    common = _train_and_resume(family, head, distill, tmp_path, capsys)
    best = tmp_path / 'checkpoint' / dynn_run_folder('.', 'TINY', 0.75, ARCHS[family][0]).name / 'best.pth'
    model, run_args, _ = reopen(str(best))
    assert type(model.intermediate_heads[0]) is (ExitHead if head == 'pool' else nn.Linear)

    results_path = tmp_path / 'results.json'
    assert main([*common, '--eval', '--checkpoint-path', str(best), '--results-json', str(results_path)]) == 0
    results = json.loads(results_path.read_text())
    assert len(results['per_exit_accuracy']) == 2 and results['gflops_per_exit'] == pytest.approx(exit_gflops(model))

    onnx_dir = tmp_path / 'onnx'
    assert main(['--data-set', 'TINY', '--export', 'onnx', '--quantize', 'int8', '--calib-images', '8',
                 '--num_workers', '0', '--checkpoint-path', str(best), '--out', str(onnx_dir),
                 '--exit-threshold', '0.5']) == 0
    paths = list(image_files([str(small_data / 'val')]))
    images = np.stack([preprocess(p, model.input_size[0], list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))
                       for p in paths])
    predictions, _ = _check_float_segments(onnx_dir, model, images)
    int8_predictions, int8_exits = OnnxEarlyExit(onnx_dir, precision='int8').predict(images)
    assert (int8_predictions != predictions).sum() <= 1  # int8 keeps all but at most one of float's 6 answers
    jsonl = tmp_path / 'predictions.jsonl'
    assert runner_main([str(onnx_dir), str(small_data / 'val'), '--precision', 'int8', '--jsonl', str(jsonl)]) == 0
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(row['file'], row['class'], row['exit']) for row in rows] == [
        (path, run_args.class_names[c], int(e)) for path, c, e in zip(paths, int8_predictions, int8_exits)]
