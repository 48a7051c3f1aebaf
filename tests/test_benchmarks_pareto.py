"""benchmarks.pareto: the front rule, reading the --eval results (front first, else the sweep), the summary of
every early-exit model, and how a baseline's exits are trained."""
import json

import pytest

from benchmarks import pareto
from benchmarks.pareto import get_args_parser, main, pareto_front, read_dynn_points, summary, train_exits
from conftest import one_error
from jobs.trained_run import RunArgs


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [{'accuracy': 90, 'gflops': 1.0}, {'accuracy': 80, 'gflops': 0.5}, {'accuracy': 85, 'gflops': 1.2},
              {'accuracy': 90, 'gflops': 1.5}, {'accuracy': 70, 'gflops': 0.5}]
    assert pareto_front(points, 'gflops') == {0, 1}


@pytest.mark.parametrize('key', ['front', 'sweep'])
def test_dynn_points_come_from_the_front_else_the_sweep(key, tmp_path):
    point = {'threshold': 0.5, 'accuracy': 91.0, 'expected_gflops': 0.1}
    path = tmp_path / 'results.json'
    path.write_text(json.dumps({key: [point], **({'sweep': [{**point, 'threshold': 0.9}]} if key == 'front' else {})}))
    assert read_dynn_points(path)[1] == [point]


def test_results_without_thresholds_are_one_line(tmp_path, capsys):
    path = tmp_path / 'results.json'
    path.write_text(json.dumps({'sweep': []}))
    line = one_error(capsys, ['--dynn-results', str(path), '--json', str(tmp_path / 'p.json')], main)
    assert 'has no front or sweep' in line


def _point(model: str, accuracy: float, latency_ms: float, gflops: float, exit_model: str | None = None) -> dict:
    kind = {'kind': 'early_exit', 'exit_model': exit_model, 'threshold': 0.5} if exit_model else {'kind': 'static'}
    return {'model': model, 'accuracy': accuracy, 'latency_ms': latency_ms, 'gflops': gflops, **kind}


def test_summary_places_each_early_exit_model_on_each_front():
    rows = [_point('resnet18', 97.0, 13.0, 0.6), _point('GFNet-Dynn t=0.5', 94.0, 11.0, 0.3, 'GFNet-Dynn'),
            _point('resnet18 + exits t=0.5', 96.5, 8.0, 0.3, 'resnet18 + exits')]
    for cost in ('latency_ms', 'gflops'):
        front = pareto_front(rows, cost)
        for i, row in enumerate(rows):
            row[f'on_{cost}_front'] = i in front
    lines = summary(rows)
    assert lines[:3] == ['accuracy vs batch-1 CPU latency: static models on the front: resnet18',
                         '  GFNet-Dynn is not on it; resnet18 + exits t=0.5 beat its most accurate point',
                         '  resnet18 + exits is on it at 1 of 1 thresholds (0.5)']


def test_exits_train_with_the_gfnet_runs_recipe_and_lambda(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(pareto, '_run_main_dynn', lambda command, what: commands.append(command))
    args = get_args_parser().parse_args(['--dynn-results', 'r.json', '--data-set', 'DEMO',
                                         '--output-dir', str(tmp_path)])
    dynn_args = RunArgs.from_dict({'ce_ic_tradeoff': 0.5, 'num_epoch': 8, 'max_warmup_epoch': 2, 'lr': 0.01,
                                   'opt': None})
    results = train_exits('resnet18', tmp_path / 'backbone.pth', args, dynn_args)
    train, evaluate = commands
    assert train[:2] == ['--stage', 'dynn'] and ' '.join(train[4:]) == (
        f"--checkpoint-path {tmp_path / 'backbone.pth'} --num_epoch 8 --max_warmup_epoch 2 --lr 0.01 "
        f"--ce_ic_tradeoff 0.5 --output-dir {tmp_path / 'exits_resnet18'}")
    best = tmp_path / 'exits_resnet18' / 'checkpoint' / 'checkpoint_DEMO_resnet18_0.5_confEE' / 'best.pth'
    assert evaluate == ['--eval', '--data-set', 'DEMO', '--checkpoint-path', str(best)]
    assert results == best.parent / 'results.json'


def test_goal_sets_each_choice_against_its_own_static_model():
    rows = [{**_point('resnet18', 97.0, 12.0, 0.6), 'arch': 'resnet18'},
            {**_point('convnext_atto', 95.0, 10.0, 0.5), 'arch': 'convnext_atto'},
            _point('resnet18 + exits t=0.2', 96.5, 8.0, 0.3, 'resnet18 + exits')]
    selection = {'threshold': 0.2, 'accuracy': 96.5, 'budget': 'acc-drop=1', 'set': 'calibration'}
    met = pareto.goal_row('resnet18 + exits', selection, 8.0, rows)
    assert met['speedup'] == 12.0 / 8.0 and met['accuracy_drop'] == 0.5 and met['met']
    slow = pareto.goal_row('resnet18 + exits', selection, 9.5, rows)  # 1.26x: too little
    lossy = pareto.goal_row('resnet18 + exits', {**selection, 'accuracy': 95.5}, 8.0, rows)  # 1.5 points lost
    assert not slow['met'] and not lossy['met']
    for cost in ('latency_ms', 'gflops'):
        front = pareto_front(rows, cost)
        for i, row in enumerate(rows):
            row[f'on_{cost}_front'] = i in front
    lines = pareto.goal_summary([met, slow], rows)
    assert lines[0] == ('resnet18 + exits at its choice (acc-drop=1 on the calibration images): 96.50% at 8.00 ms vs '
                        'static 97.00% at 12.00 ms: 1.50x, +0.50 points lost: met (goal >= 1.3x, <= 1 point)')
    assert lines[1].endswith('1.26x, +0.50 points lost: missed (goal >= 1.3x, <= 1 point)')
    assert lines[2] == ('most accurate early-exit point: resnet18 + exits t=0.2 (96.50% at 8.00 ms): on the latency '
                        'front against every static model')


def test_baselines_hold_out_the_gfnet_runs_calibration_share(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(pareto, '_run_main_dynn', lambda command, what: commands.append(command))
    args = get_args_parser().parse_args(['--dynn-results', 'r.json', '--output-dir', str(tmp_path)])
    pareto.train_baseline('resnet18', args, 64, 8, calib_ratio=0.1)
    pareto.train_baseline('resnet50', args, 64, 8)
    with_calib, without = commands
    assert with_calib[with_calib.index('--calib-ratio') + 1] == '0.1' and '--calib-ratio' not in without


def test_spread_points_keep_both_ends_of_the_front():
    points = [{'threshold': 1 - i / 100, 'accuracy': 60 + i} for i in range(40)]
    picked = pareto.spread_points(points, 5)
    assert [p['accuracy'] for p in picked] == [60, 70, 80, 89, 99]  # round(i * 39 / 4): 0 10 20 29 39
    assert pareto.spread_points(points[:3], 5) == sorted(points[:3], key=lambda p: p['accuracy'])


def test_timed_points_add_the_eval_choice_once():
    points = [{'threshold': 1 - i / 100, 'accuracy': 60 + i} for i in range(40)]
    off_front = {'threshold': 0.555, 'accuracy': 70.5}
    assert pareto.timed_points(points, off_front, 5)[-1] == off_front
    assert len(pareto.timed_points(points, points[10], 5)) == 5  # already among the spread points
    assert len(pareto.timed_points(points, None, 5)) == 5
