"""Split-conformal prediction sets for early exit, as the reference computes them after each validation.

Score of a sample at an exit: 1 - p_true. For each alpha, qhat is the ceil((n+1)(1-alpha))/n empirical
quantile ('higher') of the calibration scores; the prediction set of a sample is {c : p_c >= 1 - qhat}.
Thresholds: one `general` qhat over the gated predictions, and per exit `all` (every sample's score at that
exit), `strict` (only the samples that left there) and `gated` (strict where more than 20 samples left, else
all). The sets are reported for each kind: coverage and mean size.
"""
import math
from typing import Sequence

import torch

from evaluation.exit_cache import ExitCache

ALPHAS = tuple(round(0.01 + 0.005 * i, 3) for i in range(9))  # 0.01, 0.015, ..., 0.05
MIN_SAMPLES_PER_EXIT = 20  # an exit needs more samples leaving there than this for its own (strict) qhat
SET_KINDS = ('general', 'gated', 'all', 'strict')


def conformal_scores(cache: ExitCache) -> torch.Tensor:
    """(E, N) nonconformity scores 1 - p_true at every exit, in float64 so that a set's test p >= 1 - qhat
    reproduces the calibration score exactly (float32 would drop the boundary sample now and then)."""
    probs = _probabilities(cache)  # (E, N, C)
    return 1 - probs.gather(2, cache.targets.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(2)


def _probabilities(cache: ExitCache) -> torch.Tensor:
    return cache.logits.softmax(dim=-1).double()


def conformal_quantile(scores: torch.Tensor, alpha: float) -> float:
    """The split-conformal qhat of 1-D `scores`; 1 - alpha when there are none (the reference's placeholder)."""
    n = scores.numel()
    if n == 0:
        return 1 - alpha
    level = min(1.0, math.ceil((n + 1) * (1 - alpha)) / n)
    return torch.quantile(scores, level, interpolation='higher').item()


def conformal_thresholds(cache: ExitCache, chosen: torch.Tensor, alphas: Sequence[float] = ALPHAS) -> dict:
    """qhats calibrated on `cache` when sample i leaves at exit chosen[i]: {'alphas', 'general': [per alpha],
    'gated' / 'all' / 'strict': [per alpha [per exit]]} (plain lists, so checkpoints stay weights_only)."""
    scores = conformal_scores(cache)
    gated_scores = scores.gather(0, chosen.unsqueeze(0)).squeeze(0)
    thresholds = {'alphas': list(alphas), 'general': [], 'gated': [], 'all': [], 'strict': []}
    for alpha in alphas:
        thresholds['general'].append(conformal_quantile(gated_scores, alpha))
        every, strict, gated = [], [], []
        for k, exit_scores in enumerate(scores):
            left_here = exit_scores[chosen == k]
            every.append(conformal_quantile(exit_scores, alpha))
            strict.append(conformal_quantile(left_here, alpha))
            gated.append(strict[-1] if left_here.numel() > MIN_SAMPLES_PER_EXIT else every[-1])
        thresholds['all'].append(every)
        thresholds['strict'].append(strict)
        thresholds['gated'].append(gated)
    return thresholds


def _set_stats(sets: torch.Tensor, targets: torch.Tensor) -> dict:
    """Coverage (%) and mean size of (N, C) boolean prediction sets."""
    if targets.numel() == 0:
        return {'samples': 0, 'coverage': None, 'mean_set_size': None}
    covered = sets.gather(1, targets.view(-1, 1)).double().mean().item()
    return {'samples': int(targets.numel()), 'coverage': 100 * covered,
            'mean_set_size': sets.sum(dim=1).double().mean().item()}


def prediction_set_stats(cache: ExitCache, chosen: torch.Tensor, thresholds: dict) -> dict:
    """Coverage and mean set size per alpha for every kind of qhat over all samples (each sample judged at the
    exit it left at), and per exit for `gated`: {'overall': [rows], 'per_exit': [rows]}."""
    probs = _probabilities(cache)  # (E, N, C)
    gated_probs = probs.gather(0, chosen.view(1, -1, 1).expand(1, -1, probs.shape[2])).squeeze(0)  # (N, C)
    overall, per_exit = [], []
    for i, alpha in enumerate(thresholds['alphas']):
        row = {'alpha': alpha, 'general': _set_stats(gated_probs >= 1 - thresholds['general'][i], cache.targets)}
        for kind in ('gated', 'all', 'strict'):
            qhat = torch.tensor(thresholds[kind][i], dtype=probs.dtype)[chosen].unsqueeze(1)  # (N, 1)
            row[kind] = _set_stats(gated_probs >= 1 - qhat, cache.targets)
        overall.append(row)
        for k in range(probs.shape[0]):
            here = chosen == k
            sets = gated_probs[here] >= 1 - thresholds['gated'][i][k]
            per_exit.append({'alpha': alpha, 'exit': k, **_set_stats(sets, cache.targets[here])})
    return {'overall': overall, 'per_exit': per_exit}
