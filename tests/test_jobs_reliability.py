"""Reliability and scale: a SIGKILLed run resumes to the same result, non-finite losses are skipped and then
stop the run cleanly, and the backbone and dynn stages run under torchrun (2 gloo processes on CPU)."""
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dataset_config
from learning_helpers.losses import DistillationLoss
from main_dynn import main
from models import model_factory
from tests.conftest import TINY_FLAGS, tiny_entry

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / 'main_dynn.py'
# DEMO (8 classes) read from a tiny folder we write: the real CLI runs in a subprocess, where no test can add
# a dataset_config entry
DEMO_FLAGS = ['--input-size', '32', '--arch', 'GFNet-ti-dynn', '--patch-size', '8', '--num_workers', '0',
              '--batch', '8', '--device', 'cpu', '--seed', '0']
DYNN_FLAGS = ['--max_warmup_epoch', '1', '--bilevel_batch_count', '3']  # 4 batches an epoch: phases straddle epochs
BACKBONE_DIR = Path('checkpoint') / 'backbone_DEMO_GFNet-ti-dynn'
DYNN_DIR = Path('checkpoint') / 'checkpoint_DEMO_0.75_confEE'
RUN_TIMEOUT = 300


def _write_demo_folder(root: Path, train_per_class: int = 4, val_per_class: int = 3) -> Path:
    """root/train/ and root/val/ with DEMO's 8 classes of 32 px noise; val gets one extra image so that two
    processes hold validation shards of different sizes (25 = 13 + 12)."""
    rng = np.random.default_rng(0)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for c in range(8):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count + (split == 'val' and c == 0)):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f'{i:03d}.png')
    return root


def _env() -> dict:
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1'}


def _cli(args: list, cwd: Path) -> subprocess.CompletedProcess:
    """main_dynn.py in a fresh interpreter, as a user runs it."""
    return subprocess.run([sys.executable, str(MAIN), *args], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def _epoch_lines(stdout: str, stage: str) -> list[str]:
    """The per-epoch summary lines of a stage ('backbone', 'warm-up', 'joint')."""
    return [line for line in stdout.splitlines() if line.startswith(f'{stage} epoch ')]


def _without_time(line: str) -> str:
    return re.sub(r' \| [\d.]+ s$', '', line)


def _template(line: str) -> str:
    """An epoch line with every number replaced: what 'the same metrics format' compares."""
    return re.sub(r'\d+(\.\d+)?(e[+-]\d+)?', '#', line)


def _load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def _assert_same_weights(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope='module')
def demo_data(tmp_path_factory) -> Path:
    return _write_demo_folder(tmp_path_factory.mktemp('demo') / 'DEMO')


@pytest.fixture(scope='module')
def reference_backbone(demo_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted 3-epoch backbone run: (output dir, finished process)."""
    out = tmp_path_factory.mktemp('backbone_reference')
    done = _cli(['--stage', 'backbone', '--data-set', 'DEMO', '--data-path', str(demo_data), *DEMO_FLAGS,
                 '--num_epoch', '3', '--output-dir', str(out)], cwd=out)
    assert done.returncode == 0, done.stderr
    return out, done


@pytest.fixture(scope='module')
def reference_dynn(demo_data, reference_backbone, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """An uninterrupted dynn run on the reference backbone: 1 warm-up epoch, then 2 joint epochs."""
    out = tmp_path_factory.mktemp('dynn_reference')
    done = _cli(['--data-set', 'DEMO', '--data-path', str(demo_data), *DEMO_FLAGS, *DYNN_FLAGS, '--num_epoch', '3',
                 '--checkpoint-path', str(reference_backbone[0] / BACKBONE_DIR / 'best.pth'),
                 '--output-dir', str(out)], cwd=out)
    assert done.returncode == 0, done.stderr
    return out, done


def _start_and_kill(args: list, cwd: Path, ready) -> None:
    """Start main_dynn.py, poll until ready() says the moment has come, then SIGKILL it."""
    proc = subprocess.Popen([sys.executable, str(MAIN), *args], cwd=cwd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f'the run ended (rc {proc.returncode}) before the moment to kill it came:\n'
                            f'{proc.stderr.read()[-3000:]}')
            if time.monotonic() > deadline:
                pytest.fail('the moment to kill the run never came')
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _assert_every_checkpoint_loads(out: Path) -> None:
    """Every .pth the killed run left is complete; half-written temp files never carry the .pth name."""
    paths = sorted(out.rglob('*.pth'))
    assert paths
    for path in paths:
        assert isinstance(_load(path), dict), path


@pytest.mark.process
def test_backbone_run_killed_mid_write_resumes_to_the_uninterrupted_result(demo_data, reference_backbone,
                                                                           tmp_path):
    reference_out, reference = reference_backbone
    folder = tmp_path / BACKBONE_DIR

    def writing_after_first_epoch() -> bool:
        # last.pth names epoch 0 and a temp file shows the next checkpoint being written: kill mid-write
        return (folder / 'last.pth').exists() and any(p.suffix == '.tmp' for p in folder.iterdir())

    args = ['--stage', 'backbone', '--data-set', 'DEMO', '--data-path', str(demo_data), *DEMO_FLAGS,
            '--num_epoch', '3', '--output-dir', str(tmp_path)]
    _start_and_kill(args, tmp_path, writing_after_first_epoch)

    _assert_every_checkpoint_loads(tmp_path)
    killed_at = _load(folder / 'last.pth')['epoch']
    assert killed_at in (0, 1)
    # resumed with 2 loader workers where the run had none: the augmentation must not depend on it
    resumed = _cli(['--resume', str(folder / 'last.pth'), '--num_workers', '2', '--device', 'cpu'], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    expected = _load(reference_out / BACKBONE_DIR / 'last.pth')
    actual = _load(folder / 'last.pth')
    assert actual['epoch'] == expected['epoch'] == 2
    _assert_same_weights(actual['model'], expected['model'])
    assert (actual['acc'], actual['best_acc']) == (expected['acc'], expected['best_acc'])
    assert _load(folder / 'best.pth')['epoch'] == _load(reference_out / BACKBONE_DIR / 'best.pth')['epoch']
    # the resumed run prints the epochs it ran, identical to the uninterrupted run's but for the time
    resumed_lines = _epoch_lines(resumed.stdout, 'backbone')
    assert len(resumed_lines) == 2 - killed_at
    assert ([_without_time(line) for line in resumed_lines]
            == [_without_time(line) for line in _epoch_lines(reference.stdout, 'backbone')[killed_at + 1:]])


@pytest.mark.process
def test_dynn_run_killed_in_joint_training_resumes_to_the_uninterrupted_result(demo_data, reference_backbone,
                                                                                reference_dynn, tmp_path):
    reference_out, reference = reference_dynn
    folder = tmp_path / DYNN_DIR

    def first_joint_epoch_saved() -> bool:
        # the joint stage writes ckpt_epoch1_*.pth, then last.pth: kill once last.pth is the newer
        snapshots = list(folder.glob('ckpt_epoch1_*.pth')) if folder.is_dir() else []
        return bool(snapshots) and (folder / 'last.pth').stat().st_mtime_ns > snapshots[0].stat().st_mtime_ns

    args = ['--data-set', 'DEMO', '--data-path', str(demo_data), *DEMO_FLAGS, *DYNN_FLAGS, '--num_epoch', '3',
            '--checkpoint-path', str(reference_backbone[0] / BACKBONE_DIR / 'best.pth'), '--output-dir', str(tmp_path)]
    _start_and_kill(args, tmp_path, first_joint_epoch_saved)

    _assert_every_checkpoint_loads(tmp_path)
    killed = _load(folder / 'last.pth')
    assert (killed['stage'], killed['epoch'], killed['global_step']) == ('joint', 1, 4)
    resumed = _cli(['--resume', str(folder / 'last.pth'), '--num_workers', '0', '--device', 'cpu'], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    expected = _load(reference_out / DYNN_DIR / 'last.pth')
    actual = _load(folder / 'last.pth')
    assert (actual['stage'], actual['epoch']) == (expected['stage'], expected['epoch']) == ('joint', 2)
    _assert_same_weights(actual['model'], expected['model'])
    torch.testing.assert_close(actual['pos_weight'], expected['pos_weight'], rtol=0, atol=0)
    assert (actual['acc'], actual['global_step']) == (expected['acc'], expected['global_step'])
    assert ({p.name for p in folder.glob('ckpt_epoch*.pth')}
            == {p.name for p in (reference_out / DYNN_DIR).glob('ckpt_epoch*.pth')})
    assert (_without_time(_epoch_lines(resumed.stdout, 'joint')[-1])
            == _without_time(_epoch_lines(reference.stdout, 'joint')[-1]))


# non-finite losses, in process: the loss is patched to turn NaN at chosen training steps

@pytest.fixture
def nan_run(make_learnable_folder, tmp_path, monkeypatch):
    """Factory: nan_run(nan_steps, extra_flags) runs the backbone stage on 3 learnable classes (3 batches an
    epoch) with the loss made NaN at the given 0-based training steps. Returns (rc, probe), where probe holds
    the model's weights seen at each step and the saved checkpoints' bytes at the first NaN."""
    data = make_learnable_folder(tmp_path / 'tiny')
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(data))
    probe = {'model': None, 'weights': [], 'files_at_first_nan': None}
    build_backbone = model_factory.build_backbone

    def keep_model(*args, **kwargs):
        probe['model'] = build_backbone(*args, **kwargs)
        return probe['model']

    monkeypatch.setattr(model_factory, 'build_backbone', keep_model)
    checkpoint_dir = tmp_path / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn'

    def run(nan_steps, extra_flags):
        forward = DistillationLoss.forward

        def nan_forward(self, *args, **kwargs):
            loss = forward(self, *args, **kwargs)
            step = len(probe['weights'])
            probe['weights'].append({k: v.detach().clone() for k, v in probe['model'].state_dict().items()})
            if step in nan_steps:
                if probe['files_at_first_nan'] is None:
                    probe['files_at_first_nan'] = {p.name: p.read_bytes() for p in checkpoint_dir.glob('*.pth')}
                return loss * float('nan')  # still attached to the graph: stepping on it would spread NaN
            return loss

        monkeypatch.setattr(DistillationLoss, 'forward', nan_forward)
        rc = main(['--stage', 'backbone', *TINY_FLAGS, '--output-dir', str(tmp_path), *extra_flags])
        return rc, probe, checkpoint_dir

    return run


def test_one_nonfinite_loss_is_reported_and_its_step_skipped(nan_run, capsys):
    rc, probe, checkpoint_dir = nan_run({1}, ['--num_epoch', '1'])  # epoch 0, batch 1 in the messages (counted from 0)
    out, err = capsys.readouterr()
    assert rc == 0
    assert 'non-finite loss (nan on this process) at epoch 0 batch 1: step skipped (1 in a row)' in err
    assert len(_epoch_lines(out, 'backbone')) == 1
    weights = probe['weights']
    assert len(weights) == 3
    _assert_same_weights(weights[2], weights[1])  # the NaN step changed nothing
    assert any(not torch.equal(weights[1][k], weights[0][k]) for k in weights[0])  # a finite step does
    final = _load(checkpoint_dir / 'last.pth')['model']
    assert all(torch.isfinite(v).all() for v in final.values())


def test_nonfinite_losses_in_a_row_stop_with_one_line_and_keep_the_checkpoints(nan_run, capsys):
    # epoch 0 trains and saves; from epoch 1 on every loss is NaN; the 3rd in a row exceeds --max-nan-skips 2
    rc, probe, checkpoint_dir = nan_run(set(range(3, 100)), ['--num_epoch', '2', '--max-nan-skips', '2'])
    out, err = capsys.readouterr()
    assert rc == 2
    assert 'Traceback' not in err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert errors == [err.strip().splitlines()[-1]]
    assert errors[0].startswith('error: the loss or the weights were non-finite for 3 batches in a row, more than --max-nan-skips 2 '
                                '(epoch 1, batch 2)')
    assert len(_epoch_lines(out, 'backbone')) == 1
    saved = probe['files_at_first_nan']
    assert set(saved) == {'best.pth', 'last.pth'}
    for name, content in saved.items():
        assert (checkpoint_dir / name).read_bytes() == content
        assert _load(checkpoint_dir / name)['epoch'] == 0


# non-finite weights: AdamW's step is patched to leave a NaN weight at chosen steps

@pytest.fixture
def poisoned_run(make_learnable_folder, tmp_path, monkeypatch):
    """Factory: poisoned_run(poison_steps, extra_flags) runs the backbone stage on 3 learnable classes (3 batches
    an epoch) where the optimizer step of the given 0-based training steps leaves a weight NaN after updating.
    Returns (rc, finite_states, checkpoint_dir): the trainable weights after each step that stayed finite."""
    data = make_learnable_folder(tmp_path / 'tiny')
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(data))
    step = torch.optim.AdamW.step
    finite_states, calls = [], []

    def poisoning_step(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        params = [p for group in self.param_groups for p in group['params']]
        if len(calls) in poison_steps[0]:
            with torch.no_grad():
                params[0].view(-1)[0] = float('nan')
        else:
            finite_states.append([p.detach().clone() for p in params])
        calls.append(len(calls))
        return result

    poison_steps = [set()]
    monkeypatch.setattr(torch.optim.AdamW, 'step', poisoning_step)

    def run(steps, extra_flags):
        poison_steps[0] = steps
        rc = main(['--stage', 'backbone', *TINY_FLAGS, '--output-dir', str(tmp_path), *extra_flags])
        return rc, finite_states, tmp_path / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn'

    return run


def _all_finite(checkpoint: dict) -> bool:
    return all(torch.isfinite(v).all() for v in checkpoint['model'].values() if v.is_floating_point())


def test_a_step_that_leaves_a_nan_weight_is_rolled_back_and_never_saved(poisoned_run, capsys):
    rc, _, checkpoint_dir = poisoned_run({4}, ['--num_epoch', '2'])  # epoch 1, batch 1
    err = capsys.readouterr().err
    assert rc == 0, err
    assert 'non-finite weights after the step at epoch 1 batch 1: step rolled back (1 in a row)' in err
    for path in checkpoint_dir.glob('*.pth'):
        assert _all_finite(_load(path)), path


def test_weights_that_stay_nan_stop_the_run_and_best_pth_is_the_last_finite_state(poisoned_run, capsys):
    # epoch 0 (steps 0-2) trains and saves; every later step leaves a NaN: the 3rd rolled back in a row stops
    rc, finite_states, checkpoint_dir = poisoned_run(set(range(3, 100)), ['--num_epoch', '2', '--max-nan-skips', '2'])
    err = capsys.readouterr().err
    assert rc == 2 and 'Traceback' not in err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'non-finite for 3 batches in a row' in errors[0], err
    best = _load(checkpoint_dir / 'best.pth')
    assert best['epoch'] == 0 and _all_finite(best)
    assert len(finite_states) == 3  # the weights after step 2 are the last finite state
    model = model_factory.build_backbone('GFNet-ti-dynn', 3, 32, 8, 0.0, None)
    model.load_state_dict(best['model'])
    # the parameters in the optimizer's order: timm's factory lists the weight-decayed ones, then the rest
    from timm.optim import create_optimizer_v2
    ordered = [p for group in create_optimizer_v2(model, 'adamw', weight_decay=1e-4).param_groups
               for p in group['params']]
    assert len(ordered) == len(finite_states[-1])
    for saved, expected in zip(ordered, finite_states[-1]):
        assert torch.equal(saved, expected)


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path):
    from errors import GFNetDynnError
    from learning_helpers.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / 'best.pth', {'model': {'w': torch.ones(2)}})
    before = (tmp_path / 'best.pth').read_bytes()
    with pytest.raises(GFNetDynnError, match=r'not writing .*best\.pth: model\.w hold NaN or inf'):
        save_checkpoint(tmp_path / 'best.pth', {'model': {'w': torch.tensor([1.0, float('inf')])}})
    assert (tmp_path / 'best.pth').read_bytes() == before


# torchrun: two gloo processes on CPU

# main_dynn.main with two probes: each checkpoint write is logged with its rank, and on rank 1 only the
# backbone stage's second loss is NaN (the ranks must skip that step together, or DDP's all-reduce hangs)
TORCHRUN_MAIN = '''\
import os
import sys

sys.path.insert(0, {repo!r})
import learning_helpers.checkpoint as checkpoint
import runtime.atomic as atomic
from learning_helpers.losses import DistillationLoss

atomic_write = atomic.atomic_write
loss_forward = DistillationLoss.forward
calls = []


def logged_write(path, write):
    with open({log!r}, 'a') as log:
        log.write(f"{{os.environ['RANK']}} {{path}}\\n")
    atomic_write(path, write)


def nan_once_on_rank_1(self, *args, **kwargs):
    calls.append(1)
    loss = loss_forward(self, *args, **kwargs)
    return loss * float('nan') if os.environ['RANK'] == '1' and len(calls) == 2 else loss


checkpoint.atomic_write = atomic.atomic_write = logged_write
DistillationLoss.forward = nan_once_on_rank_1
import main_dynn

sys.exit(main_dynn.main())
'''


def _torchrun(args: list, tmp_path: Path, name: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """TORCHRUN_MAIN under `torchrun --standalone --nproc_per_node 2`. Returns (finished process, the
    'rank path' lines of the checkpoint writes). A hung run is killed with its workers."""
    log = tmp_path / f'{name}_writes.log'
    script = tmp_path / f'{name}_main.py'
    script.write_text(TORCHRUN_MAIN.format(repo=str(REPO), log=str(log)))
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2', str(script),
               *args]
    proc = subprocess.Popen(command, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f'torchrun {name} did not finish in {RUN_TIMEOUT} s')
    done = subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)
    return done, log.read_text().splitlines() if log.exists() else []


def _assert_rank_zero_wrote_last_pth_last_each_epoch(writes: list[str], folder: Path, num_epochs: int) -> None:
    """Only rank 0 writes; last.pth once an epoch and after the epoch's other files (it marks them complete)."""
    assert writes and all(line.startswith('0 ') for line in writes), writes
    in_folder = [Path(line.split(' ', 1)[1]) for line in writes if Path(line.split(' ', 1)[1]).parent == folder]
    assert [path.name for path in in_folder].count('last.pth') == num_epochs
    assert in_folder[-1].name == 'last.pth'


@torch.no_grad()
def _val_accuracy(checkpoint: Path, data: Path) -> float:
    """Top-1 accuracy (%) of a backbone checkpoint over the whole validation folder, in this one process."""
    from data_loader_help import build_datasets
    from learning_helpers.backbone_stage import evaluate
    from learning_helpers.stage_common import RunConfig
    _, val_set, class_names, _, _ = build_datasets('DEMO', data, 32)
    model = model_factory.build_backbone('GFNet-ti-dynn', len(class_names), 32, 8, 0.0)
    model.load_state_dict(_load(checkpoint)['model'])
    loader = torch.utils.data.DataLoader(val_set, batch_size=12)
    return evaluate(model, loader, torch.device('cpu'), RunConfig(1, 0, checkpoint, {}))['acc']


@pytest.mark.process
def test_torchrun_two_processes_train_both_stages_like_one(demo_data, reference_backbone, reference_dynn, tmp_path):
    backbone, writes = _torchrun(['--stage', 'backbone', '--data-set', 'DEMO', '--data-path', str(demo_data),
                                  *DEMO_FLAGS, '--num_epoch', '1', '--amp', '--output-dir', str(tmp_path)],
                                 tmp_path, 'backbone')
    assert backbone.returncode == 0, backbone.stderr[-3000:]
    assert '--amp has no effect on cpu' in backbone.stderr
    assert backbone.stderr.count('at epoch 0 batch 1: step skipped (1 in a row)') == 2  # both ranks skipped
    _assert_rank_zero_wrote_last_pth_last_each_epoch(writes, tmp_path / BACKBONE_DIR, 1)
    lines = _epoch_lines(backbone.stdout, 'backbone')
    assert len(lines) == 1  # printed by rank 0 only
    assert ({_template(line) for line in lines}
            == {_template(line) for line in _epoch_lines(reference_backbone[1].stdout, 'backbone')})
    assert backbone.stdout.count('backbone stage done') == 1
    # the printed accuracy covers the whole validation set once: 13 + 12 images, reduced over the ranks
    last = _load(tmp_path / BACKBONE_DIR / 'last.pth')
    assert last['acc'] == pytest.approx(_val_accuracy(tmp_path / BACKBONE_DIR / 'last.pth', demo_data))
    assert f"val acc {last['acc']:.2f}" in lines[-1]

    dynn, writes = _torchrun(['--data-set', 'DEMO', '--data-path', str(demo_data), *DEMO_FLAGS, *DYNN_FLAGS,
                              '--num_epoch', '2', '--barely_train', '--checkpoint-path',
                              str(tmp_path / BACKBONE_DIR / 'best.pth'), '--output-dir', str(tmp_path)],
                             tmp_path, 'dynn')
    assert dynn.returncode == 0, dynn.stderr[-3000:]
    _assert_rank_zero_wrote_last_pth_last_each_epoch(writes, tmp_path / DYNN_DIR, 2)
    reference = reference_dynn[1].stdout
    for stage, count in (('warm-up', 1), ('joint', 1)):
        lines = _epoch_lines(dynn.stdout, stage)
        assert len(lines) == count
        assert {_template(line) for line in lines} == {_template(line) for line in _epoch_lines(reference, stage)}
    assert dynn.stdout.count('dynn stages done') == 1
    assert _load(tmp_path / DYNN_DIR / 'best.pth')['stage'] == 'joint'
