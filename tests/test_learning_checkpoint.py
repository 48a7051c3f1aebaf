"""Checkpoint files: atomic writes, no leftovers from killed writers, and no frozen teacher inside."""
import os
import stat
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from learning_helpers.checkpoint import save_checkpoint
from learning_helpers.losses import DistillationLoss, FrequencyDistillation
from runtime.atomic import save_json


def test_save_checkpoint_round_trips_with_weights_only(tmp_path):
    payload = {'model': {'w': torch.arange(6.0).view(2, 3)}, 'acc': 91.5, 'args': {'lr': 1e-3}}
    path = save_checkpoint(tmp_path / 'best.pth', payload)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded['model']['w'], payload['model']['w'])
    assert loaded['acc'] == 91.5 and loaded['args'] == {'lr': 1e-3}
    assert [p.name for p in tmp_path.iterdir()] == ['best.pth']  # no temp file left


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    return int(done.stdout)


@pytest.mark.process
def test_a_good_write_removes_the_temp_file_a_killed_writer_left(tmp_path):
    stale = tmp_path / f'.last.pth.{_dead_pid()}.k3x9.tmp'
    stale.write_bytes(b'half a checkpoint')
    other = tmp_path / f'.best.pth.{_dead_pid()}.a1b2.tmp'  # another file's temp: not ours to remove
    other.write_bytes(b'x')
    save_checkpoint(tmp_path / 'last.pth', {'epoch': 3})
    assert not stale.exists() and other.exists()
    assert torch.load(tmp_path / 'last.pth', weights_only=True) == {'epoch': 3}


def test_a_write_leaves_the_live_temp_file_of_another_writer_alone(tmp_path):
    """Two processes writing one path at once: cleaning up must not delete the other one's file mid-write."""
    live = tmp_path / f'.results.json.{os.getppid()}.q7w8.tmp'  # our parent process: alive
    live.write_bytes(b'being written')
    save_json(tmp_path / 'results.json', {'accuracy': 90.0})
    assert live.read_bytes() == b'being written'


def test_outputs_get_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / 'best.pth', {'epoch': 0})
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failed_write_keeps_the_old_file(tmp_path):
    path = save_json(tmp_path / 'results.json', {'accuracy': 90.0})
    before = path.read_bytes()
    try:
        save_json(path, {'bad': object()})  # not JSON-serialisable: fails mid-write
    except TypeError:
        pass
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['results.json']


def test_distillation_checkpoint_state_holds_the_projections_but_not_the_teacher():
    teacher = nn.Linear(4, 3)
    frequency = FrequencyDistillation(student_dim=8, teacher_dim=16, student_depth=4, teacher_depth=8)
    loss = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'freq', 0.5, 1.0, frequency)
    state = loss.learned_state_dict()
    assert state and not any('teacher' in key for key in state)
    assert set(state) == set(frequency.state_dict())
    fresh = FrequencyDistillation(student_dim=8, teacher_dim=16, student_depth=4, teacher_depth=8)
    restored = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'freq', 0.5, 1.0, fresh)
    restored.load_learned_state_dict(state)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key])
    plain = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft', 0.5, 1.0)
    assert plain.learned_state_dict() == {}
