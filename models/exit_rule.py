"""The exit rule: an image leaves at the first exit whose gate probability reaches the threshold, else at the final
head. The engine, the sweep, `--eval` and training's validation all decide through it.

The threshold is compared in the probabilities' dtype (float32 for every gate), so a threshold that float32 rounds,
such as 0.7, decides alike everywhere; the torch-free ONNX runner keeps a numpy twin (`onnx_runner.fires`).

Beside the rule, the exit-level arithmetic training's losses and --eval's counts share: each exit's error, the
best exit under the cost trade-off, the gates' targets, and the exit mass the gates give each exit.
"""
import torch
import torch.nn.functional as F


def fires(probs: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Boolean, same shape as `probs` (broadcast with `threshold`): which probabilities reach the threshold."""
    return probs >= torch.as_tensor(threshold, dtype=probs.dtype, device=probs.device)


def first_exit(probs: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """(..., G, N) gate probabilities -> (..., N) exit index: the first k that fires, else G (the final head)."""
    # the first k that fires is the count of exits before any has fired: a cumulative max and a sum, several
    # times faster on CPU than a first-index argmax over a (..., G + 1, N) copy
    fired_so_far = fires(probs, threshold).to(torch.uint8).cummax(dim=-2).values
    return (fired_so_far == 0).sum(dim=-2)


def per_exit_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(E, B, C) logits, (B,) targets -> (E, B) per-sample cross-entropy at every exit."""
    num_exits, batch, num_classes = logits.shape
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 under --amp -> float32
    flat = F.cross_entropy(logits.reshape(-1, num_classes), targets.repeat(num_exits), reduction='none')
    return flat.view(num_exits, batch)


def level_error(logits: torch.Tensor, targets: torch.Tensor, objective: str = 'ce') -> torch.Tensor:
    """(E, B) error of every exit: cross-entropy ('ce') or misclassification 0/1 ('zero_one')."""
    if objective == 'zero_one':
        return (logits.argmax(dim=-1) != targets.unsqueeze(0)).float()
    return per_exit_cross_entropy(logits, targets)


def best_exit(error: torch.Tensor, costs: torch.Tensor, tradeoff: float) -> torch.Tensor:
    """(E, B) per-exit error and (E,) normalized costs -> (B,) argmin_k error_k + lambda * cost_k
    (ties go to the earliest exit)."""
    return (error + tradeoff * costs.unsqueeze(1)).argmin(dim=0)


def gate_targets(best: torch.Tensor, num_gates: int) -> torch.Tensor:
    """(B,) best exit t -> (G, B) targets: gate k should fire (1) iff k >= t, i.e. the sample should have left."""
    gate_index = torch.arange(num_gates, device=best.device).unsqueeze(1)
    return (gate_index >= best.unsqueeze(0)).float()


def exit_mass(gate_probs: torch.Tensor) -> torch.Tensor:
    """(G, B) gate probabilities -> (E, B) exit masses P_k = max(0, min(g_k, 1 - sum_{j<k} g_j)),
    with g = 1 for the final exit so it takes what is left."""
    ones = torch.ones_like(gate_probs[:1])
    g = torch.cat([gate_probs, ones])  # (E, B)
    before = torch.cumsum(g, dim=0) - g  # sum_{j<k} g_j
    return torch.clamp(torch.minimum(g, 1 - before), min=0)
