"""Risk-controlled thresholds: the CRC and LTT rules against hand computations, their guarantees on synthetic
scores with a known risk curve, and --eval --risk-control end to end."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.risk import SLOPE, chosen_thresholds, synthetic_draw
from conftest import TINY_FLAGS, one_error, train_calibrated_dynn
from evaluation.eval_report import baselines_report, pick_threshold, points_by_rule, risk_fields, risk_line
from evaluation.exit_cache import ExitCache, exit_choice
from evaluation.operating_points import parse_budget
from evaluation.risk_control import (GUARANTEES, LTT_GRID, RiskControl, ThresholdScan, crc_needed_images,
                                     hoeffding_bentkus_pvalue, ltt_needed_images, scan, select)
from main_dynn import main


def _scan(loss: list[int], n: int, running_max: list[int] | None = None, drop: list[int] | None = None):
    thresholds = torch.linspace(1.0, 0.0, len(loss), dtype=torch.float64)
    return ThresholdScan(thresholds, n, np.array(loss), np.array(running_max if running_max is not None else loss),
                         np.array(drop if drop is not None else loss))


# CRC: the cheapest threshold whose running-maximum risk is at most ((n + 1) alpha - 1) / n

def test_crc_takes_the_last_threshold_within_the_adjusted_level():
    # n 9, alpha 0.2: ((10 * 0.2) - 1) / 9 = 1/9, so at most 1 of the 9 images may lose
    picked = select(_scan([0, 0, 1, 1, 2, 5], 9), 'crc', 0.2, 0.1)
    assert (picked.index, picked.certified, picked.needed_images) == (3, True, None)


def test_crc_certifies_every_threshold_when_all_pass():
    picked = select(_scan([0, 1, 2, 3, 4], 10), 'crc', 0.5, 0.1)  # (11 * 0.5 - 1) / 10 = 0.45: 4 of 10 pass
    assert picked.index == 4 and picked.certified


def test_crc_scans_the_running_maximum_not_the_raw_loss():
    # raw losses fall back to 0 after 2 images, their running maximum does not: (11 * 0.2 - 1) / 10 = 0.12
    picked = select(_scan([0, 2, 0, 0], 10, running_max=[0, 2, 2, 2]), 'crc', 0.2, 0.1)
    assert picked.index == 0 and picked.certified


def test_crc_with_too_few_images_keeps_the_final_exit_and_says_how_many_it_needs():
    # n 3, alpha 0.2: (4 * 0.2 - 1) / 3 < 0 even at zero loss; n 4 gives (5 * 0.2 - 1) / 4 = 0
    picked = select(_scan([0, 0, 0], 3), 'crc', 0.2, 0.1)
    assert (picked.index, picked.certified, picked.needed_images) == (0, False, 4)
    assert crc_needed_images(0.01) == 99 and crc_needed_images(0.05) == 19


# LTT: Hoeffding-Bentkus p-values, fixed-sequence testing from the conservative end

def _binomial_cdf(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))


def test_hoeffding_bentkus_pvalue_matches_a_hand_computation():
    n, alpha = 100, 0.05
    expected = []
    for k in (0, 1, 2, 5, 7):
        r = min(k / n, alpha)
        h1 = (r * math.log(r / alpha) if r > 0 else 0.0) + (1 - r) * math.log((1 - r) / (1 - alpha))
        expected.append(min(math.exp(-n * h1), math.e * _binomial_cdf(k, n, alpha)))
    got = hoeffding_bentkus_pvalue(np.array([0, 1, 2, 5, 7]), n, alpha)
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert got[0] == pytest.approx(0.95 ** 100) and got[3] == pytest.approx(1.0)  # at alpha: no evidence


def test_ltt_stops_at_the_first_threshold_it_cannot_reject():
    # n 100, alpha 0.05, delta 0.1: p(0 losses) 0.006, p(1) 0.084, p(2) 0.297; the later 0 is never tested
    picked = select(_scan([0, 0, 1, 2, 0, 0], 100), 'ltt', 0.05, 0.1)
    assert (picked.index, picked.certified) == (2, True)


def test_ltt_certifies_every_threshold_when_all_are_rejected():
    picked = select(_scan([0, 1, 3, 5], 100), 'ltt', 0.5, 0.1)
    assert picked.index == 3 and picked.certified


def test_ltt_with_too_few_images_keeps_the_final_exit_and_says_how_many_it_needs():
    # 0.95^20 = 0.36 > 0.1; 0.95^45 = 0.0994 <= 0.1 < 0.95^44 = 0.105
    picked = select(_scan([0, 0, 0], 20), 'ltt', 0.05, 0.1)
    assert (picked.index, picked.certified, picked.needed_images) == (0, False, 45)
    assert ltt_needed_images(0.01, 0.1) == 230


def test_empirical_rule_takes_the_last_threshold_within_the_accuracy_drop():
    picked = select(_scan([0, 1, 2, 3], 10, drop=[0, 1, 0, 2]), 'none', 0.1, 0.1)
    assert picked.index == 2 and not picked.certified


# The scan: per-image losses at every threshold, checked against the exit rule sample by sample

def test_scan_counts_losses_and_their_running_maximum_as_the_exit_rule_does():
    generator = torch.Generator().manual_seed(0)
    predictions = torch.randint(0, 3, (3, 40), generator=generator)
    targets = torch.randint(0, 3, (40,), generator=generator)
    scores = torch.rand(2, 40, generator=generator)
    thresholds = torch.cat([torch.tensor([1.5]), scores.flatten().double().unique().flip(0)])
    for loss in ('error', 'consistency'):
        result = scan(predictions, targets, scores, thresholds, loss)
        seen = torch.zeros(40, dtype=torch.bool)
        for t, threshold in enumerate(thresholds.tolist()):
            exits = exit_choice(scores, threshold)
            early = predictions.gather(0, exits.unsqueeze(0)).squeeze(0)
            lost = (early != predictions[-1] if loss == 'consistency'
                    else (early != targets) & (predictions[-1] == targets))
            seen |= lost
            assert result.loss[t] == int(lost.sum()) and result.running_max[t] == int(seen.sum())
            assert result.accuracy_drop[t] == int((early != targets).sum() - (predictions[-1] != targets).sum())
        assert result.loss[0] == 0 and (np.diff(result.running_max) >= 0).all()
    assert (result.loss != result.running_max).any()  # the losses here are not monotone: the test can tell


# The guarantees, on synthetic scores whose risk at threshold t is SLOPE (1 - t)^2 / 2

def test_crc_and_ltt_keep_their_guarantees_where_the_empirical_rule_does_not():
    alpha, delta, n, draws = 0.05, 0.1, 200, 500
    rng = np.random.default_rng(0)
    risks = {'none': [], 'crc': [], 'ltt': []}
    for _ in range(draws):
        picks = chosen_thresholds(*synthetic_draw(n, rng), [alpha], delta, 'error')
        for rule in risks:
            threshold = min(max(picks[rule, alpha][0], 0.0), 1.0)
            risks[rule].append(SLOPE * (1 - threshold) ** 2 / 2)  # the true risk of the chosen threshold
    risks = {rule: np.array(values) for rule, values in risks.items()}
    assert risks['crc'].mean() <= alpha + 0.003
    assert (risks['ltt'] > alpha).mean() <= delta + 0.03
    assert (risks['none'] > alpha).mean() >= delta + 0.25  # the empirical rule breaks the budget about half the time
    assert risks['ltt'].mean() < risks['crc'].mean() < risks['none'].mean()  # what each guarantee costs


# The command line

def test_risk_control_flags_outside_an_accuracy_drop_budget_are_one_line_errors(capsys):
    line = one_error(capsys, ['--eval', '--checkpoint-path', 'x.pth', '--budget', 'gflops=0.3',
                              '--risk-control', 'crc'])
    assert '--budget acc-drop=P' in line
    line = one_error(capsys, ['--eval', '--checkpoint-path', 'x.pth', '--delta', '0.05'])
    assert '--delta' in line and 'ltt' in line
    line = one_error(capsys, ['--eval', '--checkpoint-path', 'x.pth', '--risk-control', 'ltt', '--delta', '1'])
    assert '--delta must lie in (0, 1)' in line
    line = one_error(capsys, ['--eval', '--checkpoint-path', 'x.pth', '--risk-control', 'crc',
                              '--exit-threshold', '0.5'])
    assert '--exit-threshold' in line
    line = one_error(capsys, ['--stage', 'backbone', '--risk-control', 'crc'])
    assert '--risk-control has no effect' in line


def test_table_line_says_what_is_promised_and_that_an_in_sample_choice_promises_nothing():
    selection = {'risk_control': 'crc', 'risk_level': 0.02, 'delta': None, 'certified': False, 'needed_images': None,
                 'out_of_sample': False, 'risk_loss': 'consistency', 'calibration_risk': 0.0125, 'val_risk': 0.0125,
                 'num_images': 160, 'set': 'val'}
    line = risk_line(selection)
    assert 'chosen on the validation images themselves: no guarantee' in line
    assert 'consistency loss 0.0125 on the 160 val images' in line
    held_out = {**selection, 'certified': True, 'out_of_sample': True, 'set': 'calibration'}
    assert 'crc: expected loss on a new image <= 0.02, marginal over the calibration images' in risk_line(held_out)
    line = risk_line({**held_out, 'risk_control': 'ltt', 'delta': 0.1})
    assert 'risk (expected loss on new images) <= 0.02 with probability >= 0.9 over the calibration draw;' in line


@pytest.mark.slow
def test_eval_with_ltt_on_held_out_images_writes_what_it_guarantees(small_data, tmp_path, capsys):
    best = train_calibrated_dynn(tmp_path / 'run')
    capsys.readouterr()
    results_path = tmp_path / 'results.json'
    assert main([*TINY_FLAGS, '--barely_train', '--eval', '--checkpoint-path', str(best), '--results-json',
                 str(results_path), '--budget', 'acc-drop=1', '--risk-control', 'ltt']) == 0
    printed = capsys.readouterr().out
    results = json.loads(results_path.read_text())
    selection = results['selection']
    # 3 calibration images cannot certify a 1% loss at delta 0.1 (230 are needed): no early exit, said so
    assert selection['set'] == 'calibration' and selection['num_images'] == 3 and selection['out_of_sample']
    assert selection['risk_control'] == 'ltt' and selection['guarantee'] == GUARANTEES['ltt']
    assert selection['risk_level'] == 0.01 and selection['delta'] == 0.1 and selection['risk_loss'] == 'error'
    assert selection['certified'] is False and selection['needed_images'] == 230 and selection['risk_bound'] == 0.0
    assert selection['calibration_risk'] == 0.0 and selection['val_risk'] == 0.0
    assert results['chosen']['exit_share'][-1] == 1.0  # every image at the final exit
    for rule in ('max_prob', 'entropy'):
        assert results['baselines'][rule]['risk']['needed_images'] == 230
    assert 'nothing certifiable with 3 calibration images' in printed and 'needs at least 230' in printed

    from benchmarks.risk import main as risk_benchmark
    bench = tmp_path / 'risk.json'
    assert risk_benchmark(['--checkpoint', str(best), '--data-set', 'TINY', '--resplits', '20', '--acc-drop', '10',
                           '50', '--json', str(bench)]) == 0
    written = json.loads(bench.read_text())
    assert written['benchmark'] == 'risk' and written['calib_size'] + written['test_size'] == 3 + 6
    assert len(written['rows']) == 3 * 2 * 3  # exit rules x budgets x selection rules
    assert all(0 <= row['exceedance_rate'] <= 1 and row['flops_saved'] <= 1 for row in written['rows'])
    by_rule = {row['rule']: row for row in written['rows']}
    assert by_rule['crc']['promise'] == 'mean_risk <= 0.5' and by_rule['ltt']['promise'] == 'exceedance_rate <= 0.1'
    assert by_rule['none']['keeps_promise'] is None


def _exit_cache(n: int = 120, seed: int = 0) -> ExitCache:
    """Two exits over 4 classes: the final one always right, the early one right where its gate is confident."""
    rng = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 4, (n,), generator=rng)
    gate = torch.rand(1, n, generator=rng, dtype=torch.float64).float()
    early = torch.where(torch.rand(n, generator=rng) < gate[0], targets, (targets + 1) % 4)
    logits = torch.stack([F.one_hot(early, 4).float(), F.one_hot(targets, 4).float()])
    return ExitCache(logits, gate, targets)


def test_a_threshold_chosen_in_sample_promises_nothing():
    """Without calibration images (the rule chose on the validation images it is judged on): guarantee 'none',
    certified False, no bound; on other images the rule's own promise, and the baselines say which it was."""
    val, calib, budget = _exit_cache(), _exit_cache(seed=1), parse_budget('acc-drop=5')
    risk = RiskControl('crc')
    for selecting, out_of_sample in ((val, False), (calib, True)):
        threshold, certificate = pick_threshold(selecting, [], 'gate', budget, risk)
        assert certificate.certified  # 120 images certify a 5% level
        fields = risk_fields(selecting, val, 'gate', threshold, budget, risk, certificate)
        assert fields['out_of_sample'] is out_of_sample and fields['certified'] is out_of_sample
        assert fields['guarantee'] == (GUARANTEES['crc'] if out_of_sample else 'none')
        assert fields['risk_bound'] == (0.05 if out_of_sample else None)
        baselines = baselines_report(val, points_by_rule(val, [0.5, 1.0], [1.0, 2.0]), selecting,
                                     points_by_rule(selecting, [0.5, 1.0], [1.0, 2.0]), budget, [0.5, 1.0],
                                     [1.0, 2.0], risk)
        assert all(baselines[rule]['risk']['out_of_sample'] is out_of_sample for rule in ('max_prob', 'entropy'))
        assert baselines['single_exit']['out_of_sample'] is out_of_sample


def test_ltt_tests_the_grid_fixed_before_calibration():
    picked = chosen_thresholds(*synthetic_draw(400, np.random.default_rng(3)), [0.05], 0.1, 'error')
    assert picked['ltt', 0.05][1] and picked['ltt', 0.05][0] in LTT_GRID.tolist()
    assert LTT_GRID[0] > 1 and torch.all(LTT_GRID[1:] == torch.linspace(1, 0, 1001, dtype=torch.float64))
