"""Inputs a run must refuse in one line before any work, or read right: a checkpoint of another class count, a
diverged (NaN) checkpoint, a checkpoint holding pickled code, GFNet's own checkpoint format, a bad --aa, an output
folder nothing can be created in, and Ctrl-C before anything was kept."""
import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import FAST_FLAGS, folder_checksums, one_error
from jobs.run_setup import dynn_run_folder
from learning_helpers.loop import TrainingStopped
from main_dynn import main
from models.model_factory import build_backbone

REPO = Path(__file__).resolve().parents[1]


def refused(capsys, root: Path, argv: list[str], entry_point=None) -> str:
    """One `error:` line, exit 2, and every file under root as it was (none added); the error line."""
    before = folder_checksums(root)
    line = one_error(capsys, argv, entry_point)
    assert folder_checksums(root) == before
    return line


def gfnet_style_checkpoint(path: Path, num_classes: int) -> Path:
    """A file written exactly as GFNet's main_gfnet.py writes checkpoint_last.pth: model, optimizer, lr_scheduler
    (timm's scheduler state), epoch, scaler and its argparse.Namespace of arguments (numpy scalars included)."""
    model = build_backbone('GFNet-ti-dynn', num_classes, 16, 8, 0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    args = argparse.Namespace(model='gfnet-ti', input_size=224, data_set='IMNET', lr=np.float64(5e-4),
                              epochs=300, output_dir='logs/gfnet-ti', smoothing=0.1, seed=np.int64(0))
    torch.save({'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'lr_scheduler': {'t_initial': 300, 'lr_min': 1e-5, 'base_values': [5e-4]}, 'epoch': 299,
                'scaler': {'scale': 65536.0, 'growth_factor': 2.0, '_growth_tracker': 0}, 'args': args}, path)
    return path


# the class count

def test_a_dynn_run_from_a_backbone_of_another_class_count_names_both(small_data, tmp_path, capsys):
    backbone = tmp_path / 'backbone.pth'
    torch.save({'model': build_backbone('GFNet-ti-dynn', 4, 16, 8, 0.0).state_dict()}, backbone)
    line = refused(capsys, tmp_path, [*FAST_FLAGS, '--checkpoint-path', str(backbone),
                                      '--output-dir', str(tmp_path / 'out')])
    assert line == (f'error: {backbone} predicts 4 classes but --data-set TINY has 3; pass the backbone trained on '
                    f'this data set, or --new-head to train a fresh final head')


def test_new_head_trains_a_fresh_head_and_says_so(small_data, tmp_path, capsys):
    backbone = tmp_path / 'backbone.pth'
    torch.save({'model': build_backbone('GFNet-ti-dynn', 4, 16, 8, 0.0).state_dict()}, backbone)
    assert main([*FAST_FLAGS, '--checkpoint-path', str(backbone), '--new-head', '--output-dir',
                 str(tmp_path / 'out')]) == 0
    assert '--new-head: the final classifier starts fresh for the 3 classes of TINY (the checkpoint\'s predicts 4)' \
        in capsys.readouterr().err


def test_export_for_a_data_set_of_other_classes_names_both(dynn_best, tmp_path, capsys):
    line = refused(capsys, tmp_path, ['--export', 'onnx', '--data-set', 'DEMO', '--checkpoint-path',
                                      str(dynn_best), '--out', str(tmp_path / 'onnx')])
    assert line == (f'error: {dynn_best} predicts 3 classes but --data-set DEMO has 8; export it with the '
                    f'--data-set it was trained on')


# checkpoints from elsewhere, and diverged ones

def test_a_checkpoint_written_as_gfnet_main_writes_it_starts_a_dynn_run(small_data, tmp_path, capsys):
    source = gfnet_style_checkpoint(tmp_path / 'checkpoint_last.pth', 3)
    assert main([*FAST_FLAGS, '--checkpoint-path', str(source), '--output-dir', str(tmp_path / 'out')]) == 0
    assert (tmp_path / 'out' / 'checkpoint' / 'checkpoint_TINY_0.75_confEE' / 'last.pth').is_file()


class RunsCode:
    def __reduce__(self):
        return os.system, ('touch hacked',)


def test_a_checkpoint_holding_pickled_code_is_refused_with_its_own_message(small_data, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = tmp_path / 'evil.pth'
    torch.save({'model': build_backbone('GFNet-ti-dynn', 3, 16, 8, 0.0).state_dict(), 'hook': RunsCode()}, source)
    line = refused(capsys, tmp_path, [*FAST_FLAGS, '--checkpoint-path', str(source), '--output-dir', 'out'])
    assert line.startswith(f'error: {source} holds pickled code or objects (posix.system), which could run when '
                           f'loaded, so it is not read')
    assert not (tmp_path / 'hacked').exists()


@pytest.fixture
def diverged(dynn_best) -> Path:
    checkpoint = torch.load(dynn_best, weights_only=True)
    checkpoint['model']['gates.0.linear.weight'][0, 0] = float('nan')
    torch.save(checkpoint, dynn_best)
    return dynn_best


@pytest.mark.parametrize('job', ['eval', 'export', 'benchmark'])
def test_a_checkpoint_with_nan_weights_is_refused_by_every_reader(job, diverged, tmp_path, capsys, monkeypatch):
    from benchmarks.risk import main as risk_main
    monkeypatch.chdir(tmp_path)
    argv, entry = {'eval': (['--eval', '--data-set', 'TINY', '--checkpoint-path', str(diverged), *FAST_FLAGS[2:10]],
                            None),
                   'export': (['--export', 'onnx', '--checkpoint-path', str(diverged), '--out', 'onnx'], None),
                   'benchmark': (['--checkpoint', str(diverged), '--data-set', 'DEMO', '--json', 'r.json'],
                                 risk_main)}[job]
    line = refused(capsys, tmp_path, argv, entry)
    assert line.startswith(f'error: {diverged} holds non-finite weights (gates.0.linear.weight): the run that wrote '
                           f'it diverged')


def test_every_lr_flag_has_an_upper_bound(capsys):
    for flag, text in (('--lr', 'must lie in (0, 10]'), ('--min-lr', 'must lie in [0, 10]'),
                       ('--gate-lr', 'must lie in (0, 100]'), ('--transfer-ratio', 'must lie in [0, 1]')):
        assert one_error(capsys, [flag, '1e30']) == f'error: {flag} {text}, got 1e+30'


def test_a_min_lr_above_the_lr_is_one_line(capsys):
    assert one_error(capsys, ['--lr', '1e-3', '--min-lr', '1']) == (
        'error: --min-lr 1 exceeds --lr 0.001: the cosine schedule would rise instead of decay; pass a --min-lr '
        'below --lr')


# start-up mistakes: one line, nothing created

def test_an_unknown_auto_augment_policy_is_one_line(small_data, tmp_path, capsys):
    line = refused(capsys, tmp_path, ['--stage', 'backbone', *FAST_FLAGS, '--aa', 'garbage',
                                      '--output-dir', str(tmp_path / 'out')])
    assert "aa is 'garbage'; it must be a timm auto-augment policy" in line


def test_an_output_dir_nothing_can_be_created_in_is_one_line(small_data, capsys):
    if not Path('/proc').is_dir():
        pytest.skip('no /proc here')
    line = one_error(capsys, ['--stage', 'backbone', *FAST_FLAGS, '--output-dir', '/proc/gfnet-dynn-out'])
    assert line.startswith('error: --output-dir /proc/gfnet-dynn-out: cannot create files under /proc')


def test_ctrl_c_before_the_first_epoch_removes_what_the_run_created(small_data, tmp_path, capsys, monkeypatch):
    from jobs import train_jobs

    def stopped(*args, **kwargs):
        raise TrainingStopped('backbone epoch 0, batch 0')

    monkeypatch.setattr(train_jobs, 'run_backbone_stage', stopped)
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'notes.txt').write_text('mine')
    assert main(['--stage', 'backbone', *FAST_FLAGS, '--output-dir', str(out)]) == 130
    assert 'interrupted: in backbone epoch 0, batch 0, before the first epoch finished' in capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob('*')) == ['notes.txt']


@pytest.mark.process
def test_ctrl_c_while_the_libraries_load_is_one_line(tmp_path):
    process = subprocess.Popen([sys.executable, str(REPO / 'main_dynn.py'), '--output-dir', str(tmp_path)],
                               cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        process.wait(timeout=0.5)  # torch and timm take seconds to import: still loading now
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGINT)
    err = process.communicate(timeout=60)[1]
    assert process.returncode == 130 and 'Traceback' not in err, err
    assert err.strip() == 'interrupted: stopped while starting, before anything was written'


def test_the_dynn_folder_names_a_backbone_other_than_gfnet():
    assert dynn_run_folder('o', 'DEMO', 0.75, 'GFNet-xs-dynn').name == 'checkpoint_DEMO_0.75_confEE'
    assert dynn_run_folder('o', 'DEMO', 0.75, 'resnet18').name == 'checkpoint_DEMO_resnet18_0.75_confEE'
