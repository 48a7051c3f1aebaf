"""Real early exit: run an early-exit network segment by segment and stop computing for samples that have left.

The simulated sweep in evaluation computes every exit for every sample; this engine is what saves time.
A sample leaves at the first intermediate exit whose gate probability is >= threshold, else at the final
head (`models.exit_rule`, the sweep's rule too), so the two give the same predictions.
"""
from typing import NamedTuple

import torch

from models.early_exit_net import EarlyExitNetwork
from models.exit_rule import fires


class EarlyExitResult(NamedTuple):
    predictions: torch.Tensor  # (B,) class index
    exit_index: torch.Tensor  # (B,) 0..G, G = final head
    logits: torch.Tensor  # (B, C) logits of the exit each sample left at


class EarlyExitEngine:
    """Callable: images (B, 3, H, W) -> EarlyExitResult. At batch > 1 the batch shrinks to the samples
    still inside after each exit (one index-select per exit); at batch 1 it returns at the first exit
    whose gate fires."""

    def __init__(self, model: EarlyExitNetwork, threshold: float):
        self.model = model.eval()
        self.threshold = threshold

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> EarlyExitResult:
        model = self.model
        batch = images.shape[0]
        tokens = images  # segment 0 takes the images, every later one the features before it (tokens or maps)
        remaining = torch.arange(batch, device=images.device)  # original indices of samples still inside
        exit_index = torch.empty(batch, dtype=torch.long, device=images.device)
        out_logits = None
        final = len(model.exit_positions)
        for k in range(model.num_exits):
            tokens, logits, gate_logits = model.forward_segment(k, tokens)
            if out_logits is None:
                out_logits = logits.new_empty(batch, logits.shape[-1])
            if k == final:
                leaving = torch.ones_like(remaining, dtype=torch.bool)
            else:
                leaving = fires(torch.sigmoid(gate_logits), self.threshold)
            # The engine's one host decision per exit (documented exception to "no .item() in forward"):
            # whether anyone left decides whether to shrink, and whether anyone is left decides to stop.
            num_leaving = int(leaving.sum())
            if num_leaving == 0:
                continue
            left = remaining[leaving]
            out_logits[left] = logits[leaving]
            exit_index[left] = k
            if num_leaving == remaining.numel():
                break
            staying = ~leaving
            tokens, remaining = tokens[staying], remaining[staying]
        return EarlyExitResult(out_logits.argmax(dim=-1), exit_index, out_logits)
