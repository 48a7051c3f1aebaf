"""Split-conformal prediction sets per exit: calibrated on validation, reported as coverage and set size."""
import math
from typing import Sequence

import torch

from learning_helpers.evaluation import ExitCache

ALPHAS = (0.01, 0.02, 0.03, 0.04, 0.05)


def conformal_thresholds(cache: ExitCache, alphas: Sequence[float] = ALPHAS) -> list[list[float]]:
    """qhat[k][i]: the ceil((n+1)(1-alpha_i))/n empirical quantile of the scores 1 - p_true at exit k."""
    probs = cache.logits.softmax(dim=-1)  # (E, N, C)
    scores = 1 - probs.gather(2, cache.targets.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(2)
    n = scores.shape[1]
    levels = [min(1.0, math.ceil((n + 1) * (1 - alpha)) / n) for alpha in alphas]
    return [[torch.quantile(exit_scores, level, interpolation='higher').item() for level in levels]
            for exit_scores in scores]


def prediction_set_stats(cache: ExitCache, qhats: list[list[float]],
                         alphas: Sequence[float] = ALPHAS) -> list[dict]:
    """Per exit and alpha: coverage (%) and mean size of the sets {c : 1 - p_c <= qhat}."""
    probs = cache.logits.softmax(dim=-1)
    stats = []
    for k, exit_probs in enumerate(probs):
        for alpha, qhat in zip(alphas, qhats[k]):
            sets = (1 - exit_probs) <= qhat  # (N, C)
            covered = sets.gather(1, cache.targets.view(-1, 1)).float().mean().item()
            stats.append({'exit': k, 'alpha': alpha, 'coverage': 100 * covered,
                          'mean_set_size': sets.sum(dim=1).float().mean().item()})
    return stats
