"""A backbone family is one `Layout` entry: a channels-last family (timm's MambaOut, which has no layout of ours)
registered in one place trains, evaluates and exports with its exits pooled over the right axes, and a layout
without a pooling rule cannot be declared."""
import json

import pytest
import torch
from timm.models.mambaout import MambaOut
from torch.testing import assert_close

import models.timm_dynn as timm_dynn
from main_dynn import main
from models.early_exit import EarlyExitEngine
from models.exit_heads import ExitHeadConfig, grid_pool
from models.model_factory import build_dynn, check_arch
from models.timm_dynn import CHANNELS_LAST_MAP, Layout

SIZE = 32
NUM_CLASSES = 5
WIDTHS = (16, 32, 48)  # test_mambaout's channels after stages 0, 1, 2 (its default exits)


def _mambaout_layout(**pooling) -> Layout:
    return Layout(name='MambaOut', example='test_mambaout', model_class=MambaOut, modules=('mambaout',),
                  unit='stage', parts=lambda m: ([m.stem], list(m.stages), []),
                  default_exits=lambda stages: tuple(range(stages - 1)), **pooling)


@pytest.fixture
def mambaout(monkeypatch) -> Layout:
    """MambaOut's (B, H, W, C) stages registered as a family with exits, for this test only."""
    layout = _mambaout_layout(pooling=CHANNELS_LAST_MAP)
    monkeypatch.setattr(timm_dynn, 'LAYOUTS', (*timm_dynn.LAYOUTS, layout))
    return layout


def test_a_layout_without_a_pooling_rule_cannot_be_declared():
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'pooling'"):
        _mambaout_layout()
    with pytest.raises(TypeError, match=r'layout MambaOut: pooling must be a Pooling \(CHANNELS_FIRST_MAP, '
                                        r'CHANNELS_LAST_MAP or TOKENS\), not None'):
        _mambaout_layout(pooling=None)


def test_the_entry_alone_opens_the_family_to_every_job_and_to_the_messages(mambaout):
    check_arch('test_mambaout', 'dynn')
    assert timm_dynn.supported_families().startswith('ResNet, EfficientNet, MobileNetV3, ConvNeXt, ViT/DeiT and '
                                                     'MambaOut models (e.g. resnet18, ')
    assert timm_dynn.supported_families().endswith('deit_tiny_patch16_224, test_mambaout)')


@pytest.mark.parametrize('head', ['linear', 'pool'])
def test_channels_last_exits_pool_over_height_and_width(mambaout, head):
    torch.manual_seed(0)
    model = build_dynn('test_mambaout', NUM_CLASSES, SIZE, None, 0.0, None, 'unc', ExitHeadConfig(head)).eval()
    assert model.exit_positions == (0, 1, 2) and model.carried == 'feature_maps'
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        out, features = model.forward_exits(images), images
        for k, width in enumerate(WIDTHS):
            features = model.run_segment(k, features)  # (B, H, W, C)
            assert features.shape[-1] == width
            maps = features.permute(0, 3, 1, 2)
            expected = maps.mean(dim=(2, 3)) if head == 'linear' else grid_pool(maps, 2)
            assert_close(model.head_input(k, features), expected)
            assert_close(out.logits[k], model.intermediate_heads[k](expected))
        assert_close(out.logits[-1], model.backbone(images))


@pytest.mark.slow
def test_a_registered_layout_trains_evaluates_and_exports(mambaout, small_data, tmp_path, capsys):
    pytest.importorskip('onnxscript')
    from deployment.onnx_runner import OnnxEarlyExit
    from jobs.trained_run import reopen
    from models.weights import read_checkpoint
    from test_models_timm_dynn import _val_images
    run = ['--data-set', 'TINY', '--num_workers', '0', '--batch', '8', '--device', 'cpu', '--barely_train']
    out = tmp_path / 'out'
    assert main([*run, '--arch', 'test_mambaout', '--input-size', str(SIZE), '--exit-head', 'pool',
                 '--num_epoch', '2', '--max_warmup_epoch', '1', '--output-dir', str(out)]) == 0
    best = out / 'checkpoint' / 'checkpoint_TINY_test_mambaout_0.75_confEE' / 'best.pth'  # a timm backbone's run
    checkpoint = read_checkpoint(best)
    assert checkpoint['args']['exit_positions'] == [0, 1, 2]
    assert checkpoint['model']['intermediate_heads.2.fc.weight'].shape == (3, WIDTHS[2] * 2 * 2)

    results_path = tmp_path / 'results.json'
    assert main([*run, '--eval', '--checkpoint-path', str(best), '--results-json', str(results_path)]) == 0
    results = json.loads(results_path.read_text())
    assert results['arch'] == 'test_mambaout' and results['exit_positions'] == [0, 1, 2]
    assert results['gflops_per_exit'] == sorted(results['gflops_per_exit'])

    onnx_dir = tmp_path / 'onnx'
    assert main(['--data-set', 'TINY', '--export', 'onnx', '--checkpoint-path', str(best), '--out', str(onnx_dir),
                 '--exit-threshold', '0.5']) == 0
    runner = OnnxEarlyExit(onnx_dir)
    assert runner.num_exits == 4 and runner.input_names[1] == 'feature_maps'
    images = _val_images(small_data, SIZE)
    expected = EarlyExitEngine(reopen(checkpoint, str(best)).model, 0.5)(torch.from_numpy(images))
    predictions, exits = runner.predict(images)
    assert exits.tolist() == expected.exit_index.tolist()
    assert predictions.tolist() == expected.predictions.tolist()
