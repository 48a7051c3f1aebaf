"""The exit cache and what is derived from it (exit rules, sweep, cheapest point, gate rebalancing), and the
conformal sets."""
import math

import pytest
import torch
from torch.testing import assert_close

from evaluation.conformal import conformal_quantile, conformal_thresholds, prediction_set_stats
from evaluation.eval_report import conformal_report
from evaluation.exit_cache import (ExitCache, best_exit_counts, conditional_exit_choice, exit_choice, exit_point,
                                   gated_predictions, per_exit_accuracy, threshold_sweep, updated_pos_weight)
from evaluation.operating_points import Budget, choose
from models.exit_rule import best_exit, per_exit_cross_entropy

THRESHOLDS = [0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9]
GFLOPS = [0.11, 0.23, 0.37, 0.52]


def _random_cache(num_exits: int = 4, n: int = 60, num_classes: int = 5, seed: int = 0) -> ExitCache:
    """Random logits and gate probabilities, some of them exactly on a threshold (0.25, 0.5, 0.75)."""
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, num_classes, (n,), generator=generator)
    logits = torch.randn(num_exits, n, num_classes, generator=generator)
    logits[:, :, 0] += torch.linspace(0, 3, num_exits).view(-1, 1)  # later exits lean to class 0: varied accuracy
    gate_probs = torch.rand(num_exits - 1, n, generator=generator)
    ties = torch.rand(num_exits - 1, n, generator=generator) < 0.2
    gate_probs[ties] = torch.tensor([0.25, 0.5, 0.75])[torch.randint(0, 3, (int(ties.sum()),), generator=generator)]
    return ExitCache(logits, gate_probs, targets)


def _brute_force_point(cache: ExitCache, threshold: float, gflops: list[float]) -> dict:
    """One threshold, sample by sample: leave at the first gate with prob >= threshold, else the final head."""
    num_gates, n = cache.gate_probs.shape
    counts, hits = [0] * (num_gates + 1), [0] * (num_gates + 1)
    for i in range(n):
        chosen = next((k for k in range(num_gates) if cache.gate_probs[k, i] >= threshold), num_gates)
        correct = int(cache.logits[chosen, i].argmax()) == int(cache.targets[i])
        counts[chosen] += 1
        hits[chosen] += correct
    shares = [c / n for c in counts]
    return {'accuracy': 100 * sum(hits) / n, 'exit_share': shares,
            'exit_accuracy': [100 * h / c if c else 0.0 for h, c in zip(hits, counts)],
            'expected_gflops': sum(s * g for s, g in zip(shares, gflops))}


# exit rule

def test_exit_choice_picks_the_first_exit_at_or_above_the_threshold():
    gate_probs = torch.tensor([[0.1, 0.5, 0.9, 0.1],
                               [0.6, 0.9, 0.1, 0.2],
                               [0.9, 0.1, 0.1, 0.3]])  # (G=3, N=4)
    assert exit_choice(gate_probs, 0.5).tolist() == [1, 0, 0, 3]  # 0.5 >= 0.5 leaves; none fires -> final (3)
    assert exit_choice(gate_probs, 0.95).tolist() == [3, 3, 3, 3]
    assert exit_choice(gate_probs, 0.0).tolist() == [0, 0, 0, 0]


def test_gated_predictions_take_the_chosen_exits_argmax():
    cache = _random_cache()
    predictions, chosen = gated_predictions(cache, 0.5)
    expected = torch.stack([cache.logits[k, i].argmax() for i, k in enumerate(chosen.tolist())])
    assert torch.equal(predictions, expected)


def test_per_exit_accuracy_is_each_exit_alone():
    cache = _random_cache()
    expected = [100 * sum(int(cache.logits[k, i].argmax()) == int(cache.targets[i])
                          for i in range(cache.targets.numel())) / cache.targets.numel() for k in range(4)]
    assert_close(torch.tensor(per_exit_accuracy(cache)), torch.tensor(expected))


def test_cached_sweep_equals_brute_force_per_threshold_evaluation():
    cache = _random_cache()
    sweep = threshold_sweep(cache, THRESHOLDS, GFLOPS)
    assert [point['threshold'] for point in sweep] == THRESHOLDS
    for point, threshold in zip(sweep, THRESHOLDS):
        expected = _brute_force_point(cache, threshold, GFLOPS)
        assert point['accuracy'] == pytest.approx(expected['accuracy'], abs=1e-4), threshold
        assert point['expected_gflops'] == pytest.approx(expected['expected_gflops'], abs=1e-6), threshold
        assert point['exit_share'] == pytest.approx(expected['exit_share'], abs=1e-6), threshold
        assert point['exit_accuracy'] == pytest.approx(expected['exit_accuracy'], abs=1e-4), threshold
        assert sum(point['exit_share']) == pytest.approx(1.0)


def test_sweep_spends_fewer_gflops_as_the_threshold_rises_to_the_final_head():
    sweep = threshold_sweep(_random_cache(), [0.0, 0.5, 1.01], GFLOPS)
    assert sweep[0]['exit_share'][0] == pytest.approx(1.0)  # everything leaves at exit 0
    assert sweep[-1]['exit_share'][-1] == pytest.approx(1.0)  # nothing fires: all at the final head
    assert sweep[0]['expected_gflops'] == pytest.approx(GFLOPS[0])
    assert sweep[-1]['expected_gflops'] == pytest.approx(GFLOPS[-1])


# choosing a threshold

def test_acc_drop_budget_picks_the_cheapest_point_within_one_point_of_full_accuracy():
    sweep = [{'threshold': 0.2, 'accuracy': 80.0, 'expected_gflops': 0.1},
             {'threshold': 0.4, 'accuracy': 89.2, 'expected_gflops': 0.3},  # within 1 of 90 and cheapest
             {'threshold': 0.6, 'accuracy': 90.5, 'expected_gflops': 0.4},
             {'threshold': 0.8, 'accuracy': 88.9, 'expected_gflops': 0.2}]  # 1.1 below: out
    assert choose(sweep, Budget('acc-drop', 1.0), 90.0)['threshold'] == 0.4
    assert choose(sweep, Budget('acc-drop', 1.2), 90.0)['threshold'] == 0.8


def test_acc_drop_budget_falls_back_to_the_most_accurate_point():
    sweep = [{'threshold': 0.2, 'accuracy': 50.0, 'expected_gflops': 0.1},
             {'threshold': 0.5, 'accuracy': 70.0, 'expected_gflops': 0.3}]
    assert choose(sweep, Budget('acc-drop', 1.0), 95.0)['threshold'] == 0.5


# rebalancing the gates

def test_updated_pos_weight_follows_the_formula_with_floor_and_cap():
    # n = 20; c = 5, 8, 2 for the gates: 15/5 = 3, 12/8 = 1.5, 18/2 = 9 -> capped at 5
    assert_close(updated_pos_weight(torch.tensor([5, 8, 2, 5])), torch.tensor([3.0, 1.5, 5.0]))
    # c = 0 uses the 0.1 floor: 20 / 0.1 = 200, capped; a larger cap shows the floor
    assert_close(updated_pos_weight(torch.tensor([0, 10, 10])), torch.tensor([5.0, 1.0]))
    assert_close(updated_pos_weight(torch.tensor([0, 10, 10]), max_weight=1000.0), torch.tensor([200.0, 1.0]))


def test_best_exit_counts_count_the_argmin_of_error_plus_lambda_cost():
    cache = _random_cache()
    costs = torch.tensor([0.3, 0.5, 0.7, 1.0])
    counts = best_exit_counts(cache, costs, 0.75)
    best = best_exit(per_exit_cross_entropy(cache.logits, cache.targets), costs, 0.75)
    assert counts.tolist() == [int((best == k).sum()) for k in range(4)]
    assert int(counts.sum()) == cache.targets.numel()


# the training-time exit rule (picks best.pth)

def _reference_gating(gate_probs: torch.Tensor) -> list[int]:
    """Sample by sample, as the reference's classifier helper does: masses P_k from the running sum of g, then
    a_k = clip(P_k / prod_{j<k}(1 - a_j), 0, 1); leave at the first a_k >= 0.5."""
    num_gates, n = gate_probs.shape
    chosen = []
    for i in range(n):
        summed_g, not_left, exit_at = 0.0, 1.0, num_gates
        for k in range(num_gates):
            g = float(gate_probs[k, i])
            mass = max(0.0, min(g, 1.0 - summed_g))
            summed_g += g
            a = min(1.0, max(0.0, mass / not_left)) if not_left > 0 else 1.0
            if a >= 0.5 and exit_at == num_gates:
                exit_at = k
            not_left *= 1 - a
        chosen.append(exit_at)
    return chosen


def test_conditional_exit_choice_equals_a_sample_by_sample_transcription_of_the_reference():
    generator = torch.Generator().manual_seed(3)
    gate_probs = torch.rand(4, 500, generator=generator) ** 2  # many small gates, so later exits get picked
    gate_probs[:, :20] = torch.tensor([0.3, 0.3, 0.3, 0.3]).view(4, 1)  # 0.3, then 0.3/0.7, then 0.3/0.4
    assert conditional_exit_choice(gate_probs).tolist() == _reference_gating(gate_probs)
    assert conditional_exit_choice(gate_probs)[:20].tolist() == [2] * 20


def test_conditional_exit_choice_differs_from_a_plain_threshold_at_one_half():
    gate_probs = torch.tensor([[0.4], [0.3], [0.2]])  # no raw probability reaches 0.5
    assert exit_choice(gate_probs, 0.5).tolist() == [3]
    assert conditional_exit_choice(gate_probs).tolist() == [1]  # a_1 = 0.3 / (1 - 0.4) = 0.5


def test_exit_point_counts_shares_and_accuracies_of_the_chosen_exits():
    cache = _random_cache()
    chosen = conditional_exit_choice(cache.gate_probs)
    point = exit_point(cache, chosen, GFLOPS)
    predictions = cache.logits.argmax(-1)[chosen, torch.arange(cache.targets.numel())]
    assert point['accuracy'] == pytest.approx(100 * (predictions == cache.targets).double().mean().item())
    assert point['exit_share'] == pytest.approx([(chosen == k).double().mean().item() for k in range(4)])


# conformal prediction sets

def test_conformal_quantile_matches_numpys_higher_method_at_the_conformal_level():
    import numpy as np
    scores = torch.rand(57, generator=torch.Generator().manual_seed(4))
    for alpha in (0.01, 0.03, 0.05, 0.2):
        level = min(1.0, math.ceil(58 * (1 - alpha)) / 57)
        assert conformal_quantile(scores, alpha) == pytest.approx(float(np.quantile(scores.numpy(), level,
                                                                                   method='higher')))
    assert conformal_quantile(torch.empty(0), 0.02) == pytest.approx(0.98)  # nobody left there: 1 - alpha


def test_conformal_per_exit_qhat_falls_back_to_all_samples_below_21_leavers():
    cache = _random_cache(num_exits=3, n=200, seed=1)
    chosen = torch.full((200,), 2)
    chosen[:21] = 0  # 21 samples left at exit 0: its own qhat; exit 1 (none): the all-samples qhat
    thresholds = conformal_thresholds(cache, chosen, [0.05])
    scores = 1 - cache.logits.softmax(-1).gather(2, cache.targets.view(1, -1, 1).expand(3, -1, 1)).squeeze(2)
    assert thresholds['gated'][0][0] == pytest.approx(conformal_quantile(scores[0, :21], 0.05))
    assert thresholds['gated'][0][1] == pytest.approx(conformal_quantile(scores[1], 0.05))
    assert thresholds['gated'][0][2] == pytest.approx(conformal_quantile(scores[2, 21:], 0.05))
    gated_scores = torch.cat([scores[0, :21], scores[2, 21:]])
    assert thresholds['general'][0] == pytest.approx(conformal_quantile(gated_scores, 0.05))


def test_conformal_coverage_on_the_calibration_set_reaches_one_minus_alpha():
    cache = _random_cache(num_exits=3, n=200, seed=1)
    chosen = conditional_exit_choice(cache.gate_probs)
    alphas = (0.01, 0.05, 0.1, 0.2, 0.5)
    stats = prediction_set_stats(cache, chosen, conformal_thresholds(cache, chosen, alphas))
    assert [row['alpha'] for row in stats['overall']] == list(alphas)
    for row in stats['overall']:
        for kind in ('general', 'all', 'strict'):
            assert row[kind]['coverage'] >= 100 * (1 - row['alpha']) - 1e-9, (kind, row)
    assert len(stats['per_exit']) == 3 * len(alphas)


def test_conformal_sets_shrink_as_alpha_grows():
    cache = _random_cache(num_exits=3, n=200, seed=1)
    chosen = conditional_exit_choice(cache.gate_probs)
    stats = prediction_set_stats(cache, chosen, conformal_thresholds(cache, chosen, (0.01, 0.05, 0.1, 0.2, 0.5)))
    sizes = [row['general']['mean_set_size'] for row in stats['overall']]
    assert all(later <= earlier for earlier, later in zip(sizes, sizes[1:])), sizes
    assert sizes[-1] < sizes[0]


def _subset(cache: ExitCache, index: torch.Tensor) -> ExitCache:
    return ExitCache(cache.logits[:, index], cache.gate_probs[:, index], cache.targets[index])


def test_conformal_coverage_holds_out_of_sample_over_random_resplits():
    """Fit on one half, measure on the other: over many re-splits the mean coverage is at least 1 - alpha
    (split conformal's guarantee, the exit choice being each sample's own), while a single split may miss."""
    cache = _random_cache(num_exits=3, n=400, seed=2)
    generator = torch.Generator().manual_seed(0)
    alphas, coverages = (0.02, 0.05), {0.02: [], 0.05: []}  # two of the reference's alphas
    for _ in range(300):
        order = torch.randperm(400, generator=generator)
        calibration, held_out = _subset(cache, order[:200]), _subset(cache, order[200:])
        report = conformal_report(held_out, None, calibration)
        assert report.in_sample is False
        for row in report.overall:
            if row['alpha'] in alphas:
                coverages[row['alpha']].append(row['general']['coverage'])
    for alpha in alphas:
        mean = sum(coverages[alpha]) / len(coverages[alpha])
        assert mean >= 100 * (1 - alpha) - 0.5, (alpha, mean)
        assert min(coverages[alpha]) < 100 * (1 - alpha)  # out of sample, single splits do miss: not by construction


def test_conformal_report_says_when_its_coverage_is_in_sample():
    cache = _random_cache(num_exits=3, n=100, seed=3)
    stored = conformal_thresholds(cache, conditional_exit_choice(cache.gate_probs))
    in_sample = conformal_report(cache, stored)
    assert in_sample.in_sample is True and in_sample.thresholds == stored
    held_out = conformal_report(_subset(cache, torch.arange(50)), stored, _subset(cache, torch.arange(50, 100)))
    assert held_out.in_sample is False and held_out.thresholds != stored  # refit on the calibration images
    assert '50 calibration images' in held_out.calibrated_on
    assert conformal_report(cache, None) is None
