"""Evaluation users can trust: every operating point and their front, budgets, the no-training baselines,
held-out calibration images, and --eval's selection with predicted and measured latency."""
import json
import math

import pytest
import torch

from conftest import FAST_FLAGS, TINY_FLAGS, one_error, train_calibrated_dynn, write_learnable_folder
from data_loader_help import SplitRequest, build_datasets
from errors import GFNetDynnError
from evaluation.exit_cache import ExitCache, exit_choice, exit_point
from evaluation.operating_points import (Budget, all_points, choose, distinct_thresholds, exit_scores, parse_budget,
                                         pareto_front, point_table, single_exit_points)
from main_dynn import main

GFLOPS = [0.11, 0.23, 0.37, 0.52]
LATENCY = [1.0, 2.5, 3.0, 4.5]


def _cache(n: int = 80, num_classes: int = 5, seed: int = 0) -> ExitCache:
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, num_classes, (n,), generator=generator)
    logits = torch.randn(4, n, num_classes, generator=generator)
    logits[:, torch.arange(n), targets] += torch.linspace(0.2, 2.5, 4).view(-1, 1)  # later exits: more accurate
    gate_probs = torch.rand(3, n, generator=generator)
    gate_probs[0, :10] = 0.5  # ties
    return ExitCache(logits, gate_probs, targets)


def _sweep(cache: ExitCache, thresholds: list[float]) -> list[dict]:
    """Sample by sample with exit_cache's own rule (the one the engine's tests check), one threshold at a time."""
    return [{'threshold': t, **exit_point(cache, exit_choice(cache.gate_probs, t), GFLOPS)} for t in thresholds]


def _dominated(point: dict, others: list[dict]) -> bool:
    return any(o['expected_gflops'] <= point['expected_gflops'] and o['accuracy'] >= point['accuracy']
               and (o['expected_gflops'], o['accuracy']) != (point['expected_gflops'], point['accuracy'])
               for o in others)


def test_front_equals_a_brute_force_sweep_over_every_threshold():
    cache = _cache()
    values = sorted(set(cache.gate_probs.flatten().tolist()))
    grid = [0.0, 1.5] + values + [(a + b) / 2 for a, b in zip(values, values[1:])]  # every point and between
    brute = _sweep(cache, grid)
    expected = {(round(p['expected_gflops'], 9), round(p['accuracy'], 9)) for p in brute if not _dominated(p, brute)}
    front = pareto_front(all_points(cache, 'gate', GFLOPS))
    assert {(round(p['expected_gflops'], 9), round(p['accuracy'], 9)) for p in front} == expected
    gflops = [p['expected_gflops'] for p in front]
    assert gflops == sorted(gflops) and [p['accuracy'] for p in front] == sorted(p['accuracy'] for p in front)


def test_every_point_matches_the_sample_by_sample_sweep_at_its_threshold():
    cache = _cache(n=30)
    points = all_points(cache, 'gate', GFLOPS, LATENCY)
    brute = _sweep(cache, [p['threshold'] for p in points])
    for point, check in zip(points, brute):
        assert point['accuracy'] == pytest.approx(check['accuracy'])
        assert point['exit_share'] == pytest.approx(check['exit_share'])
        assert point['expected_latency_ms'] == pytest.approx(sum(s * m for s, m in zip(point['exit_share'], LATENCY)))
    assert points[0]['exit_share'][-1] == 1.0  # just above every score: all at the final head
    assert points[-1]['exit_share'][0] == 1.0  # at the smallest score every first gate fires


def test_distinct_thresholds_start_above_the_largest_score():
    scores = torch.tensor([[0.2, 0.9], [0.9, 1.0]], dtype=torch.float64)
    thresholds = distinct_thresholds(scores)
    assert thresholds[0] > 1.0 and thresholds[0].float() > 1.0
    assert thresholds[1:].tolist() == [1.0, 0.9, 0.2]


@pytest.mark.parametrize('text,expected', [('acc-drop=1.0', Budget('acc-drop', 1.0)),
                                           ('gflops=0.3', Budget('gflops', 0.3)),
                                           ('latency-ms=2', Budget('latency-ms', 2.0))])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize('text', ['gflops', 'speed=3', 'gflops=-1', 'gflops=nan', 'acc-drop=x'])
def test_parse_budget_rejects_bad_forms(text):
    with pytest.raises(ValueError, match='acc-drop=POINTS'):
        parse_budget(text)


def test_budgets_pick_the_best_point_within_them():
    cache = _cache()
    points = all_points(cache, 'gate', GFLOPS, LATENCY)
    full = points[0]['accuracy']
    for budget, key in ((Budget('gflops', 0.3), 'expected_gflops'), (Budget('latency-ms', 2.0), 'expected_latency_ms')):
        chosen = choose(points, budget, full)
        within = [p for p in points if p[key] <= budget.value]
        assert chosen[key] <= budget.value
        assert chosen['accuracy'] == max(p['accuracy'] for p in within)
    chosen = choose(points, Budget('acc-drop', 2.0), full)
    within = [p for p in points if p['accuracy'] >= full - 2.0]
    assert chosen['accuracy'] >= full - 2.0
    assert chosen['expected_gflops'] == min(p['expected_gflops'] for p in within)


def test_a_budget_below_the_cheapest_point_is_an_error_naming_it():
    points = all_points(_cache(), 'gate', GFLOPS, LATENCY)
    with pytest.raises(GFNetDynnError, match='0.11 GFLOPs'):
        choose(points, Budget('gflops', 0.05), 90.0)


def test_baseline_scores_by_hand():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [10.0, 0.0, 0.0]], [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
    cache = ExitCache(logits, torch.zeros(1, 2), torch.tensor([0, 0]))
    max_prob = exit_scores(cache, 'max_prob')
    assert max_prob[0, 0].item() == pytest.approx(1 / 3)
    assert max_prob[0, 1].item() == pytest.approx(math.exp(10) / (math.exp(10) + 2))
    entropy = exit_scores(cache, 'entropy')
    assert entropy[0, 0].item() == pytest.approx(0.0, abs=1e-12)  # uniform: no confidence
    assert entropy[0, 1].item() == pytest.approx(1.0, abs=1e-3)  # near one-hot


def test_single_exit_points_are_each_exit_alone():
    cache = _cache()
    points = single_exit_points(cache, GFLOPS, LATENCY)
    correct = cache.logits.argmax(-1) == cache.targets
    assert [p['accuracy'] for p in points] == pytest.approx((100 * correct.double().mean(1)).tolist())
    assert [p['expected_gflops'] for p in points] == GFLOPS and [p['expected_latency_ms'] for p in points] == LATENCY


# --- held-out calibration images -----------------------------------------------------------------------------

def _names(subset) -> set[str]:
    return {subset.dataset.samples[i][0] for i in subset.indices}


@pytest.mark.parametrize('layout', ['folders', 'one folder'])
def test_calibration_images_are_held_out_of_training_and_never_validate(tmp_path, monkeypatch, layout):
    import dataset_config
    root = write_learnable_folder(tmp_path / 'data', train_per_class=10, val_per_class=4, size=16)
    entry = {'num_classes': 3, 'default_input_size': 16, 'train_folder': 'train', 'val_folder': 'val',
             'use_random_split': False, 'default_data_path': str(root)}
    if layout == 'one folder':
        root = root / 'train'
        entry.update(train_folder='', val_folder='')
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', entry)
    data = build_datasets('TINY', root, 16, split=SplitRequest(train_ratio=0.7, calib_ratio=0.2))
    train, val, calib = _names(data.train), (_names(data.val) if layout == 'one folder' else
                                             {p for p, _ in data.val.samples}), _names(data.calib)
    assert calib and not calib & train and not calib & val and not train & val
    assert data.split['num_calib'] == len(calib) and data.split['num_train'] == len(train) + len(calib)
    per_class = [sum(1 for p in calib if f'class{c}' in p) for c in range(3)]
    assert min(per_class) >= 1  # stratified: every class can calibrate
    again = build_datasets('TINY', root, 16, split=SplitRequest.reusing(data.split), need_train=False)
    assert _names(again.calib) == calib and again.train is None  # --eval holds out the same images


@pytest.mark.slow
def test_calibrated_eval_chooses_on_held_out_images_within_a_gflops_budget(small_data, tmp_path, capsys):
    best = train_calibrated_dynn(tmp_path / 'run')
    first = tmp_path / 'first.json'
    assert main([*TINY_FLAGS, '--barely_train', '--eval', '--checkpoint-path', str(best), '--results-json',
                 str(first)]) == 0
    gflops = json.loads(first.read_text())['gflops_per_exit']
    budget = (gflops[0] + gflops[-1]) / 2
    capsys.readouterr()
    results_path = tmp_path / 'results.json'
    assert main([*TINY_FLAGS, '--barely_train', '--eval', '--checkpoint-path', str(best), '--results-json',
                 str(results_path), '--budget', f'gflops={budget}']) == 0
    printed = capsys.readouterr().out
    results = json.loads(results_path.read_text())
    selection = results['selection']
    assert selection['set'] == 'calibration' and selection['num_images'] == 3  # 1 of each class's 4
    assert selection['budget'] == f'gflops={budget:g}'
    assert selection['on_selection_set']['expected_gflops'] <= budget
    assert selection['expected_latency_ms'] > 0 and selection['measured_latency_ms'] > 0
    real = results['real_early_exit']
    assert real['predicted_mean_ms'] > 0 and real['mismatches_with_cache'] == 0
    assert len(results['latency_table_ms']['cumulative']) == 3
    assert results['front'] and set(results['baselines']) == {'max_prob', 'entropy', 'single_exit'}
    assert results['versus_baselines']['winner']
    assert 'chosen on the 3 calibration images' in printed and 'validation images it is reported on' not in printed
    assert 'learned gates vs' in printed
    conformal = results['conformal']  # fit on the held-out images, measured on the validation ones
    assert conformal['in_sample'] is False and '3 calibration images' in conformal['calibrated_on']
    assert conformal['reported_on'] == 'validation images' and 'in-sample' not in printed
    assert conformal['overall'][0]['general']['samples'] == results['num_val']

    from benchmarks.tradeoff import main as tradeoff
    assert tradeoff([str(best), str(best), '--data-set', 'TINY', '--json', str(tmp_path / 'fronts.json')]) == 0
    fronts = json.loads((tmp_path / 'fronts.json').read_text())['checkpoints']
    assert len(fronts) == 2 and fronts[0]['front'] == fronts[1]['front'] and fronts[0]['tradeoff'] == 0.75
    assert [(p['expected_gflops'], p['accuracy']) for p in fronts[0]['front']] == \
        [(p['expected_gflops'], p['accuracy']) for p in results['front']]  # the same images, the same front
    assert (tmp_path / 'fronts.png').read_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_calib_ratio_cannot_change_after_the_backbone(small_data, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main(['--stage', 'backbone', *FAST_FLAGS, '--output-dir', str(out)]) == 0
    backbone = out / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'best.pth'
    line = one_error(capsys, [*FAST_FLAGS, '--checkpoint-path', str(backbone), '--calib-ratio', '0.2',
                              '--output-dir', str(out)])
    assert '--calib-ratio 0.2 differs' in line


def test_bad_budget_is_one_line(capsys):
    line = one_error(capsys, ['--eval', '--checkpoint-path', 'x.pth', '--budget', 'speed=3'])
    assert line.startswith("error: argument --budget: 'speed=3' is not a budget: use acc-drop=POINTS")
    assert line.count('--budget') == 1  # the flag is named once, by argparse


def test_a_given_threshold_decides_in_float32_as_the_engine_does():
    # float32(0.7) = 0.69999999: the engine compares float32 probabilities with float32(0.7), so this gate fires
    cache = ExitCache(torch.zeros(2, 1, 3), torch.tensor([[0.7]], dtype=torch.float32), torch.tensor([0]))
    point = point_table(cache, exit_scores(cache, 'gate'), torch.tensor([0.7], dtype=torch.float64), [0.1, 0.2])[0]
    assert int(exit_choice(cache.gate_probs, 0.7)[0]) == 0
    assert point['exit_share'] == [1.0, 0.0]
