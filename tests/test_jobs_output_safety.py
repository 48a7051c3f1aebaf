"""Nothing a user trained is lost: output paths are checked before anything is written, runs own their folders,
--resume continues in place, two runs never share a folder, exports replace only exports, Ctrl-C is one line."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from conftest import FAST_FLAGS, TINY_FLAGS, one_error, tiny_entry, write_learnable_folder
from jobs.outputs import folder_lock
from learning_helpers.checkpoint import save_checkpoint
from main_dynn import main
from models.model_factory import build_dynn

REPO = Path(__file__).resolve().parents[1]
EXITS = [3, 7]


def write_dynn_checkpoint(folder: Path, stage: str = 'joint', epoch: int = 0, num_epoch: int = 2,
                          acc: float = 80.0) -> Path:
    """An untrained 3-class GFNet-Dynn (16 px, patch 8, exits 3 7) saved as the dynn stage saves its last.pth."""
    torch.manual_seed(0)
    model = build_dynn('GFNet-ti-dynn', 3, 16, 8, 0.0, EXITS, 'unc')
    args = {'arch': 'GFNet-ti-dynn', 'patch_size': 8, 'input_size': 16, 'exit_positions': EXITS, 'gate': 'unc',
            'data_set': 'TINY', 'ce_ic_tradeoff': 0.75, 'num_epoch': num_epoch, 'batch': 8,
            'class_names': ['class0', 'class1', 'class2']}
    return save_checkpoint(folder / 'last.pth', {'model': model.state_dict(), 'stage': stage, 'epoch': epoch,
                                                 'acc': acc, 'best_acc': acc, 'args': args})


# --- 1. no output replaces a checkpoint or a foreign file -----------------------------------------------------

def test_results_json_pointing_at_a_checkpoint_is_refused_and_the_checkpoint_kept(small_data, tmp_path, capsys):
    best = write_dynn_checkpoint(tmp_path / 'run').with_name('best.pth')
    best.write_bytes((tmp_path / 'run' / 'last.pth').read_bytes())
    before = best.read_bytes()
    line = one_error(capsys, [*TINY_FLAGS, '--eval', '--checkpoint-path', str(best), '--results-json', str(best)])
    assert f'--results-json {best} exists and is not a results JSON' in line
    assert best.read_bytes() == before


def test_results_json_that_is_a_folder_is_refused_before_the_evaluation(small_data, tmp_path, capsys):
    best = write_dynn_checkpoint(tmp_path / 'run')
    line = one_error(capsys, [*TINY_FLAGS, '--eval', '--checkpoint-path', str(best), '--results-json', str(tmp_path)])
    assert f'--results-json {tmp_path} is a folder' in line
    assert 'exits' not in capsys.readouterr().err  # no evaluation pass started


def test_a_plot_path_holding_a_foreign_file_is_refused(small_data, tmp_path, capsys):
    best = write_dynn_checkpoint(tmp_path / 'run')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'results_tradeoff.png').write_bytes(b'my holiday photo')
    line = one_error(capsys, [*TINY_FLAGS, '--eval', '--checkpoint-path', str(best), '--results-json',
                              str(tmp_path / 'out' / 'results.json')])
    assert 'results_tradeoff.png exists and is not a plot of --eval' in line
    assert (tmp_path / 'out' / 'results_tradeoff.png').read_bytes() == b'my holiday photo'


# --- 2. a new run never replaces another run --------------------------------------------------------------------

def test_a_second_run_into_a_folder_holding_a_run_stops_and_says_how_to_go_on(small_data, tmp_path, capsys):
    folder = tmp_path / 'checkpoint' / 'checkpoint_TINY_0.75_confEE'
    write_dynn_checkpoint(folder, epoch=0, num_epoch=2, acc=16.67)
    before = (folder / 'last.pth').read_bytes()
    line = one_error(capsys, [*FAST_FLAGS, '--output-dir', str(tmp_path)])
    assert f'{folder} already holds a run (stage joint, epoch 0, best val acc 16.67%)' in line
    assert f"--resume {folder / 'last.pth'}" in line and '--output-dir' in line and '--overwrite' in line
    assert (folder / 'last.pth').read_bytes() == before


def test_overwrite_replaces_the_earlier_run_whole(small_data, tmp_path, capsys):
    folder = tmp_path / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn'
    folder.mkdir(parents=True)
    (folder / 'ckpt_stale.pth').write_bytes(b'an earlier run')
    (folder / 'notes.txt').write_text('mine')
    assert main(['--stage', 'backbone', *FAST_FLAGS, '--output-dir', str(tmp_path), '--overwrite']) == 0
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith('.')) == ['best.pth', 'last.pth',
                                                                                       'notes.txt']


def test_a_run_never_writes_into_the_folder_of_its_checkpoint_path(small_data, tmp_path, capsys):
    folder = tmp_path / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn'
    folder.mkdir(parents=True)
    start = folder / 'best.pth'
    torch.save({'model': timm.create_model('gfnet_ti', num_classes=3, img_size=16, patch_size=8).state_dict()}, start)
    before = start.read_bytes()
    line = one_error(capsys, ['--stage', 'backbone', *FAST_FLAGS, '--checkpoint-path', str(start), '--output-dir',
                              str(tmp_path), '--overwrite'])
    assert f'--checkpoint-path {start} lies in {folder}, which this run writes' in line
    assert start.read_bytes() == before


def test_a_dynn_checkpoint_given_to_the_backbone_stage_is_refused(small_data, tmp_path, capsys):
    last = write_dynn_checkpoint(tmp_path / 'elsewhere')
    line = one_error(capsys, ['--stage', 'backbone', *FAST_FLAGS, '--checkpoint-path', str(last), '--output-dir',
                              str(tmp_path / 'out')])
    assert 'is a dynn-stage checkpoint' in line and '--resume' in line
    assert not (tmp_path / 'out').exists()


# --- 3. --resume continues the run in its own folder -------------------------------------------------------------

@pytest.fixture
def interrupted_run(small_data, tmp_path, capsys) -> Path:
    """A backbone run of 3 epochs stopped after its first (a last.pth saying epoch 0 of 3)."""
    run_dir = tmp_path / 'first'
    assert main(['--stage', 'backbone', *FAST_FLAGS, '--output-dir', str(run_dir)]) == 0
    last = run_dir / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'last.pth'
    checkpoint = torch.load(last, weights_only=True)
    checkpoint['args']['num_epoch'] = 3
    save_checkpoint(last, checkpoint)
    capsys.readouterr()
    return last


def test_resume_continues_in_the_checkpoints_folder_from_any_directory(interrupted_run, tmp_path, monkeypatch,
                                                                       capsys):
    elsewhere = tmp_path / 'elsewhere'
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(['--resume', str(interrupted_run), '--device', 'cpu', '--num_workers', '0']) == 0
    assert torch.load(interrupted_run, weights_only=True)['epoch'] == 2
    assert not any(elsewhere.iterdir())  # nothing written in the working directory


@pytest.mark.parametrize('flags, name', [(['--stage', 'dynn'], '--stage dynn'), (['--batch', '4'], '--batch 4'),
                                         (['--output-dir', 'od3'], '--output-dir od3'),
                                         (['--arch', 'GFNet-xs-dynn'], '--arch GFNet-xs-dynn')])
def test_resume_with_a_flag_that_would_change_the_run_is_refused(flags, name, interrupted_run, capsys):
    before = interrupted_run.read_bytes()
    line = one_error(capsys, ['--resume', str(interrupted_run), *flags])
    assert line.startswith(f'error: {name} would change the run') and 'drop' in line
    assert interrupted_run.read_bytes() == before


def test_resume_of_a_finished_run_says_how_to_train_further(interrupted_run, capsys):
    checkpoint = torch.load(interrupted_run, weights_only=True)
    checkpoint['epoch'] = 2
    save_checkpoint(interrupted_run, checkpoint)
    line = one_error(capsys, ['--resume', str(interrupted_run), '--num_epoch', '10'])
    assert 'nothing to resume' in line and '--num_epoch N' in line and '--checkpoint-path' in line


def test_resume_of_a_file_moved_out_of_its_run_folder_is_refused(interrupted_run, tmp_path, capsys):
    moved = tmp_path / 'last.pth'
    moved.write_bytes(interrupted_run.read_bytes())
    assert 'is not in its run folder' in one_error(capsys, ['--resume', str(moved)])


# --- 4. one run per folder ---------------------------------------------------------------------------------------

def test_a_second_run_on_a_folder_in_use_names_the_first_ones_pid(small_data, tmp_path, capsys):
    folder = tmp_path / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn'
    with folder_lock(folder):  # another run holds it
        line = one_error(capsys, ['--stage', 'backbone', *FAST_FLAGS, '--output-dir', str(tmp_path)])
    assert f'PID {os.getpid()} is writing {folder}' in line
    assert not list(folder.glob('*.pth'))


# Prepended to a child's script: once the first epoch's checkpoints are written, the next epoch's first training
# batch prints SAVED and holds (sleeps), so the test acts at a known point instead of polling for a file.
HOLD_AFTER_FIRST_SAVE = (
    'import time; from learning_helpers import backbone_stage, loop\n'
    'save_epoch, batches = backbone_stage.save_epoch, loop.batches\n'
    'def held(*args, **kwargs):\n'
    '    print("SAVED", flush=True); time.sleep(600); yield from batches(*args, **kwargs)\n'
    'def hold_next_epoch(*args, **kwargs):\n'
    '    save_epoch(*args, **kwargs); loop.batches = held\n'
    'backbone_stage.save_epoch = hold_next_epoch\n')


def wait_for_saved(run: subprocess.Popen) -> None:
    """Read the child's stdout until it says its first epoch is saved and it holds in training (or it ends)."""
    for line in run.stdout:
        if line.strip() == 'SAVED':
            return
    pytest.fail(f'the run ended before its first epoch was saved: {run.stderr.read()}')


@pytest.mark.process
def test_two_processes_on_one_folder_the_second_stops_and_the_first_finishes(tmp_path):
    """Real processes: the first trains, the second starts meanwhile on the same folder and is turned away."""
    data = write_learnable_folder(tmp_path / 'data', train_per_class=8, val_per_class=2, size=16)
    argv = ['--stage', 'backbone', *[f if f != 'TINY' else 'TWO' for f in TINY_FLAGS], '--input-size', '16',
            '--num_epoch', '3', '--output-dir', str(tmp_path / 'out')]
    script = (f'import sys; sys.path.insert(0, {str(REPO)!r}); import dataset_config, main_dynn; '
              f'dataset_config.DATASET_CONFIG["TWO"] = {tiny_entry(data)!r}; sys.exit(main_dynn.main({argv!r}))')
    first = subprocess.Popen([sys.executable, '-c', HOLD_AFTER_FIRST_SAVE + script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    folder = tmp_path / 'out' / 'checkpoint' / 'backbone_TWO_GFNet-ti-dynn'
    wait_for_saved(first)  # the first run holds its folder, one epoch written
    second = subprocess.run([sys.executable, '-c', script.replace("'--num_epoch', '3'", "'--num_epoch', '3', "
                                                                  "'--overwrite'")],
                            capture_output=True, text=True, timeout=300)
    first.kill()
    first.communicate()
    assert second.returncode == 2
    assert f'PID {first.pid} is writing {folder}' in second.stderr
    assert torch.load(folder / 'last.pth', weights_only=True)['stage'] == 'backbone'  # the first run's, intact


# --- 5. benchmarks and checkpoints without trained exits ---------------------------------------------------------

def test_benchmarks_write_under_bench_by_default_and_never_over_a_foreign_file(tmp_path, monkeypatch, capsys):
    from benchmarks.common import json_path
    monkeypatch.chdir(tmp_path)
    assert json_path(None, 'early_exit_cpu.json') == Path('bench') / 'early_exit_cpu.json'
    (tmp_path / 'mine.json').write_text('{"my": "notes"}')
    from benchmarks.early_exit import main as bench_main
    assert bench_main(['--checkpoint', 'x.pth', '--json', 'mine.json']) == 2
    assert 'mine.json exists and is not a benchmark JSON' in capsys.readouterr().err
    assert (tmp_path / 'mine.json').read_text() == '{"my": "notes"}'


@pytest.mark.parametrize('job', ['eval', 'export', 'benchmark'])
def test_a_backbone_checkpoint_is_refused_where_exits_are_needed(job, small_data, tmp_path, capsys):
    backbone = tmp_path / 'backbone.pth'
    model = timm.create_model('gfnet_ti', num_classes=3, img_size=16, patch_size=8)
    save_checkpoint(backbone, {'model': model.state_dict(), 'stage': 'backbone', 'args': {'patch_size': 8}})
    if job == 'benchmark':
        from benchmarks.early_exit import main as bench_main
        rc, err = bench_main(['--checkpoint', str(backbone), '--data-set', 'TINY', '--json',
                              str(tmp_path / 'b.json')]), capsys.readouterr().err
        assert rc == 2 and 'has no trained exits' in err
        return
    argv = ([*TINY_FLAGS, '--eval'] if job == 'eval' else ['--export', 'onnx', '--out', str(tmp_path / 'onnx')])
    assert 'has no trained exits (a backbone checkpoint)' in one_error(capsys, [*argv, '--checkpoint-path',
                                                                                str(backbone)])


# --- 6. an export folder holds an export only --------------------------------------------------------------------

def test_export_into_a_folder_of_other_files_is_refused(tmp_path, capsys):
    best = write_dynn_checkpoint(tmp_path / 'run')
    out = tmp_path / 'onnx'
    out.mkdir()
    (out / 'manifest.json').write_text('{"mine": true}')
    line = one_error(capsys, ['--export', 'onnx', '--checkpoint-path', str(best), '--out', str(out)])
    assert 'holds files that are not an earlier export' in line
    assert (out / 'manifest.json').read_text() == '{"mine": true}'


@pytest.mark.slow
def test_export_replaces_an_earlier_export_whole(tmp_path, capsys):
    pytest.importorskip('onnxscript')
    best = write_dynn_checkpoint(tmp_path / 'run')
    out = tmp_path / 'onnx'
    out.mkdir()
    (out / 'manifest.json').write_text(json.dumps({'segments': ['segment_7.onnx'], 'exit_positions': [1] * 7}))
    (out / 'segment_7.onnx').write_bytes(b'an old segment')
    assert main(['--export', 'onnx', '--checkpoint-path', str(best), '--out', str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ['manifest.json', 'segment_0.onnx', 'segment_1.onnx',
                                                     'segment_2.onnx']
    assert json.loads((out / 'manifest.json').read_text())['exit_positions'] == EXITS


# --- 7. Ctrl-C ---------------------------------------------------------------------------------------------------

@pytest.mark.process
def test_ctrl_c_during_training_is_one_line_exit_130_and_the_run_resumes(tmp_path):
    data = write_learnable_folder(tmp_path / 'data', train_per_class=8, val_per_class=2, size=16)
    argv = ['--stage', 'backbone', '--data-set', 'SIG', '--arch', 'GFNet-ti-dynn', '--patch-size', '8',
            '--input-size', '16', '--batch', '4', '--num_epoch', '3', '--device', 'cpu', '--num_workers', '2',
            '--output-dir', str(tmp_path / 'out')]
    script = (f'import sys; sys.path.insert(0, {str(REPO)!r}); import dataset_config, main_dynn; '
              f'dataset_config.DATASET_CONFIG["SIG"] = {tiny_entry(data)!r}; sys.exit(main_dynn.main(sys.argv[1:]))')
    run = subprocess.Popen([sys.executable, '-c', HOLD_AFTER_FIRST_SAVE + script, *argv], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    last = tmp_path / 'out' / 'checkpoint' / 'backbone_SIG_GFNet-ti-dynn' / 'last.pth'
    wait_for_saved(run)
    os.killpg(run.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group, workers too
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130
    assert 'Traceback' not in err
    lines = [line for line in err.replace('\r', '\n').splitlines() if line.startswith('interrupted: ')]
    assert len(lines) == 1 and f'--resume {last}' in lines[0] and 'backbone epoch' in lines[0]
    checkpoint = torch.load(last, weights_only=True)  # intact, after epoch 0 of 3
    assert checkpoint['epoch'] == 0
    resumed = subprocess.run([sys.executable, '-c', script, '--resume', str(last)], capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(last, weights_only=True)['epoch'] == 2
