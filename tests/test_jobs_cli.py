"""End-to-end runs of `main_dynn.py` on tiny learnable data: help, backbone, distillation, dynn, eval, export."""
import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import dataset_config
from conftest import TINY_FLAGS, tiny_entry
from main_dynn import main

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = 3  # the learnable tiny data of conftest.tiny_backbone
CHANCE = 100 / NUM_CLASSES
RESULTS_KEYS = {'dataset': str, 'arch': str, 'input_size': int, 'num_val': int, 'exit_positions': list,
                'gflops_per_exit': list, 'full_gflops': float, 'per_exit_accuracy': list, 'full_accuracy': float,
                'sweep': list}
SWEEP_KEYS = {'threshold': float, 'accuracy': float, 'expected_gflops': float, 'exit_share': list,
              'exit_accuracy': list}
EXITS = [3, 7]  # two exits: three ONNX segments to export, not five
THRESHOLDS = [0.2, 0.5, 0.9]


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _no_traceback(*texts: str) -> None:
    assert not any('Traceback' in text for text in texts)


# --help

@pytest.mark.process
def test_help_runs_from_another_directory_and_shows_groups_and_defaults(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / 'main_dynn.py'), '--help'], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = ' '.join(done.stdout.split())  # help wraps lines; compare with single spaces
    text = text[text.index('options:'):]  # past the usage block
    for group in ('data:', 'data loading:', 'model:', 'training:', 'distillation (backbone stage):',
                  'early exits (dynn stage):', 'evaluation and export:', 'runtime:'):
        assert group in text
    defaults = {'--batch BATCH': '64', '--num_epoch NUM_EPOCH': '100', '--ce_ic_tradeoff CE_IC_TRADEOFF': '0.75'}
    # --lr's default is each stage's own: GFNet's transfer recipe for stage 0, the reference's for stages 1-2
    assert ('--lr LR learning rate; default: 0.0001 with --stage backbone (GFNet\'s), 0.001 with --stage dynn '
            "(the reference's)") in text
    # the seed README's --split-ratio: an alias of --train-ratio, 0.8 unless a checkpoint or the entry says otherwise
    ratio_help = text[text.index('--train-ratio TRAIN_RATIO'):].split(' --split-seed')[0]
    assert '--split-ratio TRAIN_RATIO' in ratio_help and 'else 0.8' in ratio_help
    for flag, value in defaults.items():
        help_line = text[text.index(flag + ' '):].split(' --')[0]  # up to the next flag
        match = re.search(r'\(default: ([^)]*)\)', help_line)
        assert match and match.group(1) == value, flag


# stage 0: backbone

@pytest.mark.slow
def test_backbone_stage_beats_chance_and_writes_its_files(tiny_backbone):
    assert tiny_backbone.rc == 0
    folder = tiny_backbone.checkpoint.parent
    assert {p.name for p in folder.glob('*.pth')} == {'best.pth', 'last.pth'}
    best = torch.load(tiny_backbone.checkpoint, map_location='cpu', weights_only=True)
    assert best['acc'] > CHANCE + 25  # 3 solid colours: far above 33%
    assert best['stage'] == 'backbone' and best['args']['arch'] == 'GFNet-ti-dynn'
    assert f'checkpoint: {tiny_backbone.checkpoint}' in tiny_backbone.stdout
    assert list((tiny_backbone.output_dir / 'runs').glob('backbone_TINY_GFNet-ti-dynn_*/events.out.tfevents.*'))


@pytest.fixture(scope='module')
def teachers(tiny_backbone, tmp_path_factory) -> dict[str, Path]:
    """Teacher weights by --teacher-model: the tiny backbone's checkpoint, and an untrained but valid 3-class
    timm resnet18 saved by hand as a bare state dict (as users have them)."""
    path = tmp_path_factory.mktemp('teachers') / 'resnet18.pth'
    torch.save(timm.create_model('resnet18', num_classes=NUM_CLASSES).state_dict(), path)
    return {'GFNet-ti-dynn': tiny_backbone.checkpoint, 'resnet18': path}


@pytest.mark.slow
@pytest.mark.parametrize('kind, teacher', [('soft', 'GFNet-ti-dynn'), ('soft', 'resnet18'),
                                           ('hard', 'GFNet-ti-dynn'), ('freq', 'GFNet-ti-dynn')])
def test_distillation_runs_one_epoch_with_a_teacher(kind, teacher, tiny_data, teachers, tmp_path, capsys):
    teacher_path = teachers[teacher]
    rc, out, err = _run(['--stage', 'backbone', *TINY_FLAGS, '--num_epoch', '1', '--barely_train',
                         '--distillation-type', kind, '--teacher-model', teacher, '--teacher-path', str(teacher_path),
                         '--output-dir', str(tmp_path)], capsys)
    assert rc == 0, err
    best = tmp_path / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'best.pth'
    assert f'checkpoint: {best}' in out
    loss = float(re.search(r'backbone epoch 0 \| loss (\S+) \|', out).group(1))
    assert math.isfinite(loss) and loss > 0
    checkpoint = torch.load(best, map_location='cpu', weights_only=True)
    assert checkpoint['args']['distillation_type'] == kind and checkpoint['args']['teacher_model'] == teacher
    assert checkpoint['epoch'] == 0


# stages 1-2, then evaluation and export of their checkpoint

@pytest.fixture(scope='module')
def dynn_run(tiny_backbone, tmp_path_factory):
    """One --barely_train dynn run (1 warm-up + 1 joint epoch) from the tiny backbone, shared by this module."""
    output_dir = tmp_path_factory.mktemp('dynn_run')
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(tiny_backbone.data))
        rc = main([*TINY_FLAGS, '--checkpoint-path', str(tiny_backbone.checkpoint), '--num_epoch', '2',
                   '--max_warmup_epoch', '1', '--exit-positions', *map(str, EXITS), '--barely_train',
                   '--output-dir', str(output_dir)])
    folder = output_dir / 'checkpoint' / 'checkpoint_TINY_0.75_confEE'
    return output_dir, folder, rc, stdout.getvalue()


@pytest.mark.slow
def test_dynn_stage_writes_the_spec_layout(dynn_run):
    output_dir, folder, rc, stdout = dynn_run
    assert rc == 0
    names = sorted(p.name for p in folder.glob('*.pth'))
    assert 'best.pth' in names and 'last.pth' in names
    epochs = [n for n in names if n.startswith('ckpt_epoch')]
    assert len(epochs) == 1 and re.fullmatch(r'ckpt_epoch1_0\.75_\d+\.\d{1,2}\.pth', epochs[0])
    warmup = output_dir / 'checkpoint_warmup' / 'TINY_GFNet-ti-dynn_32_1_0.75'
    assert sorted(p.name for p in warmup.glob('*.pth')) == [f'{k}.pth' for k in range(len(EXITS))]
    assert f"checkpoint: {folder / 'best.pth'}" in stdout
    assert list((output_dir / 'runs').glob('dynn_TINY_0.75_*/events.out.tfevents.*'))
    for path in [*folder.glob('*.pth'), *warmup.glob('*.pth')]:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)  # plain data only
        assert 'model' in checkpoint
    best = torch.load(folder / 'best.pth', map_location='cpu', weights_only=True)
    assert best['stage'] == 'joint' and best['epoch'] == 1 and 0 <= best['acc'] <= 100
    assert any(key.startswith(f'gates.{len(EXITS) - 1}.') for key in best['model'])
    head = torch.load(warmup / '0.pth', map_location='cpu', weights_only=True)['model']
    assert head['weight'].shape == (NUM_CLASSES, 256)


def _check_results_schema(results: dict) -> None:
    """The results.json contract: exact types, list lengths, percent accuracies, shares that sum to 1."""
    for key, kind in RESULTS_KEYS.items():
        assert isinstance(results[key], kind), key
    exits = len(EXITS) + 1
    assert results['dataset'] == 'TINY' and results['arch'] == 'GFNet-ti-dynn'
    assert results['input_size'] == 32 and results['num_val'] == 4 * NUM_CLASSES
    assert results['exit_positions'] == EXITS
    assert len(results['gflops_per_exit']) == len(results['per_exit_accuracy']) == exits
    gflops = results['gflops_per_exit']
    assert all(isinstance(g, float) for g in gflops) and gflops == sorted(gflops)  # first exit -> final head
    assert results['full_gflops'] == gflops[-1] > gflops[0] > 0
    assert all(0 <= a <= 100 for a in results['per_exit_accuracy'])
    assert results['full_accuracy'] == results['per_exit_accuracy'][-1]
    assert results['full_accuracy'] > 1  # percent, not a fraction (the backbone learned the colours)
    assert [point['threshold'] for point in results['sweep']] == THRESHOLDS
    for point in results['sweep']:
        for key, kind in SWEEP_KEYS.items():
            assert isinstance(point[key], kind), key
        assert len(point['exit_share']) == len(point['exit_accuracy']) == exits
        assert sum(point['exit_share']) == pytest.approx(1.0)
        assert all(0 <= s <= 1 for s in point['exit_share'])
        assert 0 <= point['accuracy'] <= 100 and all(0 <= a <= 100 for a in point['exit_accuracy'])
        expected = sum(s * g for s, g in zip(point['exit_share'], gflops))
        assert point['expected_gflops'] == pytest.approx(expected, rel=1e-6)


@pytest.mark.slow
def test_eval_writes_results_json_plots_and_a_table(dynn_run, tiny_data, tmp_path, capsys):
    best = dynn_run[1] / 'best.pth'
    json_path = tmp_path / 'out' / 'results.json'
    rc, out, err = _run([*TINY_FLAGS, '--eval', '--checkpoint-path', str(best), '--results-json', str(json_path),
                         '--thresholds', *map(str, THRESHOLDS)], capsys)
    assert rc == 0, err
    results = json.loads(json_path.read_text())
    _check_results_schema(results)
    assert results['conformal']['in_sample'] is True  # no calibration images: the stored qhats, fit on these
    assert 'in-sample: the coverage holds by construction' in out
    assert (tmp_path / 'out' / 'results_tradeoff.png').read_bytes()[:4] == b'\x89PNG'
    assert (tmp_path / 'out' / 'results_confusion.png').read_bytes()[:4] == b'\x89PNG'
    assert 'threshold' in out and 'accuracy (%)' in out and f'results: {json_path}' in out
    _no_traceback(out, err)


WRAPPER = '''
import runpy, sys
sys.path.insert(0, {repo!r})
import dataset_config
dataset_config.DATASET_CONFIG['TINY'] = {entry!r}
sys.argv = [{script!r}] + {argv!r}
runpy.run_path({script!r}, run_name='__main__')
'''


@pytest.mark.process
def test_eval_in_a_subprocess_from_another_directory(dynn_run, tiny_backbone, tmp_path):
    """`python main_dynn.py --eval` started elsewhere: relative imports and the default results path work.
    A tiny wrapper registers the TINY data set first (it exists only in this test session)."""
    best = dynn_run[1] / 'best.pth'
    argv = [*TINY_FLAGS, '--eval', '--checkpoint-path', str(best), '--barely_train']
    wrapper = tmp_path / 'run_main.py'
    wrapper.write_text(WRAPPER.format(repo=str(REPO), entry=tiny_entry(tiny_backbone.data), argv=argv,
                                      script=str(REPO / 'main_dynn.py')))
    env = {**os.environ, 'PYTHONPATH': ''}
    done = subprocess.run([sys.executable, str(wrapper)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    _no_traceback(done.stdout, done.stderr)
    results = json.loads((best.parent / 'results.json').read_text())  # default: beside the checkpoint
    assert results['checkpoint'] == str(best) and 1 <= len(results['sweep']) <= 13 and results['front']
    assert not list(tmp_path.glob('checkpoint*')) and not (tmp_path / 'runs').exists()


@pytest.mark.slow
def test_export_onnx_writes_a_manifest_and_segments(dynn_run, tiny_data, tmp_path, capsys, monkeypatch):
    pytest.importorskip('onnxscript')
    out_dir = tmp_path / 'onnx'
    monkeypatch.chdir(tmp_path)  # a user outside the repository, with a relative --out
    rc, out, err = _run(['--data-set', 'TINY', '--export', 'onnx', '--checkpoint-path', str(dynn_run[1] / 'best.pth'),
                         '--out', 'onnx'], capsys)
    assert rc == 0, err
    manifest = json.loads((out_dir / 'manifest.json').read_text())
    run_args = torch.load(dynn_run[1] / 'best.pth', weights_only=True)['args']
    segments = [f'segment_{k}.onnx' for k in range(len(EXITS) + 1)]
    assert manifest['segments'] == segments and sorted(p.name for p in out_dir.glob('*.onnx')) == segments
    assert manifest['exit_positions'] == EXITS and manifest['class_names'] == run_args['class_names']
    assert manifest['input_size'] == run_args['input_size'] and 0 <= manifest['threshold'] <= 1
    assert manifest['checkpoint'] == str(dynn_run[1] / 'best.pth')
    # the printed command runs from anywhere: the runner's file finds its modules from the repository root
    repo = Path(__file__).resolve().parent.parent
    command = next(line.strip() for line in out.splitlines() if 'onnx_runner' in line)
    assert command == f'python {repo}/deployment/onnx_runner.py {out_dir.resolve()} IMAGE_OR_FOLDER [...]'
    image = next(tiny_data.glob('val/*/*.png'))
    runnable = command.replace('python', sys.executable, 1).replace('IMAGE_OR_FOLDER [...]', str(image))
    result = subprocess.run(runnable, shell=True, capture_output=True, text=True)
    assert result.returncode == 0 and str(image) in result.stdout, result.stderr


def test_export_threshold_is_the_given_one_else_the_one_eval_chose_else_one_half(tmp_path):
    from jobs.inference_jobs import export_threshold
    checkpoint = tmp_path / 'best.pth'
    assert export_threshold(str(checkpoint), None, 32, None)[0] == 0.5
    (tmp_path / 'results.json').write_text(json.dumps({'chosen': {'threshold': 0.7}, 'input_size': 32}))
    assert export_threshold(str(checkpoint), None, 32, None)[0] == 0.7
    assert export_threshold(str(checkpoint), 0.6, 32, None) == (0.6, {'from': '--exit-threshold'})


@pytest.mark.slow
def test_dynn_stage_whose_epochs_all_go_to_warm_up_prints_a_checkpoint_that_exists(tiny_backbone, tiny_data,
                                                                                     tmp_path, capsys):
    """--num_epoch 1 with the default --max_warmup_epoch 10: no joint epoch is left; the run must still name
    (and have written) an existing checkpoint, and warn that the gates were not trained."""
    rc, out, err = _run([*TINY_FLAGS, '--checkpoint-path', str(tiny_backbone.checkpoint), '--num_epoch', '1',
                         '--exit-positions', *map(str, EXITS), '--barely_train', '--output-dir', str(tmp_path)],
                        capsys)
    assert rc == 0, err
    printed = Path(re.search(r'checkpoint: (\S+)$', out.strip().splitlines()[-1]).group(1))
    assert printed.is_file()
    assert torch.load(printed, map_location='cpu', weights_only=True)['args']['num_epoch'] == 1
    assert '--max_warmup_epoch' in err


@pytest.mark.slow
def test_early_exit_benchmark_writes_its_json_schema(dynn_run, tiny_data, tmp_path, capsys):
    """`python -m benchmarks.early_exit` on a trained checkpoint: one table, and JSON with the full network
    and one point per threshold, speed-ups relative to the full network's own timings."""
    from benchmarks.early_exit import main as bench_main
    out_json = tmp_path / 'bench.json'
    rc = bench_main(['--checkpoint', str(dynn_run[1] / 'best.pth'), '--data-set', 'TINY', '--device', 'cpu',
                     '--thresholds', '0.3', '0.7', '--latency-images', '100', '--rounds', '1',
                     '--json', str(out_json)])
    assert rc == 0, capsys.readouterr().err
    result = json.loads(out_json.read_text())
    assert result['device'] == 'cpu' and result['threads'] >= 1
    assert set(result['full']) == {'accuracy', 'gflops', 'latency_ms_bs1', 'median_ms_bs1', 'throughput_bs64'}
    assert [p['threshold'] for p in result['points']] == [0.3, 0.7]
    for point in result['points']:
        assert {'threshold', 'accuracy', 'gflops', 'latency_ms_bs1', 'median_ms_bs1', 'throughput_bs64',
                'speedup_bs1', 'median_speedup_bs1', 'speedup_bs64'} <= set(point)
        assert point['speedup_bs1'] == pytest.approx(result['full']['latency_ms_bs1'] / point['latency_ms_bs1'])
        assert point['speedup_bs64'] == pytest.approx(point['throughput_bs64'] / result['full']['throughput_bs64'])
        assert 0 < point['gflops'] <= result['full']['gflops'] + 1e-9
    assert 'threshold' in capsys.readouterr().out


def test_early_exit_benchmark_without_a_gpu_says_so(tmp_path, capsys):
    from benchmarks.early_exit import main as bench_main
    if torch.cuda.is_available():
        pytest.skip('a GPU is visible')
    rc = bench_main(['--checkpoint', str(tmp_path / 'none.pth'), '--device', 'cuda'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and 'no GPU' in err[0]


@pytest.mark.slow
def test_backbone_stage_on_demo_images_beats_chance_clearly(tmp_path, capsys):
    """The DEMO generator's scenes (32 train + 10 val per class, 8 classes, read at 32 px) are learnable:
    four epochs of the CLI's backbone stage end far above the 12.5% of chance."""
    from data_pipeline.demo_data import ensure_demo_dataset
    data = ensure_demo_dataset(tmp_path / 'DEMO', train_per_class=32, val_per_class=10)
    rc, out, err = _run(['--stage', 'backbone', '--data-set', 'DEMO', '--data-path', str(data), '--arch',
                         'GFNet-ti-dynn', '--patch-size', '8', '--input-size', '32', '--batch', '32', '--num_epoch',
                         '4', '--lr', '2e-3', '--num_workers', '0', '--device', 'cpu', '--output-dir',
                         str(tmp_path / 'out')], capsys)
    assert rc == 0, err
    best = torch.load(tmp_path / 'out' / 'checkpoint' / 'backbone_DEMO_GFNet-ti-dynn' / 'best.pth',
                      map_location='cpu', weights_only=True)
    assert best['acc'] >= 35.0, f"best val acc {best['acc']:.2f}% (chance 12.5%)"
    assert f"best val acc {best['acc']:.2f}%" in out


@pytest.mark.slow
def test_dynn_costs_benchmark_times_the_pipeline_on_a_trained_checkpoint(dynn_run, tiny_data, tmp_path, capsys):
    from benchmarks.dynn_costs import main as bench_main
    out_json = tmp_path / 'costs.json'
    rc = bench_main(['--checkpoint', str(dynn_run[1] / 'best.pth'), '--data-set', 'TINY', '--num_workers', '0',
                     '--json', str(out_json)])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(out_json.read_text())
    assert report['benchmark'] == 'dynn_costs'
    assert report['eval_over_plain'] == pytest.approx(report['eval_s'] / report['plain_forward_pass_s'])
    assert report['warmup_over_backbone'] == pytest.approx(report['warmup_epoch_s'] / report['backbone_epoch_s'])
    assert 0 <= report['flops_saving'] < 1 and report['warmup_epoch_s'] > 0
