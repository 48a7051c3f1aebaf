"""User mistakes through the CLI: one `error:` line on stderr that names the flag or file and the fix, exit
code 2, no traceback, and no checkpoint or results file touched. Also: messy but valid data trains."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import dataset_config
from conftest import TINY_FLAGS, tiny_entry, write_learnable_folder
from main_dynn import main

REPO = Path(__file__).resolve().parents[1]
LOG_LINE = re.compile(r'(DEBUG|INFO|WARNING) \S+: ')  # main()'s logging format; anything else is noise
# Files earlier runs (of another arch and lambda than these tests train) left under --output-dir; a failing run
# must not change a byte of them. (A run into a folder holding a run stops first: tests/test_jobs_output_safety.py.)
KEPT = {'checkpoint/backbone_TINY_GFNet-xs-dynn/best.pth': b'earlier backbone',
        'checkpoint/checkpoint_TINY_0.5_confEE/best.pth': b'earlier exits',
        'checkpoint/checkpoint_TINY_0.5_confEE/results.json': b'{"earlier": true}',
        'results.json': b'{"earlier": true}'}
# Fast flags for these tests: 16 px images (4 x 4 tokens), one epoch of a few batches.
FAST = [*TINY_FLAGS, '--input-size', '16', '--num_epoch', '1', '--barely_train']


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    """A fresh learnable TINY data set per test (3 classes, 4 train + 2 val images each): tests may break it."""
    root = write_learnable_folder(tmp_path / 'data', train_per_class=4, val_per_class=2, size=16)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(root))
    return root


@pytest.fixture(scope='module')
def backbone_checkpoint(tmp_path_factory) -> Path:
    """An untrained 3-class GFNet-ti backbone (32 px, patch 8) saved the way the backbone stage saves one."""
    model = timm.create_model('gfnet_ti', num_classes=3, img_size=32, patch_size=8)
    path = tmp_path_factory.mktemp('backbone') / 'best.pth'
    torch.save({'model': model.state_dict(), 'args': {'arch': 'GFNet-ti-dynn', 'patch_size': 8, 'input_size': 32}},
               path)
    return path


@pytest.fixture
def out(tmp_path) -> Path:
    """An --output-dir holding an earlier run's checkpoints and results."""
    folder = tmp_path / 'out'
    for name, content in KEPT.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return folder


def terminal_lines(text: str) -> list[str]:
    """The non-blank lines a terminal shows for text: a carriage return (tqdm redrawing or clearing its bar)
    makes the next characters overwrite the line."""
    shown = []
    for line in text.split('\n'):
        screen = ''
        for part in line.split('\r'):
            screen = part + screen[len(part):]
        if screen.strip():
            shown.append(screen.rstrip())
    return shown


def _assert_one_error_line(stdout: str, stderr: str) -> str:
    """The error line: exactly one, last on stderr, every other stderr line a log record; no traceback."""
    assert 'Traceback' not in stdout + stderr
    lines = terminal_lines(stderr)
    errors = [line for line in lines if line.startswith('error: ')]
    assert len(errors) == 1, stderr
    assert lines[-1] == errors[0], stderr
    assert all(LOG_LINE.match(line) for line in lines[:-1]), stderr
    return errors[0]


def fails(argv: list[str], capsys, out: Path | None = None) -> str:
    """Run main(argv [+ --output-dir out]); assert the user-mistake contract and return the error line."""
    rc = main([*argv, '--output-dir', str(out)] if out else argv)
    captured = capsys.readouterr()
    assert rc == 2, captured.err
    line = _assert_one_error_line(captured.out, captured.err)
    if out:
        for name, content in KEPT.items():
            assert (out / name).read_bytes() == content, name
    return line


# flags

def test_unknown_data_set_lists_the_choices(capsys, out):
    line = fails(['--data-set', 'NOPE'], capsys, out)
    assert '--data-set' in line and "'NOPE'" in line and 'UCM' in line


def test_unknown_flag_is_one_line(capsys):
    line = fails(['--bacth', '8'], capsys)
    assert '--bacth' in line and '--help' in line


@pytest.mark.parametrize('flags, pattern', [
    (['--batch', '0'], r'--batch must be positive, got 0'),
    (['--lr', '-0.1'], r'--lr must lie in \(0, 10\], got -0\.1'),
    (['--split-ratio', '0'], r'--train-ratio 0\.0 must be between 0 and 1 \(exclusive\), e\.g\. 0\.8'),
    (['--split-ratio', '1'], r'--train-ratio 1\.0 must be between 0 and 1'),
    (['--split-ratio', '1.5'], r'--train-ratio 1\.5 must be between 0 and 1'),
    (['--eval'], r'--eval needs --checkpoint-path'),
])
def test_impossible_flag_values_are_named(flags, pattern, data, capsys, out):
    assert re.search(pattern, fails([*FAST, *flags], capsys, out))


def test_input_size_smaller_than_a_patch_is_refused(data, capsys, out):
    line = fails([*FAST, '--input-size', '6'], capsys, out)  # patch 8
    assert re.search(r'--input-size 6 is smaller than one patch \(8 px\); pass an --input-size of at least 8', line)


@pytest.mark.parametrize('positions, pattern', [(['3', '5', '20'], r'must lie in 0\.\.10'),
                                                (['7', '5'], r'must be strictly increasing')])
def test_bad_exit_positions_are_named(positions, pattern, data, capsys, out):
    line = fails([*FAST, '--exit-positions', *positions], capsys, out)
    assert '--exit-positions' in line and re.search(pattern, line)


def test_output_dir_under_a_file_is_refused_before_training(data, tmp_path, capsys):
    blocker = tmp_path / 'somefile'
    blocker.write_text('a file, not a folder')
    line = fails([*FAST, '--output-dir', str(blocker / 'sub')], capsys)
    assert f'--output-dir {blocker / "sub"}: {blocker} is a file, not a folder' in line
    assert blocker.read_text() == 'a file, not a folder'


@pytest.mark.parametrize('flag', ['--results-json', '--out'])
def test_eval_and_export_outputs_under_a_file_name_their_flag(flag, backbone_checkpoint, data, tmp_path, capsys,
                                                              out):
    blocker = tmp_path / 'somefile'
    blocker.write_text('a file, not a folder')
    job = [*TINY_FLAGS, '--eval'] if flag == '--results-json' else ['--data-set', 'TINY', '--export', 'onnx']
    target = blocker / 'sub' / ('results.json' if flag == '--results-json' else 'onnx')
    line = fails([*job, '--checkpoint-path', str(backbone_checkpoint), flag, str(target)], capsys)
    assert line.startswith(f'error: {flag} {target}') and f'{blocker} is a file' in line, line


def test_unknown_device_is_named(data, capsys, out):
    line = fails([*FAST, '--device', 'tpu9'], capsys, out)
    assert '--device tpu9 is not a device' in line


@pytest.mark.skipif(not hasattr(os, 'geteuid') or os.geteuid() == 0, reason='root writes to read-only folders')
def test_read_only_output_dir_is_refused(data, out, capsys):
    out.chmod(0o500)
    try:
        line = fails([*FAST], capsys, out)
    finally:
        out.chmod(0o700)
    assert 'permission denied' in line and '--output-dir' in line


# data folders

def test_missing_data_path_is_named(data, tmp_path, capsys, out):
    line = fails([*FAST, '--data-path', str(tmp_path / 'gone')], capsys, out)
    assert f'--data-path {tmp_path / "gone"} does not exist' in line


def test_data_path_that_is_a_file_is_named(data, capsys, out):
    image = data / 'train' / 'class0' / '000.png'
    assert f'--data-path {image} is a file' in fails([*FAST, '--data-path', str(image)], capsys, out)


@pytest.mark.parametrize('split', ['train', 'val'])
def test_missing_split_folder_is_named(split, data, capsys, out):
    (data / split).rename(data / f'{split}_old')
    line = fails(FAST, capsys, out)
    assert f'no folder {data / split}' in line and 'train/ and val/' in line


def test_class_count_differing_from_the_config_is_named(data, monkeypatch, capsys, out):
    monkeypatch.setitem(dataset_config.DATASET_CONFIG['TINY'], 'num_classes', 5)
    line = fails(FAST, capsys, out)
    assert 'dataset_config.py says TINY has 5 classes' in line and str(data / 'train') in line


def test_train_and_val_class_names_that_differ_are_named(data, capsys, out):
    (data / 'val' / 'class2').rename(data / 'val' / 'class9')
    assert 'only in train: class2; only in val: class9' in fails(FAST, capsys, out)


def test_empty_class_folder_is_named(data, capsys, out):
    for image in (data / 'val' / 'class1').iterdir():
        image.unlink()
    assert f'no images in {data / "val" / "class1"}' in fails(FAST, capsys, out)


def test_non_image_file_is_named(data, capsys, out):
    (data / 'train' / 'class0' / 'notes.txt').write_text('not an image')
    line = fails(FAST, capsys, out)
    assert str(data / 'train' / 'class0' / 'notes.txt') in line and '--skip-bad-images' in line


def _truncate(path: Path) -> None:
    """Keep the first half of an image file: the header opens, decoding fails."""
    content = path.read_bytes()
    path.write_bytes(content[:len(content) // 2])


def test_truncated_image_is_named_while_training(data, capsys, out):
    bad = data / 'train' / 'class1' / '002.png'
    _truncate(bad)
    line = fails(['--stage', 'backbone', *FAST, '--batch', '12'], capsys, out)  # one batch: every image
    assert f'cannot read image {bad}' in line and '--skip-bad-images' in line


def test_skip_bad_images_trains_with_a_warning(data, tmp_path, capsys):
    bad = data / 'train' / 'class1' / '002.png'
    _truncate(bad)
    (data / 'val' / 'class0' / 'fake.jpg').write_bytes(b'not a jpeg')
    rc = main(['--stage', 'backbone', *FAST, '--skip-bad-images', '--output-dir', str(tmp_path / 'run')])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert re.search(rf'WARNING .*skipping bad image: cannot read image {re.escape(str(bad))}', err)
    assert 'fake.jpg' in err
    assert (tmp_path / 'run' / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'last.pth').is_file()


# checkpoints

@pytest.mark.parametrize('content', [b'just some notes\n', bytes(np.random.default_rng(0).integers(0, 256, 512,
                                                                                                dtype=np.uint8))])
def test_checkpoint_that_is_not_a_checkpoint_is_named(content, data, tmp_path, capsys, out):
    path = tmp_path / 'weights.pth'
    path.write_bytes(content)
    line = fails([*FAST, '--checkpoint-path', str(path)], capsys, out)
    assert f'{path} is not a readable PyTorch checkpoint' in line
    assert path.read_bytes() == content


def test_missing_checkpoint_is_named(data, tmp_path, capsys, out):
    line = fails([*FAST, '--checkpoint-path', str(tmp_path / 'nope.pth')], capsys, out)
    assert f'checkpoint {tmp_path / "nope.pth"} does not exist' in line


def test_checkpoint_of_another_width_names_the_keys(backbone_checkpoint, data, capsys, out):
    line = fails([*FAST, '--arch', 'GFNet-xs-dynn', '--checkpoint-path', str(backbone_checkpoint)], capsys, out)
    assert str(backbone_checkpoint) in line and 'shape mismatch' in line and '(256,' in line
    assert 'same --arch' in line


def test_checkpoint_of_another_depth_names_the_keys(backbone_checkpoint, data, tmp_path, capsys, out):
    checkpoint = torch.load(backbone_checkpoint, map_location='cpu', weights_only=True)
    checkpoint['model'] = {k: v for k, v in checkpoint['model'].items() if not k.startswith(('blocks.10.',
                                                                                              'blocks.11.'))}
    shallow = tmp_path / 'depth10.pth'
    torch.save(checkpoint, shallow)
    line = fails([*FAST, '--checkpoint-path', str(shallow)], capsys, out)
    assert f'{shallow} does not fit this model (missing: blocks.10.' in line


@pytest.mark.slow
def test_resume_of_a_finished_run_says_there_is_nothing_to_resume(tiny_backbone, tiny_data, capsys, out):
    last = tiny_backbone.checkpoint.with_name('last.pth')
    before = last.read_bytes()
    line = fails([*TINY_FLAGS, '--resume', str(last)], capsys, out)
    assert f'nothing to resume: {last}' in line and '--num_epoch' in line
    assert last.read_bytes() == before


def test_resume_of_a_missing_or_foreign_file_is_named(data, tmp_path, capsys, out):
    assert 'does not exist' in fails([*FAST, '--resume', str(tmp_path / 'last.pth')], capsys, out)
    weights = tmp_path / 'weights.pth'
    torch.save({'model': {'head.weight': torch.zeros(3, 4)}}, weights)
    line = fails([*FAST, '--resume', str(weights)], capsys, out)
    assert f'{weights} lacks stage, args' in line and '--checkpoint-path' in line


def test_distillation_teacher_mistakes_are_named(backbone_checkpoint, data, tmp_path, capsys, out):
    backbone = ['--stage', 'backbone', *FAST]
    line = fails([*backbone, '--distillation-type', 'soft'], capsys, out)
    assert '--distillation-type soft needs --teacher-model' in line
    teacher = ['--distillation-type', 'soft', '--teacher-model', 'GFNet-ti-dynn', '--teacher-path']
    line = fails([*backbone, *teacher, str(tmp_path / 'teacher.pth')], capsys, out)
    assert f'checkpoint {tmp_path / "teacher.pth"} does not exist' in line
    checkpoint = torch.load(backbone_checkpoint, map_location='cpu', weights_only=True)
    checkpoint['model']['head.weight'] = torch.zeros(5, 256)  # a teacher trained on 5 classes
    checkpoint['model']['head.bias'] = torch.zeros(5)
    torch.save(checkpoint, tmp_path / 'five.pth')
    line = fails([*backbone, *teacher, str(tmp_path / 'five.pth')], capsys, out)
    assert f'--teacher-path {tmp_path / "five.pth"} has no 3-class head' in line


# real processes: what reaches the terminal

def _cli(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `python main_dynn.py argv` in cwd; bytes decoded by hand, as text mode
    would turn tqdm's carriage returns into newlines."""
    done = subprocess.run([sys.executable, str(REPO / 'main_dynn.py'), *argv], cwd=cwd, capture_output=True,
                          timeout=300)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@pytest.mark.process
def test_terminal_shows_one_line_for_a_bad_flag(tmp_path):
    rc, stdout, stderr = _cli(['--data-set', 'NOPE', '--batch', '8'], tmp_path)
    assert rc == 2
    assert stdout == '' and len(stderr.splitlines()) == 1
    assert stderr.startswith('error: ') and '--data-set' in stderr and 'UCM' in stderr


@pytest.mark.process
def test_terminal_shows_one_line_for_a_bad_image_read_by_a_worker(tmp_path):
    """The error is raised inside a DataLoader worker process, which wraps it in its own traceback text; the
    stopped run leaves nothing behind."""
    root = tmp_path / 'demo'
    classes = [f'scene{c}' for c in range(dataset_config.DATASET_CONFIG['DEMO']['num_classes'])]
    rng = np.random.default_rng(0)
    for split in ('train', 'val'):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    root / split / name / f'{i}.png')
    bad = root / 'train' / 'scene3' / '1.jpg'  # a cut JPEG: the scan sees a whole header, decoding fails
    (root / 'train' / 'scene3' / '1.png').unlink()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(bad)
    _truncate(bad)
    rc, stdout, stderr = _cli(['--stage', 'backbone', '--data-set', 'DEMO', '--data-path', str(root), '--arch',
                               'GFNet-ti-dynn', '--patch-size', '8', '--input-size', '16', '--batch', '16',
                               '--num_workers', '1', '--device', 'cpu', '--num_epoch', '1',
                               '--output-dir', str(tmp_path / 'out')], tmp_path)
    assert rc == 2, stderr
    line = _assert_one_error_line(stdout, stderr)
    assert f'cannot read image {bad}' in line and '--skip-bad-images' in line
    assert not (tmp_path / 'out').exists()


# messy but valid data

def test_messy_valid_data_trains_one_epoch(tmp_path, monkeypatch, capsys):
    """Mixed formats and sizes, grey and RGBA images, spaces and non-ASCII letters in names."""
    rng = np.random.default_rng(0)
    files = [('Bild 1.tif', 'L', (40, 30)), ('photo ü.jpg', 'RGB', (64, 48)), ('rgba.png', 'RGBA', (33, 45)),
             ('grey.png', 'L', (16, 16)), ('façade.JPG', 'RGB', (20, 28))]
    classes = {'Wald Ö': (40, 160, 40), 'área urbana': (160, 160, 160), 'water': (30, 60, 200)}
    for split in ('train', 'val'):
        for name, colour in classes.items():
            folder = tmp_path / 'messy' / split / name
            folder.mkdir(parents=True)
            for file_name, mode, (w, h) in files:
                pixels = np.clip(np.array(colour) + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).convert(mode).save(folder / file_name)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(tmp_path / 'messy'))
    rc = main(['--stage', 'backbone', *FAST, '--output-dir', str(tmp_path / 'run')])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert 'skipping' not in err and 'Traceback' not in err
    best = torch.load(tmp_path / 'run' / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'last.pth',
                      map_location='cpu', weights_only=True)
    assert best['args']['class_names'] == sorted(classes)

