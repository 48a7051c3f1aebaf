"""Operating points of an early-exit model, from one cache of every exit's outputs: every distinct point a
threshold can give, their Pareto front, the point a budget picks, and the no-training baselines (thresholds
on max softmax probability or on entropy, each exit alone).

An exit rule here is a (G, N) score matrix: sample n leaves at the first intermediate exit k with
score[k, n] >= threshold, else at the final head. Its exit only changes when the threshold crosses one of
the scores, so those values (and one just above the largest) are all the distinct operating points.
"""
import math
from typing import NamedTuple, Sequence

import numpy as np
import torch

from errors import GFNetDynnError
from evaluation.exit_cache import ExitCache, per_exit_accuracy
from models.exit_rule import first_exit

BUDGET_KINDS = ('acc-drop', 'gflops', 'latency-ms')
DEFAULT_BUDGET = 'acc-drop=1.0'
MAX_CELLS = 1 << 24  # thresholds x gates x samples evaluated at once (bools): bounds the sweep's memory
BASELINE_RULES = ('max_prob', 'entropy')


class Budget(NamedTuple):
    """acc-drop=D: cheapest point within D points of the full network; gflops=X / latency-ms=X: most accurate
    point whose expected GFLOPs / batch-1 latency (ms) per image is at most X."""
    kind: str
    value: float

    def __str__(self) -> str:
        return f'{self.kind}={self.value:g}'


def parse_budget(text: str) -> Budget:
    """'gflops=0.3' -> Budget('gflops', 0.3); ValueError with the accepted forms otherwise (argparse type)."""
    kind, _, value = text.partition('=')
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if kind not in BUDGET_KINDS or not math.isfinite(number) or number < 0:
        # no flag name: argparse's message already starts 'argument --budget:'
        raise ValueError(f'{text!r} is not a budget: use acc-drop=POINTS, gflops=X or latency-ms=X with a number >= 0')
    return Budget(kind, number)


def exit_scores(cache: ExitCache, rule: str) -> torch.Tensor:
    """(G, N) scores of an exit rule: 'gate' the learned gate probabilities, 'max_prob' each intermediate exit's
    largest softmax probability, 'entropy' 1 - H(softmax) / log(C) (1: certain, 0: uniform)."""
    if rule == 'gate':  # float32, compared with the threshold in float32: exactly what the engine decides
        return cache.gate_probs.float()
    probs = torch.softmax(cache.logits[:-1].double(), dim=-1)  # (G, N, C)
    if rule == 'max_prob':
        return probs.amax(dim=-1)
    if rule == 'entropy':
        entropy = -(probs * probs.clamp_min(1e-300).log()).sum(dim=-1)
        return 1 - entropy / math.log(probs.shape[-1])
    raise ValueError(f'unknown exit rule {rule!r}')


def distinct_thresholds(scores: torch.Tensor) -> torch.Tensor:
    """Every threshold that gives a distinct operating point, descending: one just above the largest score
    (everyone at the final head), then each distinct score."""
    values = torch.unique(scores.double().flatten())  # ascending
    # the next float32 above the largest score: the engine compares float32 probabilities with the threshold
    above = float(np.nextafter(np.float32(values[-1].item()), np.float32(np.inf))) if values.numel() else 1.0
    return torch.cat([torch.tensor([above], dtype=torch.float64), values.flip(0)])


def exits_at(scores: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(T,) thresholds -> (T, N) exit index of every sample: the first k with score >= threshold, else G."""
    return first_exit(scores.unsqueeze(0), thresholds.view(-1, 1, 1))  # (T, G, N) -> (T, N)


def point_table(cache: ExitCache, scores: torch.Tensor, thresholds: torch.Tensor, gflops_per_exit: Sequence[float],
                latency_ms: Sequence[float] | None = None) -> list[dict]:
    """One operating point per threshold: accuracy (%), expected GFLOPs and (with a latency table, cumulative
    ms per exit) expected batch-1 ms per image, and each exit's share. Vectorised over thresholds."""
    correct = (cache.logits.argmax(dim=-1) == cache.targets.unsqueeze(0))  # (E, N)
    num_exits, n = correct.shape
    gflops = torch.tensor(list(gflops_per_exit), dtype=torch.float64)
    latency = torch.tensor(list(latency_ms), dtype=torch.float64) if latency_ms is not None else None
    chunk = max(1, MAX_CELLS // max(1, scores.numel()))
    points = []
    for start in range(0, len(thresholds), chunk):
        some = thresholds[start:start + chunk]
        exits = exits_at(scores, some)  # (T, N)
        accuracy = 100 * correct.gather(0, exits).double().mean(dim=1)
        share = torch.nn.functional.one_hot(exits, num_exits).double().mean(dim=1)  # (T, E)
        expected_gflops = share @ gflops
        expected_ms = share @ latency if latency is not None else None
        for t in range(len(some)):
            point = {'threshold': float(some[t]), 'accuracy': float(accuracy[t]),
                     'expected_gflops': float(expected_gflops[t]), 'exit_share': share[t].tolist()}
            if expected_ms is not None:
                point['expected_latency_ms'] = float(expected_ms[t])
            points.append(point)
    return points


def all_points(cache: ExitCache, rule: str, gflops_per_exit: Sequence[float],
               latency_ms: Sequence[float] | None = None) -> list[dict]:
    """Every distinct operating point of an exit rule on this cache, from all-final to the cheapest."""
    scores = exit_scores(cache, rule)
    return point_table(cache, scores, distinct_thresholds(scores), gflops_per_exit, latency_ms)


def pareto_front(points: list[dict]) -> list[dict]:
    """The points no other point beats on both accuracy and expected GFLOPs, cheapest first; of points with
    equal cost and accuracy, the one with the highest threshold."""
    ordered = sorted(points, key=lambda p: (p['expected_gflops'], -p['accuracy'], -p['threshold']))
    front, best = [], -math.inf
    for point in ordered:
        if point['accuracy'] > best:
            front.append(point)
            best = point['accuracy']
    return front


def single_exit_points(cache: ExitCache, gflops_per_exit: Sequence[float],
                       latency_ms: Sequence[float] | None = None) -> list[dict]:
    """Each exit alone (every sample leaves there): exit index, accuracy, GFLOPs and latency."""
    return [{'exit': k, 'accuracy': accuracy, 'expected_gflops': float(gflops_per_exit[k]),
             **({'expected_latency_ms': float(latency_ms[k])} if latency_ms is not None else {})}
            for k, accuracy in enumerate(per_exit_accuracy(cache))]


def choose(points: list[dict], budget: Budget, full_accuracy: float) -> dict:
    """The point the budget picks: acc-drop the cheapest within budget.value points of full_accuracy (the most
    accurate point when none is); gflops / latency-ms the most accurate point within the budget, cheapest on
    ties. A budget below every point is an error naming the cheapest cost."""
    if budget.kind == 'acc-drop':
        eligible = [p for p in points if p['accuracy'] >= full_accuracy - budget.value - 1e-9]
        if not eligible:
            return max(points, key=lambda p: p['accuracy'])
        return min(eligible, key=lambda p: (p['expected_gflops'], -p['accuracy']))
    key, unit = ('expected_gflops', 'GFLOPs') if budget.kind == 'gflops' else ('expected_latency_ms', 'ms')
    eligible = [p for p in points if p[key] <= budget.value + 1e-12]
    if not eligible:
        cheapest = min(p[key] for p in points)
        raise GFNetDynnError(f'--budget {budget}: no operating point is that cheap (the cheapest, every image at '
                             f'the first exit, takes {cheapest:.4g} {unit}); raise the budget')
    return max(eligible, key=lambda p: (p['accuracy'], -p[key]))


def choose_single_exit(points: list[dict], budget: Budget, full_accuracy: float) -> dict | None:
    """`choose` over the single exits; None when no exit fits a GFLOPs or latency budget."""
    try:
        return choose(points, budget, full_accuracy)
    except GFNetDynnError:
        return None
