"""A hurried user's mistakes, each caught before any work: one `error:` line, exit code 2, and every file that
existed before (data, checkpoints, results) byte for byte as it was, with nothing new left behind."""
import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from PIL import Image

from conftest import FAST_FLAGS, TINY_FLAGS, folder_checksums, one_error
from errors import GFNetDynnError
from evaluation.eval_report import versus_baselines
from jobs.inference_jobs import calibration_images, export_threshold
from evaluation.latency import segment_latency_ms
from evaluation.operating_points import parse_budget
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
    odd_batch = ['--batch', '13', *(['--mixup', '0', '--cutmix', '0'] if stage == 'backbone' else [])]  # mixing pairs
    line = refused(capsys, tmp_path, ['--stage', stage, *FAST_FLAGS, *odd_batch, '--output-dir', str(out)])
    assert f'cannot read image {bad}' in line  # one batch: every training image
    assert [path.relative_to(out).as_posix() for path in sorted(out.rglob('*'))] == [
        'runs', 'runs/earlier', 'runs/earlier/events']  # no empty folders either


# --eval of part of the images, and the threshold --export takes from it

def test_a_partial_eval_is_marked_in_every_output(dynn_best, monkeypatch, capsys):
    titles = []
    set_title = Axes.set_title
    monkeypatch.setattr(Axes, 'set_title', lambda ax, label, *a, **k: titles.append(label) or set_title(ax, label))
    # batch 1: the 6 validation images are 6 batches, of which --barely_train reads 4
    assert main(['--eval', *TINY_FLAGS, '--barely_train', '--batch', '1', '--checkpoint-path', str(dynn_best)]) == 0
    out = capsys.readouterr().out
    results = json.loads(dynn_best.with_name('results.json').read_text())
    assert results['partial'] is True and (results['num_val'], results['num_val_total']) == (4, 6)
    assert 'PARTIAL: 4 of 6 validation images' in out.splitlines()[0]
    assert len(titles) == 3 and all('PARTIAL: 4 of 6 validation images' in title for title in titles)


def write_results(checkpoint: Path, **fields) -> None:
    """A results.json of --eval beside checkpoint, with a chosen threshold of 0.7."""
    results = {'chosen': {'threshold': 0.7}, 'input_size': 16, 'checkpoint': str(checkpoint), 'partial': False,
               'num_val': 6, 'num_val_total': 6, 'selection': {'set': 'val', 'num_images': 6, 'budget': 'acc-drop=1'},
               **fields}
    checkpoint.with_name('results.json').write_text(json.dumps(results))


@pytest.mark.parametrize('fields, flags, pattern', [
    ({'input_size': 32}, [], 'at 32 px, this export at 16 px'),
    ({}, ['--input-size', '32'], 'at 16 px, this export at 32 px'),
    ({'partial': True, 'num_val': 4}, [], 'on 4 of 6 validation images'),
])
def test_export_refuses_a_threshold_chosen_for_another_evaluation(fields, flags, pattern, dynn_best, tmp_path,
                                                                  capsys):
    write_results(dynn_best, **fields)
    line = refused(capsys, tmp_path, ['--export', 'onnx', '--checkpoint-path', str(dynn_best), '--out',
                                      str(tmp_path / 'onnx'), *flags])
    assert f"{dynn_best.with_name('results.json')} chose its threshold {pattern}" in line
    assert '--exit-threshold' in line


def test_export_threshold_of_a_split_with_other_validation_images_is_refused(tmp_path):
    checkpoint = tmp_path / 'best.pth'
    write_results(checkpoint, split={'val_hash': 'aaaa'})
    assert export_threshold(str(checkpoint), None, 16, {'val_hash': 'aaaa'})[0] == 0.7
    with pytest.raises(GFNetDynnError, match="on other validation images than the checkpoint's split"):
        export_threshold(str(checkpoint), None, 16, {'val_hash': 'bbbb'})


@pytest.mark.slow
def test_export_manifest_records_where_its_threshold_came_from(dynn_best, tmp_path, capsys):
    pytest.importorskip('onnxscript')
    write_results(dynn_best)
    assert main(['--export', 'onnx', '--checkpoint-path', str(dynn_best), '--out', str(tmp_path / 'onnx')]) == 0
    manifest = json.loads((tmp_path / 'onnx' / 'manifest.json').read_text())
    assert manifest['threshold'] == 0.7 and manifest['input_size'] == 16
    assert manifest['threshold_source'] == {
        'from': str(dynn_best.with_name('results.json').resolve()), 'input_size': 16, 'chosen_on': 'val',
        'num_images': 6, 'rule': 'acc-drop=1', 'split_val_hash': None}


# --num_workers with the one export that reads images

def test_num_workers_acts_on_int8_calibration_only(small_data, capsys):
    export = ['--export', 'onnx', '--checkpoint-path', 'missing.pth', '--out', 'x', '--num_workers', '0']
    assert 'missing.pth does not exist' in one_error(capsys, [*export, '--quantize', 'int8'])
    line = one_error(capsys, export)
    assert '--num_workers' in line and 'add --quantize int8' in line


@pytest.mark.process
def test_calibration_images_are_the_same_with_loader_workers(small_data):
    args = argparse.Namespace(data_set='TINY', data_path=None, train_ratio=None, split_seed=None, split_file=None,
                              calib_ratio=None, skip_bad_images=False, check_images=False)
    serial = calibration_images(argparse.Namespace(**vars(args), num_workers=0), 16, None, 5)
    parallel = calibration_images(argparse.Namespace(**vars(args), num_workers=1), 16, None, 5)
    assert serial.shape == (5, 3, 16, 16) and np.array_equal(serial, parallel)


# the batch-1 latency table on a busy machine

class SleepingSegments(torch.nn.Module):
    """Three segments that take `ms` each (a sleep); `stall` maps (round, segment) to an extra sleep in ms."""

    num_exits = 3

    def __init__(self, ms: float, stall: dict | None = None):
        super().__init__()
        self.ms, self.stall, self.calls = ms, stall or {}, 0

    def forward_segment(self, k: int, tokens: torch.Tensor):
        time.sleep((self.ms + self.stall.get((self.calls // self.num_exits, k), 0.0)) / 1000)
        self.calls += 1
        return tokens, tokens, None if k == self.num_exits - 1 else torch.zeros(1)


def test_a_stall_over_two_rounds_does_not_throw_the_latency_table_off(caplog):
    # after the 2 warm-up rounds, segment 1 stalls in two rounds (a median of 3 rounds would be the stall)
    model = SleepingSegments(2.0, stall={(3, 1): 400.0, (4, 1): 400.0})
    table = segment_latency_ms(model, torch.zeros(1, 3, 4, 4), torch.device('cpu'), seconds=0.0)
    assert all(1.5 < ms < 20 for ms in table), table
    assert 'disagree' not in caplog.text


def test_latency_rounds_that_disagree_are_a_warning(caplog):
    stalls = {(step, 0): 60.0 for step in range(2, 40, 2)}  # every other round is slow
    segment_latency_ms(SleepingSegments(2.0, stalls), torch.zeros(1, 3, 4, 4), torch.device('cpu'), seconds=0.0)
    assert 'latency rounds disagree' in caplog.text
