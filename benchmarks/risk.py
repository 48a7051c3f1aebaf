"""Whether each threshold selection rule keeps what it promises for an accuracy-drop budget, over random re-splits.

  python -m benchmarks.risk --checkpoint checkpoint/checkpoint_DEMO_0.75_confEE/best.pth --data-set DEMO
  python -m benchmarks.risk --synthetic

On a checkpoint: its held-out images (the calibration images it recorded and the validation images) run once
through every exit; each of --resplits random re-splits calibrates on --calib-size of them and tests on the
rest. The risk (expected loss) of a chosen threshold is estimated by its mean loss on the test part: an estimate
from about half the held-out images, whose noise adds re-splits above P/100 that the true risk would not have.
For each exit rule (learned gates, max probability, entropy), budget acc-drop=P (risk level P/100) and selection
rule, what the rule promises is checked: crc, the mean risk over re-splits at most P/100 (CRC bounds the
expectation over the calibration draw and the new image); ltt, the exceedance rate, the share of re-splits whose
risk exceeds P/100, at most delta; none (the empirical rule of --eval) promises nothing. Also: the 1 - delta
quantile of the risk, the mean accuracy drop against the full network and how often it exceeds P points, how
often nothing was certified (no early exit), and the FLOPs saved on the test images. --synthetic draws fresh
calibration images from a model with a known risk curve and reports the true risk of the chosen threshold.
"""
import argparse
import sys
from typing import Callable

import numpy as np
import torch

from benchmarks.common import measure_and_write, run_benchmark
from data_loader_help import build_loaders
from errors import GFNetDynnError, OneLineParser
from evaluation.exit_cache import ExitCache, collect_exit_outputs
from evaluation.operating_points import BASELINE_RULES, exit_scores, exits_at
from evaluation.risk_control import (DEFAULT_DELTA, LTT_GRID, RISK_LOSSES, RISK_RULES, image_losses, scan,
                                     scan_thresholds, select)
from jobs.flags import add_flag, bounded, non_negative, positive
from jobs.trained_run import reopen, reopen_data
from models.flops import exit_gflops

# The synthetic model: score s ~ U(0, 1) at one early exit, which is wrong (the final head never is) with
# probability SLOPE (1 - s); the risk of threshold t is then SLOPE (1 - t)^2 / 2, its FLOPs saved (1 - t) / 2.
SLOPE = 0.5
SYNTHETIC_GFLOPS = [0.5, 1.0]


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('benchmarks.risk', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, '--checkpoint', default=None, help='a dynn-stage checkpoint (best.pth)')
    add_flag(parser, '--synthetic', action='store_true', help='synthetic scores with a known risk curve')
    add_flag(parser, '--data-set', default='DEMO', help='dataset_config.py entry of the held-out images')
    add_flag(parser, '--data-path', default=None, help="default: the entry's default_data_path")
    add_flag(parser, '--batch', check=positive, type=int, default=96, help='batch size of the cached pass')
    add_flag(parser, '--acc-drop', check=bounded(0, 100, low_open=True, high_open=True), type=float, nargs='+',
             default=[1.0, 2.0, 5.0], help='budgets acc-drop=P, in points (the risk level is P/100)')
    add_flag(parser, '--delta', check=bounded(0, 1, low_open=True, high_open=True), type=float,
             default=DEFAULT_DELTA, help='ltt: allowed failure probability')
    add_flag(parser, '--risk-loss', default='error', choices=RISK_LOSSES, help='the per-image loss controlled')
    add_flag(parser, '--exit-rules', nargs='+', default=['gate', *BASELINE_RULES],
                        choices=['gate', *BASELINE_RULES], help='exit scores whose thresholds are chosen')
    add_flag(parser, '--resplits', check=positive, type=int, default=500, help='random calibration / test re-splits')
    add_flag(parser, '--calib-size', check=positive, type=int, default=None,
                        help='calibration images per re-split; default: half of the held-out images (synthetic: 500)')
    add_flag(parser, '--seed', check=non_negative, type=int, default=0, help='seed of the re-splits')
    add_flag(parser, '--json', default=None,
                        help='default: bench/risk_{data}.json (synthetic: bench/risk_synthetic.json)')
    return parser


def synthetic_draw(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n images of the synthetic model: predictions (2, N) of the early and final exit, targets (N,), scores
    (1, N)."""
    scores = rng.random(n)
    wrong = rng.random(n) < SLOPE * (1 - scores)
    targets = torch.zeros(n, dtype=torch.long)
    predictions = torch.stack([torch.from_numpy(wrong.astype(np.int64)), targets])
    return predictions, targets, torch.from_numpy(scores).view(1, -1)


def synthetic_risk(threshold: float) -> float:
    """The true risk of the synthetic model at a threshold: P(s >= t and the early exit wrong)."""
    t = min(max(threshold, 0.0), 1.0)
    return SLOPE * (1 - t) ** 2 / 2


def chosen_thresholds(predictions: torch.Tensor, targets: torch.Tensor, scores: torch.Tensor, levels: list[float],
                      delta: float, loss: str) -> dict[tuple[str, float], tuple[float, bool]]:
    """(selection rule, level) -> (threshold, certified) on one calibration set; LTT on its grid fixed in advance,
    the other rules on every distinct calibration score (as --eval)."""
    by_scores = scan(predictions, targets, scores, scan_thresholds(scores), loss)
    on_grid = scan(predictions, targets, scores, LTT_GRID, loss)
    picks = {}
    for level in levels:
        for rule in RISK_RULES:
            picked = select(on_grid if rule == 'ltt' else by_scores, rule, level, delta)
            picks[rule, level] = picked.threshold, rule == 'none' or picked.certified
    return picks


def summarise(records: dict, levels: list[float], delta: float) -> list[dict]:
    """One row per (exit rule, level, selection rule): mean and 1 - delta quantile of the test risk, the share of
    re-splits whose risk exceeds the level (exceedance), what the rule promises and whether the measurement keeps
    it (crc: mean risk <= level; ltt: exceedance <= delta; none: nothing), how often the accuracy drop itself
    exceeds the level, the uncertified rate, mean FLOPs saved."""
    rows = []
    for (exit_rule, level, rule), runs in records.items():
        risk, drop, saved, certified = (np.array(column) for column in zip(*runs))
        exceedance = float((risk > level + 1e-12).mean())
        promise = {'crc': ('mean_risk', level), 'ltt': ('exceedance_rate', delta)}.get(rule)
        rows.append({'exit_rule': exit_rule, 'acc_drop': 100 * level, 'risk_level': level, 'rule': rule,
                     'mean_risk': float(risk.mean()), 'risk_quantile': float(np.quantile(risk, 1 - delta)),
                     'exceedance_rate': exceedance,
                     'promise': f'{promise[0]} <= {promise[1]:g}' if promise else None,
                     'keeps_promise': (None if promise is None else
                                       (float(risk.mean()) if rule == 'crc' else exceedance) <= promise[1] + 1e-12),
                     'mean_accuracy_drop': float(drop.mean()),
                     'accuracy_violation_rate': float((drop > level + 1e-12).mean()),
                     'uncertified_rate': float(1 - certified.mean()), 'flops_saved': float(saved.mean()) + 0.0})
    return rows


def run_resplits(resplits: int, seed: int, levels: list[float], delta: float, loss: str,
                 draw: Callable[[np.random.Generator], dict]) -> dict:
    """draw(rng) -> {exit rule: (calibration (predictions, targets, scores), test(thresholds) -> (risk, accuracy
    drop, FLOPs saved))}; the records of every re-split."""
    rng = np.random.default_rng(seed)
    records: dict = {}
    for _ in range(resplits):
        for exit_rule, (calibration, test) in draw(rng).items():
            picks = chosen_thresholds(*calibration, levels, delta, loss)
            thresholds = [threshold for threshold, _ in picks.values()]
            for (key, (_, certified)), *measured in zip(picks.items(), *test(thresholds)):
                records.setdefault((exit_rule, key[1], key[0]), []).append((*measured, certified))
    return records


def held_out_cache(checkpoint: str, data_set: str, data_path: str | None, batch: int) -> tuple[ExitCache, list, dict]:
    """The checkpoint's calibration and validation images, run once through every exit: one cache, the GFLOPs
    per exit and how many images of each kind."""
    model, model_args, _ = reopen(checkpoint)
    data = reopen_data(model_args, data_set, data_path, need_train=False)
    caches = [collect_exit_outputs(model, build_loaders(None, images, batch, num_workers=0, seed=0)[1],
                                   torch.device('cpu')) for images in (data.val, data.calib) if images is not None]
    cache = ExitCache(*(torch.cat(parts, dim=1 if k < 2 else 0) for k, parts in enumerate(zip(*caches))))
    counts = {'val': len(data.val), 'calibration': len(data.calib) if data.calib is not None else 0}
    return cache, exit_gflops(model), counts


def checkpoint_study(args: argparse.Namespace, levels: list[float]) -> dict:
    cache, gflops, counts = held_out_cache(args.checkpoint, args.data_set, args.data_path, args.batch)
    n = int(cache.targets.numel())
    calib_size = args.calib_size or n // 2
    if not 0 < calib_size < n:
        raise GFNetDynnError(f'--calib-size {calib_size}: the checkpoint has {n} held-out images; pass 1 to {n - 1}')
    predictions = cache.logits.argmax(dim=-1)
    scores = {rule: exit_scores(cache, rule) for rule in args.exit_rules}
    cost = torch.tensor(gflops, dtype=torch.float64)

    def draw(rng: np.random.Generator) -> dict:
        order = torch.from_numpy(rng.permutation(n))
        calib, test = order[:calib_size], order[calib_size:]

        def tester(rule_scores: torch.Tensor):
            def test_at(thresholds: list[float]):
                exits = exits_at(rule_scores[:, test], torch.tensor(thresholds, dtype=torch.float64))  # (K, n_test)
                early = predictions[:, test].gather(0, exits)
                lost = image_losses(early, predictions[-1, test], cache.targets[test], args.risk_loss)
                wrong = (early != cache.targets[test]).double().mean(dim=1)
                drop = wrong - (predictions[-1, test] != cache.targets[test]).double().mean()
                return (lost.double().mean(dim=1).tolist(), drop.tolist(),
                        (1 - cost[exits].mean(dim=1) / cost[-1]).tolist())
            return test_at
        return {rule: ((predictions[:, calib], cache.targets[calib], s[:, calib]), tester(s))
                for rule, s in scores.items()}
    records = run_resplits(args.resplits, args.seed, levels, args.delta, args.risk_loss, draw)
    return {'checkpoint': args.checkpoint, 'data_set': args.data_set, 'held_out_images': counts,
            'calib_size': calib_size, 'test_size': n - calib_size, 'gflops_per_exit': gflops,
            'rows': summarise(records, levels, args.delta)}


def synthetic_study(args: argparse.Namespace, levels: list[float]) -> dict:
    calib_size = args.calib_size or 500

    def draw(rng: np.random.Generator) -> dict:
        def test_at(thresholds: list[float]):
            risk = [synthetic_risk(t) for t in thresholds]  # the final head is never wrong: risk = accuracy drop
            return (risk, risk,
                    [(1 - min(max(t, 0.0), 1.0)) * (1 - SYNTHETIC_GFLOPS[0] / SYNTHETIC_GFLOPS[1]) for t in thresholds])
        return {'synthetic': (synthetic_draw(calib_size, rng), test_at)}
    records = run_resplits(args.resplits, args.seed, levels, args.delta, args.risk_loss, draw)
    return {'data_set': 'synthetic', 'slope': SLOPE, 'calib_size': calib_size, 'test_size': None,
            'rows': summarise(records, levels, args.delta)}


def format_table(result: dict) -> str:
    test = ('true risk' if result['test_size'] is None
            else f"risk estimated on {result['test_size']} held-out images")
    lines = [f"{result['data_set']}: {result['resplits']} re-splits, {result['calib_size']} "
             f"calibration images, {test}, {result['risk_loss']} loss, delta {result['delta']:g}",
             f"{'exit rule':>9} {'P':>4} {'rule':>5} {'mean risk':>10} {'exceeds':>8} {'promise':>24} {'kept':>5} "
             f"{'q(1-d)':>8} {'acc drop':>8} {'acc exceeds':>11} {'no exit':>8} {'FLOPs saved':>11}"]
    for row in result['rows']:
        kept = {None: '-', True: 'yes', False: 'NO'}[row['keeps_promise']]
        lines.append(f"{row['exit_rule']:>9} {row['acc_drop']:4g} {row['rule']:>5} {row['mean_risk']:10.4f} "
                     f"{100 * row['exceedance_rate']:7.1f}% {row['promise'] or '-':>24} {kept:>5} "
                     f"{row['risk_quantile']:8.4f} {100 * row['mean_accuracy_drop']:7.2f}p "
                     f"{100 * row['accuracy_violation_rate']:10.1f}% {100 * row['uncertified_rate']:7.1f}% "
                     f"{100 * row['flops_saved']:10.1f}%")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    def measure(args: argparse.Namespace) -> dict:
        if args.synthetic == bool(args.checkpoint):
            raise GFNetDynnError('pass either --checkpoint C (a trained model) or --synthetic')
        levels = [p / 100 for p in args.acc_drop]
        result = synthetic_study(args, levels) if args.synthetic else checkpoint_study(args, levels)
        return {**result, 'resplits': args.resplits, 'delta': args.delta, 'risk_loss': args.risk_loss,
                'seed': args.seed, 'command': ' '.join(['python -m benchmarks.risk', *(argv or sys.argv[1:])])}

    return run_benchmark(get_args_parser(), argv, lambda args: measure_and_write(
        'risk', args.json, 'risk_synthetic.json' if args.synthetic else f'risk_{args.data_set}.json',
        lambda: measure(args), format_table))


if __name__ == '__main__':
    sys.exit(main())
