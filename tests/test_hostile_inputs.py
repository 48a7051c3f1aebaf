"""A hurried user's mistakes, each caught before any work: one `error:` line, exit code 2, and every file that
existed before (data, checkpoints, results) byte for byte as it was, with nothing new left behind."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset_config
from conftest import FAST_FLAGS, TINY_FLAGS, folder_checksums, one_error, tiny_entry, write_learnable_folder
from main_dynn import main


def refused(capsys, root: Path, argv: list[str]) -> str:
    """main(argv) is a user mistake (one `error:` line, exit 2) that leaves every file under root as it was and
    adds none; returns the error line."""
    before = folder_checksums(root)
    line = one_error(capsys, argv)
    assert folder_checksums(root) == before
    return line


@pytest.fixture
def finished_backbone(small_data, tmp_path, capsys) -> Path:
    """The run folder of a finished one-epoch backbone run (best.pth, last.pth)."""
    assert main(['--stage', 'backbone', *FAST_FLAGS, '--output-dir', str(tmp_path / 'run')]) == 0
    capsys.readouterr()
    return tmp_path / 'run' / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn'


# --resume continues from last.pth only

def test_resume_of_best_pth_of_a_finished_run_is_refused_and_the_run_kept(finished_backbone, tmp_path, capsys):
    best = finished_backbone / 'best.pth'
    line = refused(capsys, tmp_path, ['--resume', str(best), '--num_workers', '0'])
    assert f'--resume {best}' in line and f'({finished_backbone / "last.pth"}) is finished' in line
    assert f'--stage backbone --data-set TINY --checkpoint-path {best}' in line and '--output-dir NEW' in line


def test_resume_of_a_snapshot_names_the_last_pth_to_pass(finished_backbone, tmp_path, capsys):
    last = finished_backbone / 'last.pth'
    checkpoint = torch.load(last, weights_only=True)
    checkpoint['args']['num_epoch'] = 3  # the run stopped after its first epoch
    torch.save(checkpoint, last)
    snapshot = finished_backbone / 'ckpt_epoch0.pth'
    torch.save({key: checkpoint[key] for key in ('model', 'stage', 'args', 'epoch')}, snapshot)
    line = refused(capsys, tmp_path, ['--resume', str(snapshot), '--num_workers', '0'])
    assert 'is a per-epoch snapshot' in line and line.endswith(f'pass --resume {last}')


def test_nothing_to_resume_hint_of_a_backbone_run_keeps_the_stage(finished_backbone, tmp_path, capsys):
    line = refused(capsys, tmp_path, ['--resume', str(finished_backbone / 'last.pth'), '--num_workers', '0'])
    assert 'nothing to resume' in line
    assert f'--stage backbone --data-set TINY --checkpoint-path {finished_backbone / "best.pth"}' in line


# the DEMO generator writes to DEMO's own folder only

def test_a_mistyped_demo_data_path_is_refused_and_nothing_generated(tmp_path, capsys):
    (tmp_path / 'data').mkdir()
    typo = tmp_path / 'data' / 'DEOM'
    line = refused(capsys, tmp_path, ['--stage', 'backbone', '--data-set', 'DEMO', '--data-path', str(typo),
                                      '--output-dir', str(tmp_path / 'out'), '--num_workers', '0'])
    assert f'--data-path {typo} does not exist' in line and 'when --data-path is omitted' in line
    assert not typo.exists()


# messages that point the right way

def test_missing_eval_checkpoint_suggests_a_dynn_best_pth(small_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, tmp_path, ['--eval', *TINY_FLAGS, '--checkpoint-path', 'nope.pth'])
    assert "the dynn stage's best.pth (a run writes it to checkpoint/checkpoint_TINY_0.75_confEE/best.pth by " \
           "default)" in line and 'backbone_' not in line
    run = tmp_path / 'checkpoint' / 'checkpoint_TINY_0.5_confEE'
    run.mkdir(parents=True)
    (run / 'best.pth').write_bytes(b'a dynn run')
    line = refused(capsys, tmp_path, ['--eval', *TINY_FLAGS, '--checkpoint-path', 'nope.pth'])
    assert line.endswith("the dynn stage's best.pth, e.g. checkpoint/checkpoint_TINY_0.5_confEE/best.pth")


def test_missing_resume_file_suggests_a_last_pth(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn'
    run.mkdir(parents=True)
    (run / 'last.pth').write_bytes(b'a backbone run')
    line = refused(capsys, tmp_path, ['--resume', 'checkpoint/backbone_TINY_GFNet-ti-dynn/lats.pth'])
    assert line.endswith("pass a run's last.pth, e.g. checkpoint/backbone_TINY_GFNet-ti-dynn/last.pth")


def test_a_tie_with_the_best_baseline_is_called_a_tie():
    from learning_helpers.eval_report import versus_baselines
    from learning_helpers.operating_points import parse_budget
    point = {'accuracy': 90.0, 'expected_gflops': 0.2, 'expected_latency_ms': 1.0}
    versus = versus_baselines(point, {'max_prob': {'at_budget': dict(point)}, 'entropy': {'at_budget': None}},
                              parse_budget('acc-drop=1'), 90.0)
    assert versus['winner'] == 'tie'
    better = versus_baselines({**point, 'expected_gflops': 0.1}, {'max_prob': {'at_budget': point}},
                              parse_budget('acc-drop=1'), 90.0)
    assert better['winner'] == 'learned gates'


def test_a_class_folder_only_in_val_is_named(small_data, tmp_path, capsys):
    extra = small_data / 'val' / 'class9'
    extra.mkdir()
    (extra / '000.png').write_bytes((small_data / 'val' / 'class0' / '000.png').read_bytes())
    line = refused(capsys, tmp_path, ['--stage', 'backbone', *FAST_FLAGS, '--output-dir', str(tmp_path / 'out')])
    assert 'only in val: class9' in line and 'dataset_config.py' not in line


def test_one_image_in_a_class_with_calib_ratio_names_the_folder(small_data, tmp_path, capsys):
    for image in sorted((small_data / 'train' / 'class1').iterdir())[1:]:
        image.unlink()
    line = refused(capsys, tmp_path, ['--stage', 'backbone', *FAST_FLAGS, '--calib-ratio', '0.2',
                                      '--output-dir', str(tmp_path / 'out')])
    assert 'class folder class1 has 1 image' in line and '--calib-ratio 0.2' in line


# bad images: all named before training; a run they stop leaves nothing behind

def write_truncated(path: Path, image_format: str) -> Path:
    """A 64 px noise image cut to three quarters: it opens (the header is whole), its pixels do not decode."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, image_format)
    path.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) * 3 // 4])
    return path


def test_every_truncated_png_is_named_in_one_line_before_training(small_data, tmp_path, capsys):
    bad = [write_truncated(small_data / split / name / 'cut.png', 'PNG')
           for split, name in (('train', 'class0'), ('train', 'class2'), ('val', 'class1'))]
    line = refused(capsys, tmp_path, ['--stage', 'backbone', *FAST_FLAGS, '--output-dir', str(tmp_path / 'out')])
    assert f'3 bad images under {small_data}' in line and all(f'cannot read image {path}' in line for path in bad)
    assert '--skip-bad-images' in line


def test_check_images_decodes_every_image_before_training(small_data, tmp_path, capsys):
    bad = write_truncated(small_data / 'val' / 'class1' / 'cut.jpg', 'JPEG')  # a JPEG header check cannot see it
    line = refused(capsys, tmp_path, ['--stage', 'backbone', *FAST_FLAGS, '--check-images',
                                      '--output-dir', str(tmp_path / 'out')])
    assert f'cannot read image {bad}' in line


@pytest.mark.parametrize('stage', ['backbone', 'dynn'])
def test_a_run_stopped_by_a_bad_image_leaves_nothing_behind(stage, small_data, tmp_path, capsys):
    """Found while training (the scan cannot see it): no split file, lock, run folder or TensorBoard events stay."""
    out = tmp_path / 'out'
    (out / 'runs' / 'earlier').mkdir(parents=True)
    (out / 'runs' / 'earlier' / 'events').write_bytes(b'an earlier run')
    bad = write_truncated(small_data / 'train' / 'class1' / 'cut.jpg', 'JPEG')
    line = refused(capsys, tmp_path, ['--stage', stage, *FAST_FLAGS, '--batch', '13', '--output-dir', str(out)])
    assert f'cannot read image {bad}' in line  # one batch: every training image
    assert [path.relative_to(out).as_posix() for path in sorted(out.rglob('*'))] == [
        'runs', 'runs/earlier', 'runs/earlier/events']  # no empty folders either
