"""Inputs as real users have them: 16-bit and float images, many-band TIFFs, symbolic links and their loops,
hand-edited dataset_config.py entries, flags that would be ignored, and mistakes caught before any side effect."""
import json
import logging
import struct

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dataset_config
from conftest import FAST_FLAGS, TINY_FLAGS, one_error, tiny_entry, write_learnable_folder
from data_loader_help import build_datasets, dataset_entry
from data_pipeline.image_io import BandCountError, open_rgb
from errors import GFNetDynnError
from learning_helpers.checkpoint import save_checkpoint
from main_dynn import main
from models.model_factory import build_dynn
from models.weights import load_state



def write_tiff(path, height: int, width: int, bands: int) -> None:
    """An uncompressed 8-bit TIFF with `bands` samples per pixel, written by hand (Pillow writes at most 4)."""
    pixels = np.arange(height * width * bands, dtype=np.uint8).tobytes()
    tags = [(256, width), (257, height), (258, 8), (259, 1), (262, 1), (273, 0), (277, bands), (278, height),
            (279, len(pixels)), (284, 1)]
    offset = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack('<H', len(tags)) + b''.join(
        struct.pack('<HHII', tag, 4, 1, offset if tag == 273 else value) for tag, value in tags)
    path.write_bytes(b'II' + struct.pack('<HI', 42, 8) + ifd + struct.pack('<I', 0) + pixels)


# --- 16-bit, float and many-band images --------------------------------------------------------------------------

def test_16_bit_grey_is_scaled_by_its_bit_depth_not_clipped(tmp_path):
    ramp = np.linspace(63, 65518, 64 * 64).astype(np.uint16).reshape(64, 64)
    Image.fromarray(ramp).save(tmp_path / 'g16.png')
    pixels = np.asarray(open_rgb(tmp_path / 'g16.png'))
    assert pixels.shape == (64, 64, 3)
    assert np.array_equal(pixels[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert pixels.mean() == pytest.approx(127.5, abs=1)  # Pillow's own convert('RGB') gives 254.7: almost white


@pytest.mark.parametrize('low, high, expected_low, expected_high', [(0.1, 0.9, 26, 229), (100.0, 3000.0, 0, 255)])
def test_float_images_are_scaled_from_0_1_or_from_their_own_range(low, high, expected_low, expected_high,
                                                                    tmp_path):
    Image.fromarray(np.linspace(low, high, 32 * 32).astype(np.float32).reshape(32, 32)).save(tmp_path / 'f.tif')
    pixels = np.asarray(open_rgb(tmp_path / 'f.tif'))[..., 0]
    assert (pixels.min(), pixels.max()) == (expected_low, expected_high)  # convert('RGB') gives all black (0)


def test_an_image_of_more_than_four_bands_is_refused_naming_the_count(tmp_path):
    write_tiff(tmp_path / 'b5.tif', 4, 4, 5)
    with pytest.raises(BandCountError, match=r'has 5 bands'):
        open_rgb(tmp_path / 'b5.tif')
    with pytest.raises(BandCountError, match=r'has 5 bands'):
        open_rgb(tmp_path / 'b5.tif', header_only=True)


def test_a_data_set_of_16_bit_images_trains_and_a_many_band_one_is_one_line(tmp_path, monkeypatch, capsys):
    root = write_learnable_folder(tmp_path / 'data', train_per_class=4, val_per_class=2, size=16)
    originals = {}
    for path in list(root.rglob('*.png')):
        originals[path] = np.asarray(Image.open(path).convert('L'))
        Image.fromarray(originals[path].astype(np.uint16) * 257).save(path)  # the same picture in 16 bits
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(root))
    for path, grey in originals.items():
        assert np.array_equal(np.asarray(open_rgb(path))[..., 0], grey)  # not saturated at white
    assert main(['--stage', 'backbone', *FAST_FLAGS, '--output-dir', str(tmp_path / 'out')]) == 0
    write_tiff(root / 'train' / 'class0' / 'multispectral.tif', 16, 16, 8)
    line = one_error(capsys, ['--stage', 'backbone', *FAST_FLAGS, '--output-dir', str(tmp_path / 'out2')])
    assert 'multispectral.tif has 8 bands' in line


# --- symbolic links ----------------------------------------------------------------------------------------------

def test_a_symbolic_link_loop_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    root = write_learnable_folder(tmp_path / 'data', train_per_class=4, val_per_class=2, size=16)
    (root / 'train' / 'class1' / 'again').symlink_to(root / 'train')
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(root))
    line = one_error(capsys, ['--stage', 'backbone', *FAST_FLAGS, '--skip-bad-images', '--output-dir',
                              str(tmp_path / 'o')])
    assert line.startswith(f"error: symbolic link loop: {root / 'train' / 'class1' / 'again'}")
    assert 'leads back to' in line and 'remove the link' in line


def test_linked_folders_are_followed_and_each_real_file_counts_once(tmp_path, monkeypatch, caplog):
    root = write_learnable_folder(tmp_path / 'data', train_per_class=4, val_per_class=2, size=16)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(root))
    elsewhere = tmp_path / 'extra'
    elsewhere.mkdir()
    for i in range(3):
        Image.new('RGB', (16, 16), (i * 40, 0, 0)).save(elsewhere / f'x{i}.png')
    (root / 'train' / 'class0' / 'more').symlink_to(elsewhere)
    (root / 'train' / 'class0' / 'same_again').symlink_to(elsewhere)  # a second link to the same folder
    (root / 'val' / 'class2' / 'leak.png').symlink_to(root / 'train' / 'class2' / '000.png')
    with caplog.at_level(logging.WARNING):
        train, val, _, _, _ = build_datasets('TINY', root, 16)
    assert len(train) == 12 + 3 and len(val) == 6 + 1
    assert '1 validation images are also training images' in caplog.text


# --- dataset_config.py entries -----------------------------------------------------------------------------------

@pytest.mark.parametrize('change, fragment', [
    ({'default_input_size': None}, "lacks 'default_input_size'"),
    ({'default_input_size': -32}, 'default_input_size is -32; it must be a positive int'),
    ({'use_random_split': 'no'}, "use_random_split is 'no'; it must be True or False"),
    ({'num_classes': '4'}, "num_classes is '4'; it must be an int of at least 2"),
    ({'num_classes': True}, 'num_classes is True'),
    ({'num_class': 4}, "unknown key 'num_class'"),
])
def test_dataset_config_entries_are_checked_key_by_key(change, fragment, tmp_path, monkeypatch, capsys):
    entry = tiny_entry(write_learnable_folder(tmp_path / 'data', size=16))
    for key, value in change.items():
        if value is None:
            del entry[key]
        else:
            entry[key] = value
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', entry)
    line = one_error(capsys, [*FAST_FLAGS, '--output-dir', str(tmp_path / 'o')])
    assert "dataset_config.py entry 'TINY'" in line and fragment in line
    assert not (tmp_path / 'o').exists()


def test_every_shipped_entry_passes_the_check():
    for name in dataset_config.DATASET_CONFIG:
        assert dataset_entry(name)['num_classes'] >= 2


# --- no flag silently ignored ------------------------------------------------------------------------------------

@pytest.fixture
def dynn_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_dynn('GFNet-ti-dynn', 3, 16, 8, 0.0, [3, 7], 'unc')
    args = {'arch': 'GFNet-ti-dynn', 'patch_size': 8, 'input_size': 16, 'exit_positions': [3, 7], 'gate': 'unc'}
    return save_checkpoint(tmp_path / 'run' / 'best.pth', {'model': model.state_dict(), 'stage': 'joint',
                                                           'epoch': 1, 'acc': 50.0, 'args': args})


@pytest.mark.parametrize('argv, fragment', [
    (['--stage', 'backbone', '--teacher-model', 'resnet18'], '--teacher-model given without distillation'),
    (['--stage', 'backbone', '--distillation-alpha', '0.3'], '--distillation-alpha given without distillation'),
    (['--distillation-type', 'soft', '--teacher-model', 'resnet18'],
     '--distillation-type, --teacher-model have no effect with --stage dynn (they apply: --distillation-type to '
     '--stage backbone; --teacher-model to --stage backbone)'),
    (['--stage', 'backbone', '--ce_ic_tradeoff', '2'], '--ce_ic_tradeoff has no effect with --stage backbone'),
    (['--smoothing', '0.2'], '--smoothing has no effect with --stage dynn'),
    (['--thresholds', '0.5'], '--thresholds has no effect with --stage dynn: it applies to --eval'),
    (['--out', 'x'], '--out has no effect with --stage dynn: it applies to --export'),
    (['--exit-threshold', '1.5'], '--exit-threshold must lie in [0, 1], got 1.5'),
    (['--device', 'mps'], '--device mps is not available in this PyTorch'),
])
def test_flags_that_would_be_ignored_or_are_out_of_range_are_one_line(argv, fragment, small_data, tmp_path, capsys):
    line = one_error(capsys, [*FAST_FLAGS, *argv, '--output-dir', str(tmp_path / 'o')])
    assert fragment in line
    assert not (tmp_path / 'o').exists()


@pytest.mark.parametrize('flags, fragment', [
    (['--exit-positions', '3', '5'], "--exit-positions [3, 5] differs from the checkpoint's ([3, 7])"),
    (['--patch-size', '16'], "--patch-size 16 differs from the checkpoint's (8)"),
    (['--lr', '0.1'], '--lr has no effect with --eval'),
])
def test_eval_flags_that_contradict_the_checkpoint_are_one_line(flags, fragment, small_data, dynn_checkpoint, capsys):
    line = one_error(capsys, [*TINY_FLAGS[:2], '--eval', '--checkpoint-path', str(dynn_checkpoint), *flags])
    assert fragment in line


def test_runner_mistakes_are_one_line(dynn_checkpoint, tmp_path, capsys):
    from deployment.onnx_runner import main as runner
    folder = tmp_path / 'export'
    folder.mkdir()
    manifest = {'format': 1, 'input_size': 16, 'mean': [0.5] * 3, 'std': [0.5] * 3, 'threshold': 0.5,
                'exit_positions': [3], 'class_names': ['a', 'b'], 'segments': ['segment_0.onnx', 'segment_1.onnx']}
    (folder / 'manifest.json').write_text(json.dumps(manifest))
    (folder / 'segment_0.onnx').write_bytes(b'not a graph')
    (folder / 'segment_1.onnx').write_bytes(b'not a graph')
    assert 'no images given' in one_error(capsys, [str(folder)], runner)
    assert '--threshold 2.0 must lie in [0, 1]' in one_error(capsys, [str(folder), 'x.png', '--threshold', '2'], runner)
    assert 'nope.png does not exist' in one_error(capsys, [str(folder), str(tmp_path / 'nope.png')], runner)
    image = tmp_path / 'x.png'
    Image.new('RGB', (16, 16)).save(image)
    assert 'segment_0.onnx is not a usable ONNX graph' in one_error(capsys, [str(folder), str(image)], runner)
    (folder / 'manifest.json').write_text(json.dumps({**manifest, 'input_size': 'big'}))
    assert "input_size is 'big', not a value the runner can use" in one_error(capsys, [str(folder), str(image)],
                                                                               runner)


# --- checked before any side effect ------------------------------------------------------------------------------

def test_bad_exit_positions_fail_before_any_output_or_data_scan(small_data, tmp_path, capsys):
    rc = main([*FAST_FLAGS, '--exit-positions', '3', '5', '20', '--output-dir', str(tmp_path / 'o')])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines()[0].startswith('error: --exit-positions')  # no INFO line before
    assert not (tmp_path / 'o').exists()


def test_a_head_of_another_width_is_a_shape_mismatch_not_a_skipped_head(caplog):
    from models.gfnet import checkpoint_filter_fn
    ti = timm.create_model('gfnet_ti', num_classes=8, img_size=32, patch_size=8)
    xs = timm.create_model('gfnet_xs', num_classes=8, img_size=32, patch_size=8)
    with caplog.at_level(logging.INFO):
        assert checkpoint_filter_fn(xs.state_dict(), ti)['head.weight'].shape == (8, 384)  # kept, to be reported
        with pytest.raises(GFNetDynnError, match=r'does not fit this model \(shape mismatch'):
            load_state(ti, {'model': xs.state_dict()})
    assert 'skipping head' not in caplog.text  # the old line said "checkpoint has 8 classes, model has 8"
