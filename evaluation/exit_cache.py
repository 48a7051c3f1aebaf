"""Early-exit evaluation: one pass caches every exit's logits and gates; the sweep is derived from the cache.

The reference ran the full network once per threshold; here thresholds cost nothing after the one pass.
"""
from typing import NamedTuple, Sequence

import torch

from models.exit_rule import best_exit, exit_mass, level_error
from models.exit_rule import first_exit
from runtime.batches import batches
from runtime.distributed import all_gather_cat, autocast

DEFAULT_THRESHOLDS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]  # the sweep of --eval and of the benchmarks


class ExitCache(NamedTuple):
    """Everything the sweep needs, on the CPU."""
    logits: torch.Tensor  # (E, N, C) float32
    gate_probs: torch.Tensor  # (G, N) sigmoid of the gate logits
    targets: torch.Tensor  # (N,)


@torch.no_grad()
def collect_exit_outputs(model: torch.nn.Module, loader, device: torch.device, *, max_batches: int | None = None,
                         amp: bool = False) -> ExitCache:
    """Run the loader's images once through every exit."""
    model.eval()
    logits, gates, targets = [], [], []
    for images, labels in batches(loader, 'exits', max_batches):
        with autocast(device, amp):
            out = model.forward_exits(images.to(device, non_blocking=True))
        logits.append(out.logits.float())
        gates.append(torch.sigmoid(out.gate_logits.float()))
        targets.append(labels.to(device))
    return ExitCache(all_gather_cat(torch.cat(logits, dim=1), dim=1).cpu(),
                     all_gather_cat(torch.cat(gates, dim=1), dim=1).cpu(),
                     all_gather_cat(torch.cat(targets)).cpu())


def exit_choice(gate_probs: torch.Tensor, threshold: float) -> torch.Tensor:
    """(G, N) gate probabilities -> (N,) exit index: the first k with prob >= threshold, else G (final)."""
    return first_exit(gate_probs, threshold)


def gated_predictions(cache: ExitCache, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) predictions and (N,) exit indices of early exit at `threshold`, from the cache."""
    chosen = exit_choice(cache.gate_probs, threshold)
    predictions = cache.logits.argmax(dim=-1)  # (E, N)
    return predictions.gather(0, chosen.unsqueeze(0)).squeeze(0), chosen


def per_exit_accuracy(cache: ExitCache) -> list[float]:
    """Accuracy (%) of every exit alone, first to final."""
    correct = cache.logits.argmax(dim=-1) == cache.targets.unsqueeze(0)
    return (100 * correct.double().mean(dim=1)).tolist()  # float64: 94.0625, not 94.0625011920929


def conditional_exit_choice(gate_probs: torch.Tensor) -> torch.Tensor:
    """(G, N) gate probabilities -> (N,) exit index under the rule training validates with (the reference's):
    walking the exits in order, a_k = clip(P_k / prod_{j<k} (1 - a_j), 0, 1) with P_k the exit mass; a sample
    leaves at the first k with a_k >= 0.5, else at the final head (G)."""
    num_gates, n = gate_probs.shape
    mass = exit_mass(gate_probs.double())[:-1]  # (G, N)
    not_left_yet = torch.ones(n, dtype=torch.float64)  # prod_{j<k} (1 - a_j)
    activations = torch.empty_like(mass)
    for k in range(num_gates):
        # a division by 0 only happens after some a_j = 1, i.e. for samples that already left
        activations[k] = (mass[k] / not_left_yet).clamp(0, 1)
        not_left_yet = not_left_yet * (1 - activations[k])
    return first_exit(activations, 0.5)


def oracle_exit_choice(cache: ExitCache) -> torch.Tensor:
    """(N,) the earliest exit whose prediction is right, else the final exit (E - 1): the cheapest any exit rule
    could do with these exits, the headroom a rule is measured against."""
    correct = cache.logits.argmax(dim=-1) == cache.targets.unsqueeze(0)  # (E, N)
    correct[-1] = True  # nothing right: the sample runs to the final exit
    return correct.int().argmax(dim=0)  # argmax returns the first maximum


def exit_point(cache: ExitCache, chosen: torch.Tensor, gflops_per_exit: Sequence[float]) -> dict:
    """Accuracy, expected GFLOPs, and each exit's share and accuracy when sample i leaves at chosen[i]."""
    predictions = cache.logits.argmax(dim=-1).gather(0, chosen.unsqueeze(0)).squeeze(0)
    correct = (predictions == cache.targets).double()  # float64 keeps the JSON's percentages exact
    num_exits = cache.logits.shape[0]
    counts = torch.bincount(chosen, minlength=num_exits).double()
    hits = torch.bincount(chosen, weights=correct, minlength=num_exits)
    share = counts / max(len(chosen), 1)
    exit_accuracy = torch.where(counts > 0, 100 * hits / counts.clamp_min(1), torch.zeros_like(counts))
    return {'accuracy': 100 * correct.mean().item(),
            'expected_gflops': float((share * torch.tensor(gflops_per_exit, dtype=torch.float64)).sum()),
            'exit_share': share.tolist(), 'exit_accuracy': exit_accuracy.tolist()}


def sweep_point(cache: ExitCache, threshold: float, gflops_per_exit: Sequence[float]) -> dict:
    """`exit_point` when each sample leaves at the first gate with probability >= threshold."""
    return {'threshold': round(float(threshold), 6),
            **exit_point(cache, exit_choice(cache.gate_probs, threshold), gflops_per_exit)}


def threshold_sweep(cache: ExitCache, thresholds: Sequence[float], gflops_per_exit: Sequence[float]) -> list[dict]:
    return [sweep_point(cache, t, gflops_per_exit) for t in thresholds]


def best_exit_counts(cache: ExitCache, costs: torch.Tensor, tradeoff: float, objective: str = 'ce') -> torch.Tensor:
    """(E,) how many samples have each exit as their best (argmin error + lambda * cost)."""
    best = best_exit(level_error(cache.logits, cache.targets, objective), costs, tradeoff)
    return torch.bincount(best, minlength=cache.logits.shape[0])


def updated_pos_weight(counts: torch.Tensor, max_weight: float = 5.0) -> torch.Tensor:
    """pos_weight_k = min((n - c_k) / max(c_k, 0.1), 5) for each intermediate gate, c_k the number of samples
    whose best exit is k (the reference's count)."""
    n = counts.sum().float()
    gate_counts = counts[:-1].float()
    return torch.clamp((n - gate_counts) / gate_counts.clamp_min(0.1), max=max_weight)
