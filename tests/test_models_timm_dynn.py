"""Early exits on timm backbones: per family, the segments chained equal the unsplit model, their FLOPs add up to
the whole model's, and real early exit equals the cached sweep sample by sample; a stage-0 checkpoint loads into
the early-exit model; end-to-end runs of a CNN and a ViT from stage 0 to the ONNX runner."""
import json
import re

import numpy as np
import pytest
import torch
from conftest import halve_at_each_exit, one_error, resume_one_epoch_longer
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from errors import GFNetDynnError
from evaluation.exit_cache import collect_exit_outputs, gated_predictions
from jobs.trained_run import reopen
from models.model_factory import build_backbone, build_dynn, check_arch
from main_dynn import main
from models.early_exit import EarlyExitEngine
from models.flops import count_flops, exit_gflops, reference_normalized_exit_costs
from models.timm_dynn import TimmDynn
from models.weights import load_state, read_checkpoint

SIZE = 32
BATCH = 16
NUM_CLASSES = 5
# timm's own tiny test models where it has one; mobilenetv3_small_050 (0.6 M parameters) stands for MobileNetV3
FAMILIES = {'resnet': 'test_resnet', 'efficientnet': 'test_efficientnet', 'mobilenetv3': 'mobilenetv3_small_050',
            'convnext': 'test_convnext', 'vit': 'test_vit'}
DEFAULT_EXITS = {'resnet': (0, 1, 2), 'efficientnet': (2, 3), 'mobilenetv3': (2, 3, 4), 'convnext': (0, 1, 2),
                 'vit': (1, 3)}
THRESHOLDS = [0.3, 0.5, 0.7]


def _tiny(family: str) -> TimmDynn:
    torch.manual_seed(0)
    return build_dynn(FAMILIES[family], NUM_CLASSES, SIZE, None, 0.0, None, 'unc').eval()


@pytest.fixture(scope='module', params=sorted(FAMILIES))
def family_model(request) -> tuple[str, TimmDynn, torch.Tensor]:
    """(family, tiny early-exit model with its default exits, images). Exits and gates are set so that about
    half of the samples still inside leave at each exit at threshold 0.5 (gate k = 50 * (max prob_k - median
    among those left)), as the GFNet engine test does."""
    family = request.param
    model = _tiny(family)
    images = torch.randn(BATCH, 3, SIZE, SIZE)
    halve_at_each_exit(model, images)
    return family, model, images


def test_default_exits_follow_the_family(family_model):
    family, model, _ = family_model
    assert model.exit_positions == DEFAULT_EXITS[family]
    assert model.num_exits == len(DEFAULT_EXITS[family]) + 1


def test_segments_chained_equal_the_unsplit_forward(family_model):
    _, model, images = family_model
    with torch.no_grad():
        features = images
        for k in range(model.num_exits):
            features, logits, _ = model.forward_segment(k, features)
        assert_close(features, model.backbone.forward_features(images))
        assert_close(logits, model.backbone(images))
        assert_close(model.forward_exits(images).logits[-1], model.backbone(images))


def test_forward_exits_equal_each_segment_exit(family_model):
    _, model, images = family_model
    with torch.no_grad():
        out = model.forward_exits(images)
        features = images
        for k in range(model.num_exits):
            features, logits, gate_logit = model.forward_segment(k, features)
            assert_close(out.logits[k], logits)
            if gate_logit is not None:
                assert_close(out.gate_logits[k], gate_logit)


def test_segment_flops_add_up_to_the_whole_model(family_model):
    _, model, _ = family_model
    image = torch.zeros(1, 3, SIZE, SIZE)
    total, features = 0, image
    for k in range(model.num_exits):
        total += count_flops(model.run_segment, k, features)
        with torch.no_grad():
            features = model.run_segment(k, features)
    total += count_flops(model.exit_output, model.num_exits - 1, features)  # the backbone's own pooling and head
    assert total == count_flops(model.backbone, image) > 0
    gflops = exit_gflops(model)  # cumulative, the exits' heads and gates included
    assert gflops == sorted(gflops)
    assert gflops[-1] == pytest.approx(count_flops(model.forward_exits, image) / 1e9, rel=1e-9)


@pytest.mark.parametrize('threshold', THRESHOLDS)
def test_engine_equals_the_cached_sweep_sample_by_sample(family_model, threshold):
    _, model, images = family_model
    loader = DataLoader(TensorDataset(images, torch.zeros(BATCH, dtype=torch.long)), batch_size=8)
    cache = collect_exit_outputs(model, loader, torch.device('cpu'))
    assert (cache.gate_probs - threshold).abs().min() > 1e-4  # no sample sits on the threshold within float noise
    predictions, exits = gated_predictions(cache, threshold)
    engine = EarlyExitEngine(model, threshold)
    batched = engine(images)
    assert torch.equal(batched.exit_index, exits) and torch.equal(batched.predictions, predictions)
    one_by_one = [engine(images[i:i + 1]) for i in range(BATCH)]
    assert torch.equal(torch.cat([r.exit_index for r in one_by_one]), exits)
    assert torch.equal(torch.cat([r.predictions for r in one_by_one]), predictions)
    if threshold == 0.5:
        assert len(set(exits.tolist())) == model.num_exits  # every exit is used: the comparison means something


def test_state_dict_is_the_backbones_under_one_prefix_plus_exits_and_gates(family_model):
    family, model, _ = family_model
    plain = build_backbone(FAMILIES[family], NUM_CLASSES, SIZE, None, 0.0)
    exits = {key for key in model.state_dict() if key.startswith(('intermediate_heads.', 'gates.'))}
    assert set(model.state_dict()) == {f'backbone.{key}' for key in plain.state_dict()} | exits
    assert {key.split('.')[1] for key in exits} == {str(k) for k in range(len(model.exit_positions))}


def test_stage0_checkpoint_loads_into_the_exit_model(family_model):
    family, _, _ = family_model
    torch.manual_seed(1)
    plain = build_backbone(FAMILIES[family], NUM_CLASSES, SIZE, None, 0.0)
    model = _tiny(family)
    report = load_state(model, {'model': plain.state_dict(), 'stage': 'backbone'}, source='backbone.pth')
    assert report.fresh and all(key.startswith(('intermediate_heads.', 'gates.')) for key in report.fresh)
    state = model.state_dict()
    assert all(torch.equal(state[f'backbone.{key}'], value) for key, value in plain.state_dict().items())


def test_a_vit_trained_at_one_size_loads_at_another_with_its_position_embedding_resampled():
    torch.manual_seed(2)
    trained = build_dynn('test_vit', NUM_CLASSES, SIZE, None, 0.0, None, 'unc').eval()
    bigger = build_dynn('test_vit', NUM_CLASSES, 2 * SIZE, None, 0.0, None, 'unc').eval()
    load_state(bigger, {'model': trained.state_dict()}, source='vit.pth')
    grid = trained.backbone.patch_embed.grid_size
    # the patch tokens' entries bilinearly upsampled to the doubled grid, the prefix (class token) entries kept
    old_patches = trained.backbone.pos_embed[:, trained.backbone.num_prefix_tokens:]
    new_patches = bigger.backbone.pos_embed[:, bigger.backbone.num_prefix_tokens:]
    assert new_patches.shape[1] == 4 * old_patches.shape[1] == 4 * grid[0] * grid[1]
    assert_close(bigger.backbone.pos_embed[:, :trained.backbone.num_prefix_tokens],
                 trained.backbone.pos_embed[:, :trained.backbone.num_prefix_tokens])
    as_grid = old_patches.reshape(1, *grid, -1).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(as_grid, scale_factor=2, mode='bicubic', antialias=True)
    assert_close(new_patches, expected.permute(0, 2, 3, 1).flatten(1, 2))
    with torch.no_grad():
        assert bigger.forward_exits(torch.randn(2, 3, 2 * SIZE, 2 * SIZE)).logits.shape == (3, 2, NUM_CLASSES)


def test_checkpoint_of_another_architecture_names_its_keys():
    other = build_backbone('test_convnext', NUM_CLASSES, SIZE, None, 0.0).state_dict()
    with pytest.raises(GFNetDynnError, match=r'backbone\.pth does not fit this model \(.*missing: backbone\.conv1'):
        load_state(_tiny('resnet'), other, source='backbone.pth')


def test_checkpoint_of_another_class_count_starts_the_heads_fresh():
    plain = build_backbone('test_resnet', NUM_CLASSES + 2, SIZE, None, 0.0)
    report = load_state(_tiny('resnet'), plain.state_dict(), source='imagenet.pth')
    assert {'backbone.fc.weight', 'backbone.fc.bias'} <= set(report.fresh)


def test_exit_positions_index_stages_and_are_checked():
    model = build_dynn('test_resnet', NUM_CLASSES, SIZE, None, 0.0, [1], 'identity')
    assert model.exit_positions == (1,) and model.segments() == [(0, 2), (2, 4)]
    with pytest.raises(GFNetDynnError, match=r'--exit-positions \[1, 3\] must lie in 0\.\.2 for a model of 4 '
                                             r'stages \(the final head already follows stage 3\)'):
        build_dynn('test_resnet', NUM_CLASSES, SIZE, None, 0.0, [1, 3], 'unc')


def test_reference_exit_costs_are_gfnet_only():
    with pytest.raises(GFNetDynnError, match='--exit-costs reference'):
        reference_normalized_exit_costs(_tiny('resnet'))


def test_family_without_a_layout_is_one_line():
    with pytest.raises(GFNetDynnError, match=r'--arch test_byobnet: early exits run on the GFNet variants and on '
                                             r'ResNet, EfficientNet'):
        check_arch('test_byobnet', 'dynn')
    check_arch('test_byobnet', 'backbone')  # any timm model still trains in stage 0


# End to end: stage 0 -> stages 1-2 -> --eval -> --export onnx -> the runner, through main_dynn.main.

def _val_images(data, size: int) -> np.ndarray:
    from deployment.onnx_runner import image_files, preprocess
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    paths = list(image_files([str(data / 'val')]))
    return np.stack([preprocess(p, size, list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)) for p in paths])


@pytest.mark.slow
@pytest.mark.parametrize('family, size', [('resnet', 16), ('efficientnet', 32), ('mobilenetv3', 32),
                                          ('convnext', 32), ('vit', 32)])  # convnext needs 32 px for its 4 stages
def test_stage0_to_onnx_runner_end_to_end(family, size, small_data, tmp_path, capsys):
    pytest.importorskip('onnxscript')
    from deployment.onnx_runner import OnnxEarlyExit
    arch = FAMILIES[family]
    run = ['--data-set', 'TINY', '--num_workers', '0', '--batch', '8', '--device', 'cpu', '--barely_train']
    out = tmp_path / 'out'
    assert main(['--stage', 'backbone', *run, '--arch', arch, '--input-size', str(size), '--num_epoch', '1',
                 '--output-dir', str(out)]) == 0
    backbone = out / 'checkpoint' / f'backbone_TINY_{arch}' / 'best.pth'
    assert main([*run, '--checkpoint-path', str(backbone), '--num_epoch', '2', '--max_warmup_epoch', '1',
                 '--output-dir', str(out)]) == 0
    best = out / 'checkpoint' / f'checkpoint_TINY_{arch}_0.75_confEE' / 'best.pth'
    checkpoint = read_checkpoint(best)
    assert checkpoint['args']['arch'] == arch and checkpoint['args']['exit_positions'] == list(DEFAULT_EXITS[family])
    assert any(key.startswith('gates.0.') for key in checkpoint['model'])

    results_path = tmp_path / 'results.json'
    assert main([*run, '--eval', '--checkpoint-path', str(best), '--results-json', str(results_path)]) == 0
    results = json.loads(results_path.read_text())
    assert results['arch'] == arch and results['exit_positions'] == list(DEFAULT_EXITS[family])
    assert results['gflops_per_exit'] == sorted(results['gflops_per_exit'])

    onnx_dir = tmp_path / 'onnx'
    capsys.readouterr()
    assert main(['--data-set', 'TINY', '--export', 'onnx', '--checkpoint-path', str(best), '--out', str(onnx_dir),
                 '--exit-threshold', '0.5']) == 0
    assert f'python -m deployment.onnx_runner {onnx_dir} IMAGE' in capsys.readouterr().out
    runner = OnnxEarlyExit(onnx_dir)
    assert runner.num_exits == len(DEFAULT_EXITS[family]) + 1
    assert runner.input_names[1] == ('tokens' if family == 'vit' else 'feature_maps')  # what segment 0 passes on
    images = _val_images(small_data, size)
    model = reopen(checkpoint, str(best)).model
    expected = EarlyExitEngine(model, 0.5)(torch.from_numpy(images))
    predictions, exits = runner.predict(images)
    assert exits.tolist() == expected.exit_index.tolist()
    assert predictions.tolist() == expected.predictions.tolist()
    if family in INT8_FAMILIES:
        _check_int8_export(best, images, runner, tmp_path / 'onnx_int8', INT8_FAMILIES[family])


INT8_FAMILIES = {'resnet': 'Conv', 'vit': 'MatMul'}  # the weight products each family's int8 segments quantise


def _final_logits(runner, images: np.ndarray) -> np.ndarray:
    """Every segment chained on every image: the final head's logits."""
    x = images
    for k in range(runner.num_exits):
        x = runner.run_segment(k, x)[0]
    return x



def _check_int8_export(best, images: np.ndarray, float_runner, onnx_dir, weight_op: str) -> None:
    """--export onnx --quantize int8 on a timm model: every segment has an int8 twin whose weight products read
    dequantised inputs, and the int8 chain's final logits stay near the float chain's."""
    import onnx
    from deployment.onnx_runner import OnnxEarlyExit
    assert main(['--data-set', 'TINY', '--export', 'onnx', '--quantize', 'int8', '--calib-images', '8',
                 '--num_workers', '0', '--checkpoint-path', str(best), '--out', str(onnx_dir)]) == 0
    manifest = json.loads((onnx_dir / 'manifest.json').read_text())
    assert manifest['int8_segments'] == [f'segment_{k}.int8.onnx' for k in range(float_runner.num_exits)]
    for name in manifest['int8_segments']:
        nodes = onnx.load(onnx_dir / name).graph.node
        dequantized = {out for node in nodes if node.op_type == 'DequantizeLinear' for out in node.output}
        products = [node for node in nodes if node.op_type == weight_op]
        assert products and all(set(node.input) & dequantized for node in products), name
    float_logits, int8_logits = (_final_logits(OnnxEarlyExit(onnx_dir, precision=precision), images)
                                 for precision in ('float', 'int8'))
    assert np.abs(int8_logits - float_logits).max() <= 0.1 * np.abs(float_logits).max() + 0.05


def test_reference_exit_costs_refused_before_training(small_data, tmp_path, capsys):
    line = one_error(capsys, ['--data-set', 'TINY', '--arch', 'test_resnet', '--num_workers', '0', '--device', 'cpu',
                              '--exit-costs', 'reference', '--output-dir', str(tmp_path)])
    assert re.search(r"--exit-costs reference is the reference's GFNet op counter; --arch test_resnet trains with "
                     r'its true FLOPs', line)
    assert not (tmp_path / 'checkpoint').exists()


@pytest.mark.slow
def test_timm_dynn_run_resumes_in_the_joint_stage(small_data, tmp_path, capsys):
    run = ['--data-set', 'TINY', '--arch', 'test_resnet', '--num_workers', '0', '--batch', '8', '--device', 'cpu',
           '--input-size', '16', '--barely_train', '--output-dir', str(tmp_path)]
    assert main([*run, '--num_epoch', '2', '--max_warmup_epoch', '1']) == 0  # warm-up epoch 0, joint epoch 1
    last = tmp_path / 'checkpoint' / 'checkpoint_TINY_test_resnet_0.75_confEE' / 'last.pth'
    _, resumed = resume_one_epoch_longer(last, capsys)
    assert resumed['args']['exit_positions'] == list(DEFAULT_EXITS['resnet'])
