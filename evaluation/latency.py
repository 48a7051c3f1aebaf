"""Batch-1 latency of early exit on this device: a per-segment table, the expected latency it predicts for any
exit shares, and the measured mean of real early exit over images, to set beside the prediction.

A mean, not a median: when most images leave at the first exit the median is the first exit's time and hides
the slow images, while the mean is what a stream of images costs.
"""
import logging
import statistics
import time
from itertools import accumulate

import torch

from models.early_exit import EarlyExitEngine
from models.early_exit_net import EarlyExitNetwork
from runtime.distributed import all_reduce_sum, synchronize

logger = logging.getLogger(__name__)


# A round whose total is this factor off the median round's disagrees with it; past a third of the rounds
# disagreeing, the median itself is doubtful (a few stalled rounds are what the median is there to ignore).
ROUNDS_DISAGREE = 2.0


@torch.inference_mode()
def segment_latency_ms(model: EarlyExitNetwork, image: torch.Tensor, device: torch.device, seconds: float = 2.0,
                       repeats: tuple[int, int] = (7, 30), warmup: int = 2) -> list[float]:
    """Median ms of each segment at batch 1, the way the early-exit engine runs it: the blocks up to exit k, its
    head and gate, and the host-side decision whether the sample leaves. Runs rounds over all segments (so a
    stall of the machine hits one round, not one segment's every sample) between repeats[0] and repeats[1]
    times, stopping at the first past `seconds`; the median of the rounds ignores a minority of stalled ones,
    and a warning says when the rounds disagree so much that the median itself is doubtful."""
    model.eval()
    image = image[:1].to(device)
    times = [[] for _ in range(model.num_exits)]
    started = time.perf_counter()
    for step in range(warmup + repeats[1]):
        tokens = image
        for k in range(model.num_exits):
            synchronize(device)
            begin = time.perf_counter()
            tokens, _, gate_logits = model.forward_segment(k, tokens)
            if gate_logits is not None:
                bool(torch.sigmoid(gate_logits)[0] >= 0.5)  # the engine's host decision (a device sync)
            synchronize(device)
            if step >= warmup:
                times[k].append(1000 * (time.perf_counter() - begin))
        if step + 1 - warmup >= repeats[0] and time.perf_counter() - started > seconds:
            break
    totals = [sum(round_ms) for round_ms in zip(*times)]
    middle = statistics.median(totals)
    off = [t for t in totals if not middle / ROUNDS_DISAGREE <= t <= middle * ROUNDS_DISAGREE]
    if 3 * len(off) > len(totals):
        logger.warning('the batch-1 latency rounds disagree (%d of %d rounds more than %gx off the median %.1f ms, '
                       'from %.1f to %.1f ms): the machine was busy, so the latency table and a --budget latency-ms= '
                       'choice may be off; evaluate again on an idle machine', len(off), len(totals), ROUNDS_DISAGREE,
                       middle, min(totals), max(totals))
    return [statistics.median(t) for t in times]


def cumulative_ms(segment_ms: list[float]) -> list[float]:
    """ms to reach and leave at each exit: the sum of the segments up to it."""
    return list(accumulate(segment_ms))


def latency_exit_costs(model: EarlyExitNetwork) -> list[float]:
    """Each exit's batch-1 latency here (`segment_latency_ms` summed up to it) as a share of the full network's,
    so the final exit costs 1: `--exit-costs latency`, the gates trading against what a user waits. Under
    torchrun the ranks' times are summed first, so every rank trains against one vector."""
    param = next(model.parameters())
    was_training = model.training
    image = torch.zeros(1, 3, *model.input_size, device=param.device, dtype=param.dtype)
    measured = cumulative_ms(segment_latency_ms(model, image, param.device))
    model.train(was_training)
    cumulative = all_reduce_sum(torch.tensor(measured, dtype=torch.float64, device=param.device))  # over ranks
    return (cumulative / cumulative[-1]).tolist()


@torch.inference_mode()
def measured_early_exit_ms(model: EarlyExitNetwork, images: list[torch.Tensor], device: torch.device, threshold: float,
                           seconds: float = 5.0, min_images: int = 8, warmup: int = 2) -> dict:
    """Real early exit at batch 1 over `images` (each (1, 3, H, W)), stopping after `seconds` once min_images
    ran: mean and median ms per image, and each image's exit and prediction."""
    engine = EarlyExitEngine(model, threshold)
    for image in images[:warmup]:
        engine(image.to(device))
    times, exits, predictions = [], [], []
    started = time.perf_counter()
    for image in images:
        image = image.to(device)
        synchronize(device)
        begin = time.perf_counter()
        result = engine(image)
        synchronize(device)
        times.append(1000 * (time.perf_counter() - begin))
        exits.append(int(result.exit_index[0]))
        predictions.append(int(result.predictions[0]))
        if len(times) >= min_images and time.perf_counter() - started > seconds:
            break
    return {'mean_ms': statistics.fmean(times), 'median_ms': statistics.median(times), 'images': len(times),
            'exit_index': exits, 'predictions': predictions}


def spread_indices(total: int, count: int) -> list[int]:
    """Up to `count` indices evenly spaced over range(total) (validation sets are often ordered by class, so
    the first images would all be one class)."""
    step = total / max(min(count, total), 1)
    return sorted({int(i * step) for i in range(min(count, total))})

