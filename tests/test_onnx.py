"""ONNX export and the onnxruntime early-exit runner: each segment equals its PyTorch twin, the runner takes the
same exits as EarlyExitEngine, and the CLI works without torch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from PIL import Image
from torch.testing import assert_close

import models  # noqa: F401  (registers the variants with timm)
from data_loader_help import build_transform
from errors import GFNetDynnError
from models.early_exit import EarlyExitEngine
from models.gfnet import GlobalFilter
from models.onnx_export import MatmulGlobalFilter, SegmentGraph, export_segments
from models.onnx_runner import OnnxEarlyExit, main, preprocess

REPO = Path(__file__).resolve().parents[1]
SIZE = 32
CLASS_NAMES = ['beach', 'forest', 'harbor', 'river']
THRESHOLD = 0.5
BATCH = 8


def _tiny_model() -> torch.nn.Module:
    return timm.create_model('gfnet_ti_dynn', num_classes=len(CLASS_NAMES), img_size=SIZE, patch_size=8, depth=4,
                             embed_dim=32, exit_positions=(0, 1, 2))


@pytest.fixture(scope='module')
def model_and_images():
    """Tiny GFNet-Dynn in training mode whose gates send half of the samples still inside out at each exit at
    threshold 0.5: gate k = 50 * (max prob_k - median among those left), so no sample sits on the threshold."""
    torch.manual_seed(0)
    model = _tiny_model()
    images = torch.randn(BATCH, 3, SIZE, SIZE)
    with torch.no_grad():
        for head in model.intermediate_heads:
            head.weight.normal_()  # confident, varied exits instead of near-uniform ones
        logits = model.eval().forward_exits(images).logits
        inside = torch.ones(BATCH, dtype=torch.bool)
        for k, gate in enumerate(model.gates):
            max_prob = logits[k].softmax(dim=-1).amax(dim=-1)
            median = torch.quantile(max_prob[inside], 0.5)
            gate.linear.weight.copy_(torch.tensor([[50.0, 0.0, 0.0, 0.0]]))
            gate.linear.bias.fill_(-50.0 * median)
            inside &= max_prob < median
    return model.train(), images


@pytest.fixture(scope='module')
def exported(model_and_images, tmp_path_factory):
    """Export once for the module; also record whether the export left the model as it was."""
    model, _ = model_and_images
    before = {name: value.clone() for name, value in model.state_dict().items()}
    out_dir = tmp_path_factory.mktemp('onnx')
    manifest_path = export_segments(model, out_dir, threshold=THRESHOLD, class_names=CLASS_NAMES, input_size=SIZE)
    untouched = model.training and all(torch.equal(before[n], v) for n, v in model.state_dict().items())
    return out_dir, manifest_path, untouched


def _write_pngs(folder: Path, count: int) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f'scene_{i}.png'
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 50, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize('grid', [(4, 4), (14, 14), (5, 7), (7, 6), (1, 1)])
def test_matmul_global_filter_equals_the_fft_filter(grid):
    """Odd and even widths (with and without a Nyquist bin), non-square grids; unit-scale weights put
    imaginary parts on the DC and Nyquist bins, which irfft2 must ignore."""
    torch.manual_seed(0)
    fft_filter = GlobalFilter(8, grid)
    with torch.no_grad():
        fft_filter.complex_weight.normal_()
        x = torch.randn(3, grid[0] * grid[1], 8)
        assert_close(MatmulGlobalFilter(fft_filter)(x), fft_filter(x), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_export_writes_manifest_and_leaves_model_untouched(exported, model_and_images):
    out_dir, manifest_path, untouched = exported
    manifest = json.loads(manifest_path.read_text())
    assert manifest['format'] == 1 and manifest['input_size'] == SIZE and manifest['threshold'] == THRESHOLD
    assert manifest['class_names'] == CLASS_NAMES and manifest['exit_positions'] == [0, 1, 2]
    assert_close(manifest['mean'], [0.485, 0.456, 0.406])
    assert_close(manifest['std'], [0.229, 0.224, 0.225])
    assert manifest['segments'] == [f'segment_{k}.onnx' for k in range(4)]
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(manifest['segments'] + ['manifest.json'])
    assert untouched
    for name in manifest['segments']:  # FFTs as matrix products: onnxruntime's CPU DFT is slow
        assert 'DFT' not in {node.op_type for node in onnx.load(out_dir / name).graph.node}


@pytest.mark.slow
def test_each_segment_matches_pytorch(exported, model_and_images):
    out_dir, manifest_path, _ = exported
    model = model_and_images[0]
    was_training = model.training
    model.eval()
    x = torch.randn(3, 3, SIZE, SIZE)
    try:
        for k, name in enumerate(json.loads(manifest_path.read_text())['segments']):  # FFT model against ONNX
            session = ort.InferenceSession(str(out_dir / name), providers=['CPUExecutionProvider'])
            got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
            with torch.no_grad():
                expected = SegmentGraph(model, k)(x)
            expected = expected if isinstance(expected, tuple) else (expected,)
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                assert_close(torch.from_numpy(g), e, atol=1e-4, rtol=0)
            x = expected[0]  # the PyTorch tokens feed the next segment, so errors do not add up
    finally:
        model.train(was_training)


@pytest.mark.slow
def test_runner_takes_the_same_exits_as_early_exit_engine(exported, model_and_images):
    out_dir, _, _ = exported
    model, images = model_and_images
    was_training = model.training
    try:
        result = EarlyExitEngine(model, THRESHOLD)(images)
    finally:
        model.train(was_training)
    predictions, exit_index = OnnxEarlyExit(out_dir, num_threads=1).predict(images.numpy())
    assert len(set(exit_index.tolist())) >= 3  # the comparison covers several exits, the final head among them
    np.testing.assert_array_equal(exit_index, result.exit_index.numpy())
    np.testing.assert_array_equal(predictions, result.predictions.numpy())


@pytest.mark.slow
def test_runner_threshold_override(exported, model_and_images):
    out_dir, _, _ = exported
    images = model_and_images[1].numpy()
    assert (OnnxEarlyExit(out_dir, threshold=0.0).predict(images)[1] == 0).all()  # every gate fires at 0
    assert (OnnxEarlyExit(out_dir, threshold=1.01).predict(images)[1] == 3).all()  # none does above 1


@pytest.mark.slow
def test_cli_prints_one_line_per_image(exported, tmp_path, capsys):
    out_dir, _, _ = exported
    paths = _write_pngs(tmp_path, 2)
    assert main([str(out_dir), *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, paths):
        shown_path, class_name, exit_text = line.split('\t')
        assert shown_path == path and class_name in CLASS_NAMES
        assert exit_text.startswith('exit ') and exit_text.endswith(' (of 4)')


@pytest.mark.slow
def test_cli_runs_as_a_script_without_torch(exported, tmp_path):
    """The board has onnxruntime, numpy and Pillow only: a `torch` that fails to import must not matter."""
    out_dir, _, _ = exported
    blocker = tmp_path / 'blocker' / 'torch'
    blocker.mkdir(parents=True)
    (blocker / '__init__.py').write_text("raise ImportError('torch is not installed on this board')\n")
    paths = _write_pngs(tmp_path, 2)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), str(REPO)]))
    done = subprocess.run([sys.executable, str(REPO / 'models' / 'onnx_runner.py'), str(out_dir), *paths],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2


@pytest.mark.parametrize('folder', ['empty', 'absent'])
def test_cli_missing_manifest_exits_2_with_one_line(tmp_path, capsys, folder):
    (tmp_path / 'empty').mkdir()
    assert main([str(tmp_path / folder), str(tmp_path / 'image.png')]) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    assert len(captured.err.splitlines()) == 1 and 'manifest.json' in captured.err


@pytest.mark.slow
def test_cli_unreadable_image_exits_2_with_one_line(exported, tmp_path, capsys):
    out_dir, _, _ = exported
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not a png')
    assert main([str(out_dir), str(bad)]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and 'broken.png' in captured.err


@pytest.mark.parametrize('height, width', [(40, 50), (64, 37), (36, 36)])
def test_preprocess_matches_the_evaluation_transform(tmp_path, height, width):
    path = tmp_path / 'scene.png'
    rng = np.random.default_rng(height)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    expected = build_transform(is_train=False, input_size=SIZE)(Image.open(path).convert('RGB'))
    got = preprocess(path, SIZE, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    assert got.dtype == np.float32
    assert_close(torch.from_numpy(got), expected, atol=1e-6, rtol=0)


def test_export_rejects_class_names_of_another_length(tmp_path):
    with pytest.raises(GFNetDynnError, match='class names'):
        export_segments(_tiny_model(), tmp_path, threshold=THRESHOLD, class_names=CLASS_NAMES[:2], input_size=SIZE)
    assert not any(tmp_path.iterdir())
