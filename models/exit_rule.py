"""The exit rule: an image leaves at the first exit whose gate probability reaches the threshold, else at the final
head. The engine, the sweep, `--eval` and training's validation all decide through it.

The threshold is compared in the probabilities' dtype (float32 for every gate), so a threshold that float32 rounds,
such as 0.7, decides alike everywhere; the torch-free ONNX runner keeps a numpy twin (`onnx_runner.fires`).
"""
import torch


def fires(probs: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """Boolean, same shape as `probs` (broadcast with `threshold`): which probabilities reach the threshold."""
    return probs >= torch.as_tensor(threshold, dtype=probs.dtype, device=probs.device)


def first_exit(probs: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """(..., G, N) gate probabilities -> (..., N) exit index: the first k that fires, else G (the final head)."""
    # the first k that fires is the count of exits before any has fired: a cumulative max and a sum, several
    # times faster on CPU than a first-index argmax over a (..., G + 1, N) copy
    fired_so_far = fires(probs, threshold).to(torch.uint8).cummax(dim=-2).values
    return (fired_so_far == 0).sum(dim=-2)
