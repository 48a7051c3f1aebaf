"""benchmarks.pareto: the front rule, reading the --eval results (front first, else the sweep), the summary of
every early-exit model, which runs are planned and how each is trained and evaluated, and the goal per seed and
over seeds."""
import json

import pytest

from benchmarks import pareto
from benchmarks.pareto import get_args_parser, pareto_front, read_points, summary, train_exits
from conftest import one_error


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [{'accuracy': 90, 'gflops': 1.0}, {'accuracy': 80, 'gflops': 0.5}, {'accuracy': 85, 'gflops': 1.2},
              {'accuracy': 90, 'gflops': 1.5}, {'accuracy': 70, 'gflops': 0.5}]
    assert pareto_front(points, 'gflops') == {0, 1}


@pytest.mark.parametrize('key', ['front', 'sweep'])
def test_dynn_points_come_from_the_front_else_the_sweep(key, tmp_path):
    point = {'threshold': 0.5, 'accuracy': 91.0, 'expected_gflops': 0.1}
    path = tmp_path / 'results.json'
    path.write_text(json.dumps({key: [point], **({'sweep': [{**point, 'threshold': 0.9}]} if key == 'front' else {})}))
    assert read_points(path)[1] == [point]


def test_results_without_thresholds_say_to_evaluate_anew(tmp_path):
    path = tmp_path / 'results.json'
    path.write_text(json.dumps({'sweep': []}))
    with pytest.raises(pareto.GFNetDynnError, match='has no front or sweep of thresholds; delete it'):
        read_points(path)


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


def test_exits_train_with_their_familys_recipe_and_evaluate_with_the_budget_and_rule(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(pareto, '_run_main_dynn', lambda command, what: commands.append(command))
    args = get_args_parser().parse_args(['--data-set', 'DEMO', '--output-dir', str(tmp_path), '--budget', 'acc-drop=2'])
    results = train_exits('resnet18', 43, tmp_path / 'backbone.pth', args)
    train, evaluate = commands
    assert train[:4] == ['--stage', 'dynn', '--config', str(pareto.RECIPES / 'small_data_cnn.yaml')]
    exits_dir = tmp_path / 'seed43' / 'exits_resnet18'
    assert ' '.join(train[4:]) == (f"--data-set DEMO --checkpoint-path {tmp_path / 'backbone.pth'} --batch 64 "
                                   f"--ce_ic_tradeoff 0.75 --seed 43 --output-dir {exits_dir}")
    best = tmp_path / 'seed43' / 'exits_resnet18' / 'checkpoint' / 'checkpoint_DEMO_resnet18_0.75_confEE' / 'best.pth'
    assert evaluate == ['--eval', '--data-set', 'DEMO', '--checkpoint-path', str(best), '--budget', 'acc-drop=2',
                        '--risk-control', 'crc']
    assert results == best.parent / 'results.json'
    assert pareto.exit_recipe('deit_tiny_patch16_224', args) == pareto.exit_recipe('GFNet-ti-dynn', args) == str(
        pareto.RECIPES / 'small_data.yaml')


def test_an_earlier_eval_is_reused_only_when_it_chose_with_the_same_budget_and_rule(tmp_path):
    args = get_args_parser().parse_args([])
    results = tmp_path / 'results.json'
    assert not pareto._chose_as_asked(results, args)  # none yet
    results.write_text(json.dumps({'selection': {'budget': 'acc-drop=1', 'risk_control': 'crc'}}))
    assert pareto._chose_as_asked(results, args)
    results.write_text(json.dumps({'selection': {'budget': 'acc-drop=1', 'risk_control': 'none'}}))
    assert not pareto._chose_as_asked(results, args)


def test_every_model_runs_with_the_first_seed_and_the_seeded_ones_with_all():
    args = get_args_parser().parse_args(['--archs', 'resnet18', 'resnet50', '--seeds', '1', '2', '3',
                                         '--seeded-archs', 'resnet50'])
    assert pareto.planned_runs(args) == [('resnet18', 1), ('resnet50', 1), ('resnet50', 2), ('resnet50', 3)]


def test_goal_sets_each_choice_against_its_own_static_model():
    rows = [{**_point('resnet18', 97.0, 12.0, 0.6), 'arch': 'resnet18', 'seed': 1},
            {**_point('resnet18', 96.0, 12.0, 0.6), 'arch': 'resnet18', 'seed': 2},
            {**_point('convnext_atto', 95.0, 10.0, 0.5), 'arch': 'convnext_atto', 'seed': 1},
            _point('resnet18 + exits t=0.2', 96.5, 8.0, 0.3, 'resnet18 + exits')]
    results = {'selection': {'threshold': 0.2, 'accuracy': 96.5, 'expected_gflops': 0.3, 'budget': 'acc-drop=1',
                             'set': 'calibration'}, 'full_gflops': 0.6, 'oracle': {'flops_saving': 0.8}}
    met = pareto.goal_row('resnet18', 1, results, 8.0, rows)
    assert met['speedup'] == 12.0 / 8.0 and met['accuracy_drop'] == 0.5 and met['met']
    assert met['flops_saving'] == 0.5 and met['oracle_flops_saving'] == 0.8
    slow = pareto.goal_row('resnet18', 1, results, 9.5, rows)  # 1.26x: too little
    lossy = pareto.goal_row('resnet18', 1, {**results, 'selection': {**results['selection'], 'accuracy': 95.5}}, 8.0,
                            rows)  # 1.5 points lost
    assert not slow['met'] and not lossy['met']
    second = pareto.goal_row('resnet18', 2, results, 6.0, rows)  # against seed 2's static model: 2x, -0.5 points
    assert second['speedup'] == 2.0 and second['accuracy_drop'] == -0.5 and second['met']
    for cost in ('latency_ms', 'gflops'):
        front = pareto_front(rows, cost)
        for i, row in enumerate(rows):
            row[f'on_{cost}_front'] = i in front
    lines = pareto.goal_summary([met, second], rows)
    assert lines[0] == ('resnet18 + exits at its choice vs static, 2 seeds: 1.75x ± 0.35, +0.00 ± 0.71 points lost '
                        '(static 96.50%): met on the mean, in 2 of 2 (goal >= 1.3x, <= 1 point)')
    assert lines[1] == ('most accurate early-exit point: resnet18 + exits t=0.2 (96.50% at 8.00 ms): on the latency '
                        'front against every static model')
    assert pareto.by_model([slow])[0]['met_on_mean'] is False


def test_every_model_holds_out_the_calibration_share_with_its_seed(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(pareto, '_run_main_dynn', lambda command, what: commands.append(command))
    args = get_args_parser().parse_args(['--data-set', 'DIGITS', '--output-dir', str(tmp_path)])
    pareto.train_baseline('GFNet-ti-dynn', 44, args)
    pareto.train_baseline('resnet50', 42, args)
    gfnet, resnet = commands
    assert gfnet[gfnet.index('--patch-size') + 1] == '4' and '--patch-size' not in resnet  # 32 px / 8
    for command, seed in ((gfnet, '44'), (resnet, '42')):
        assert command[command.index('--calib-ratio') + 1] == '0.2' and command[command.index('--seed') + 1] == seed
        assert command[command.index('--output-dir') + 1] == str(tmp_path / f'seed{seed}')


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


@pytest.mark.parametrize('flags, message', [
    (['--archs', 'resnet18', 'no_such_model'], '--arch no_such_model is neither a GFNet variant'),
    (['--archs', 'vgg11'], '--arch vgg11: early exits run on the GFNet variants'),
    (['--cnn-exit-config', 'missing.yaml'], '--cnn-exit-config missing.yaml is not a file')])
def test_a_plan_that_cannot_run_is_one_line_before_anything_trains(flags, message, tmp_path, monkeypatch, capsys):
    commands = []
    monkeypatch.setattr(pareto, '_run_main_dynn', lambda command, what: commands.append(command))
    line = one_error(capsys, ['--output-dir', str(tmp_path), '--train-only', *flags], pareto.main)
    assert message in line and not commands and not list(tmp_path.iterdir())
