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

import models  # noqa: F401  (registers the GFNet variants with timm)
from data_loader_help import build_transform
from errors import GFNetDynnError
from models.early_exit import EarlyExitEngine
from models.exit_heads import ExitHeadConfig
from models.gfnet import GlobalFilter
from conftest import FAST_FLAGS, halve_at_each_exit, one_error
from deployment.onnx_export import OPSETS, MatmulGlobalFilter, SegmentGraph, export_segments, segment_file_name
from deployment.onnx_quantize import DFT_TABLES, quantize_segments
from deployment.onnx_runner import OnnxEarlyExit, image_files, main, preprocess
from models.weights import load_state, read_checkpoint

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
    halve_at_each_exit(model.train(), images)
    return model, images


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
def test_cli_prints_one_line_per_image_with_exits_counted_from_0(exported, tmp_path, capsys):
    out_dir, _, _ = exported
    paths = _write_pngs(tmp_path, 2)
    assert main([str(out_dir), *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, paths):
        shown_path, class_name, exit_text = line.split('\t')
        assert shown_path == path and class_name in CLASS_NAMES
        assert exit_text.startswith('exit ') and exit_text.endswith(' of 0..3')
    assert main([str(out_dir), '--threshold', '0', '--jsonl', '-', paths[0]]) == 0
    assert json.loads(capsys.readouterr().out)['exit'] == 0  # the first exit is exit 0


# Make torch unimportable, then run the runner as `python -m deployment.onnx_runner`: it must not need torch, timm or
# the training code (the board has onnxruntime, numpy and Pillow only).
WITHOUT_TORCH = """
import runpy, sys
sys.modules['torch'] = None  # import torch now raises ImportError
sys.argv = ['onnx_runner', *sys.argv[1:]]
try:
    runpy.run_module('deployment.onnx_runner', run_name='__main__')
finally:
    torch_side = ('timm', 'torchvision', 'models', 'learning_helpers', 'evaluation', 'jobs')
    loaded = sorted(m for m in sys.modules if m.split('.')[0] in torch_side)
    print('loaded:', ' '.join(loaded), file=sys.stderr)
"""


@pytest.mark.process
def test_cli_reads_a_folder_without_torch_and_writes_json_lines(exported, tmp_path):
    out_dir, _, _ = exported
    folder = tmp_path / 'scenes'
    (folder / 'nested').mkdir(parents=True)
    paths = _write_pngs(folder, 2) + _write_pngs(folder / 'nested', 1)
    (folder / 'notes.txt').write_text('not an image')
    (folder / '.DS_Store').write_bytes(b'junk')
    (folder / 'Thumbs.db').write_bytes(b'junk')
    jsonl = tmp_path / 'predictions.jsonl'
    done = subprocess.run([sys.executable, '-c', WITHOUT_TORCH, str(out_dir), str(folder), '--jsonl', str(jsonl),
                           '--threads', '1'], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert 'loaded: \n' in done.stderr + '\n' and done.stdout == ''
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert sorted(row['file'] for row in rows) == sorted(paths)
    for row in rows:
        assert row['class'] in CLASS_NAMES and 0 <= row['exit'] <= 3 and row['latency_ms'] > 0


def test_image_files_walks_folders_and_skips_junk(tmp_path):
    (tmp_path / 'a' / '.hidden').mkdir(parents=True)
    for name in ('a/2.png', 'a/1.JPG', 'a/notes.txt', 'a/.DS_Store', 'a/._1.JPG', 'a/Thumbs.db', 'a/.hidden/3.png'):
        (tmp_path / name).write_bytes(b'x')
    listed = list(image_files([str(tmp_path / 'a'), str(tmp_path / 'a' / 'notes.txt')]))
    assert listed == [str(tmp_path / 'a' / '1.JPG'), str(tmp_path / 'a' / '2.png'), str(tmp_path / 'a' / 'notes.txt')]


def _write_manifest(folder: Path) -> Path:
    """A valid manifest with no graphs beside it: enough for the checks made before a graph is loaded."""
    folder.mkdir(exist_ok=True)
    (folder / 'manifest.json').write_text(json.dumps({
        'format': 1, 'input_size': SIZE, 'mean': [0.5] * 3, 'std': [0.5] * 3, 'threshold': 0.5, 'exit_positions': [0],
        'class_names': CLASS_NAMES, 'segments': ['segment_0.onnx', 'segment_1.onnx']}))
    return folder


def test_cli_refuses_to_replace_a_file_it_did_not_write(tmp_path, capsys):
    _write_manifest(tmp_path / 'export')
    image = _write_pngs(tmp_path, 1)[0]
    mine = tmp_path / 'mine.jsonl'
    mine.write_text('my own notes\n')
    line = one_error(capsys, [str(tmp_path / 'export'), image, '--jsonl', str(mine)], main)
    assert 'not an earlier --jsonl output' in line and mine.read_text() == 'my own notes\n'
    assert 'no image files' in one_error(capsys, [str(tmp_path / 'export'), str(tmp_path / 'export')], main)


# ---- Graphs any runtime accepts -------------------------------------------------------------------------------

# The ops every segment may use: all in the ONNX standard domain, none of them control flow (If, Loop, Scan),
# sequences or spectral ops (DFT, STFT); each is in TensorRT's ONNX parser operator table (8.6 and later).
PORTABLE_OPS = frozenset({
    'Add', 'AveragePool', 'Concat', 'Conv', 'Div', 'Equal', 'Erf', 'Expand', 'Gather', 'Gemm', 'Greater', 'IsNaN',
    'LayerNormalization', 'Log', 'MatMul', 'MaxPool', 'Mul', 'Neg', 'Pow', 'ReduceMax', 'ReduceMean', 'ReduceSum',
    'Relu', 'Reshape', 'Shape', 'Sigmoid', 'Slice', 'Softmax', 'Squeeze', 'Sub', 'TopK', 'Transpose', 'Unsqueeze',
    'Where'})


@pytest.mark.slow
@pytest.mark.parametrize('opset', OPSETS)
@pytest.mark.parametrize('batch', [1, None])
@pytest.mark.parametrize('exit_head', [ExitHeadConfig(), ExitHeadConfig('pool', 'layernorm', 3)],
                         ids=['linear', 'pool'])
def test_segments_use_only_portable_ops(tmp_path, opset, batch, exit_head):
    """Static batch 1 and a dynamic batch axis, opsets 17 and 18, the reference's exit head and the pool head
    (a 3 x 3 grid on a 4 x 4 token grid: overlapping windows): only PORTABLE_OPS, the opset asked for, the shapes
    asked for, and the same numbers as PyTorch."""
    torch.manual_seed(0)
    model = timm.create_model('gfnet_ti_dynn', num_classes=len(CLASS_NAMES), img_size=SIZE, patch_size=8, depth=2,
                              embed_dim=32, exit_positions=(0,), exit_head=exit_head).eval()
    export_segments(model, tmp_path, threshold=THRESHOLD, class_names=CLASS_NAMES, input_size=SIZE, opset=opset,
                    batch=batch)
    x = torch.randn(batch or 3, 3, SIZE, SIZE)
    for k in range(2):
        graph = onnx.load(tmp_path / segment_file_name(k))
        onnx.checker.check_model(graph, full_check=True)
        assert {node.op_type for node in graph.graph.node} <= PORTABLE_OPS
        assert {node.domain for node in graph.graph.node} <= {''}
        assert [(o.domain, o.version) for o in graph.opset_import if o.domain in ('', 'ai.onnx')] == [('', opset)]
        for value in [*graph.graph.input, *graph.graph.output]:
            first = value.type.tensor_type.shape.dim[0]
            assert (first.dim_value == 1) if batch == 1 else bool(first.dim_param)
            assert all(d.dim_value > 0 for d in value.type.tensor_type.shape.dim[1:])
        session = ort.InferenceSession(str(tmp_path / segment_file_name(k)), providers=['CPUExecutionProvider'])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            expected = SegmentGraph(model, k)(x)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for g, e in zip(got, expected):
            assert_close(torch.from_numpy(g), e, atol=1e-4, rtol=0)
        x = expected[0]
    manifest = json.loads((tmp_path / 'manifest.json').read_text())
    assert manifest['opset'] == opset and manifest['batch'] == batch
    images = np.random.default_rng(0).normal(size=(3, 3, SIZE, SIZE)).astype(np.float32)
    assert OnnxEarlyExit(tmp_path).predict(images)[0].shape == (3,)  # batch-1 graphs: one image at a time


# ---- INT8 ------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_int8_segments_keep_the_accuracy_of_float(tiny_backbone, tmp_path, capsys):
    """The tiny backbone trained on learnable colours, exported and quantised on its training images: int8
    predicts its validation images as float does (at most one of 12 differs), at every exit setting."""
    model = timm.create_model('gfnet_ti_dynn', num_classes=3, img_size=SIZE, patch_size=8, exit_positions=(3, 7))
    load_state(model, read_checkpoint(tiny_backbone.checkpoint))
    export_segments(model, tmp_path, threshold=THRESHOLD, class_names=['class0', 'class1', 'class2'],
                    input_size=SIZE)

    def images(split: str) -> tuple[np.ndarray, np.ndarray]:
        paths = sorted((tiny_backbone.data / split).glob('*/*.png'))
        pixels = np.stack([preprocess(p, SIZE, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) for p in paths])
        return pixels, np.array([int(p.parent.name.removeprefix('class')) for p in paths])

    manifest = quantize_segments(tmp_path, images('train')[0])
    assert manifest['int8_segments'] == [f'segment_{k}.int8.onnx' for k in range(3)]
    assert json.loads((tmp_path / 'manifest.json').read_text())['int8']['kept_float'] == ['dft', 'gate']
    nodes = onnx.load(tmp_path / 'segment_0.int8.onnx').graph.node
    dequantized = {name for node in nodes if node.op_type == 'DequantizeLinear' for name in node.output}
    dft = [node for node in nodes if node.op_type == 'MatMul' and any(n.endswith(DFT_TABLES) for n in node.input)]
    mlp = [node for node in nodes if node.op_type == 'MatMul' and node not in dft]
    assert dft and not any(set(node.input) & dequantized for node in dft)  # the DFT products stay float
    assert mlp and all(set(node.input) & dequantized for node in mlp)  # the MLP's are int8
    val_images, labels = images('val')
    float_runner = OnnxEarlyExit(tmp_path, threshold=1.01)
    int8_runner = OnnxEarlyExit(tmp_path, threshold=1.01, precision='int8')
    float_predictions, int8_predictions = float_runner.predict(val_images)[0], int8_runner.predict(val_images)[0]
    assert (float_predictions == labels).mean() >= 0.75  # the backbone learned the colours
    assert (float_predictions != int8_predictions).sum() <= 1
    image = _write_pngs(tmp_path.parent, 1)[0]
    assert main([str(tmp_path), image, '--precision', 'int8']) == 0


def test_int8_flags_act_with_export_only(small_data, capsys):
    assert '--quantize' in one_error(capsys, [*FAST_FLAGS, '--quantize', 'int8'])
    assert '--calib-images' in one_error(capsys, [*FAST_FLAGS, '--calib-images', '8'])
    line = one_error(capsys, ['--export', 'onnx', '--checkpoint-path', 'best.pth', '--out', 'x', '--calib-images',
                              '8'])
    assert '--quantize int8' in line
    line = one_error(capsys, ['--export', 'onnx', '--checkpoint-path', 'b.pth', '--out', 'x', '--quantize', 'int8',
                              '--calib-images', '0'])
    assert '--calib-images must be positive' in line


def test_runner_without_int8_segments_says_how_to_make_them(tmp_path):
    with pytest.raises(GFNetDynnError, match='--quantize int8'):
        OnnxEarlyExit(_write_manifest(tmp_path / 'export'), precision='int8')


def test_runner_says_how_many_segments_it_found_and_needs(tmp_path, capsys):
    folder = _write_manifest(tmp_path / 'export')  # exit_positions [0]: two graphs
    manifest = json.loads((folder / 'manifest.json').read_text())
    (folder / 'manifest.json').write_text(json.dumps({**manifest, 'int8_segments': ['segment_0.int8.onnx']}))
    line = one_error(capsys, [str(folder), str(tmp_path / 'x.png')], main)
    assert line.endswith("int8_segments lists 1 graph, but exit_positions [0] need 2 (one per exit, then the final "
                         "one); copy the whole export folder or export again")


@pytest.mark.parametrize('folder', ['empty', 'absent'])
def test_cli_missing_manifest_exits_2_with_one_line(tmp_path, capsys, folder):
    (tmp_path / 'empty').mkdir()
    assert main([str(tmp_path / folder), str(tmp_path / 'image.png')]) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    assert len(captured.err.splitlines()) == 1 and 'manifest.json' in captured.err


@pytest.mark.slow
def test_cli_skips_an_unreadable_image_with_one_line_and_classifies_the_rest(exported, tmp_path, capsys):
    out_dir, _, _ = exported
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not a png')
    good = _write_pngs(tmp_path, 2)
    assert main([str(out_dir), good[0], str(bad), good[1]]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [line for line in captured.err.splitlines() if line.startswith('skipped: ')]
    assert len(captured.err.splitlines()) == 1 and 'broken.png' in captured.err
    assert [line.split('\t')[0] for line in captured.out.splitlines()] == good


def test_cli_with_no_readable_image_exits_2_and_keeps_an_earlier_jsonl(exported, tmp_path, capsys):
    out_dir, _, _ = exported
    bad = tmp_path / 'broken.png'
    bad.write_bytes(b'not a png')
    jsonl = tmp_path / 'out.jsonl'
    jsonl.write_text(json.dumps({'file': 'a.png', 'class': 'beach', 'exit': 0, 'latency_ms': 1.0}) + '\n')
    before = jsonl.read_bytes()
    assert main([str(out_dir), str(bad), '--jsonl', str(jsonl)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith('skipped: cannot read image') and 'broken.png' in err[0]
    assert err[1:] == ['error: none of the 1 images could be read (each is named above); pass image files']
    assert jsonl.read_bytes() == before


def test_a_manifest_with_fewer_class_names_than_the_heads_is_refused_before_any_image(exported, tmp_path, capsys):
    out_dir, _, _ = exported
    copy = tmp_path / 'export'
    copy.mkdir()
    for path in out_dir.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((copy / 'manifest.json').read_text())
    manifest['class_names'] = manifest['class_names'][:2]
    (copy / 'manifest.json').write_text(json.dumps(manifest))
    image = _write_pngs(tmp_path, 1)[0]
    line = one_error(capsys, [str(copy), image], main)
    assert line == (f"error: {copy / 'manifest.json'}: 2 class_names, but the heads predict {len(CLASS_NAMES)} "
                    f'classes; export the model again')


@pytest.mark.process
def test_the_runner_file_runs_from_any_directory(exported, tmp_path):
    out_dir, _, _ = exported
    image = _write_pngs(tmp_path, 1)[0]
    done = subprocess.run([sys.executable, str(REPO / 'deployment' / 'onnx_runner.py'), str(out_dir),
                           Path(image).name], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split('\t')[0] == Path(image).name


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
