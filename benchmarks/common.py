"""Shared timing helpers: synchronised wall-clock timing, thread settings, writing results as JSON."""
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from learning_helpers.checkpoint import save_json
from learning_helpers.distributed import synchronize

RESULTS_DIR = Path(__file__).resolve().parent / 'results'


def median_latency_ms(fn: Callable, inputs: list[torch.Tensor], device: torch.device, warmup: int = 10) -> float:
    """Median wall-clock ms of fn(x) over `inputs` (one call each), after `warmup` calls."""
    for x in inputs[:warmup]:
        fn(x)
    times = []
    for x in inputs:
        synchronize(device)
        started = time.perf_counter()
        fn(x)
        synchronize(device)
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def throughput(fn: Callable, batches: list[torch.Tensor], device: torch.device, repeats: int = 1) -> float:
    """Images per second of fn over `batches` (after one warm-up batch)."""
    fn(batches[0])
    synchronize(device)
    started = time.perf_counter()
    images = 0
    for _ in range(repeats):
        for x in batches:
            fn(x)
            images += x.shape[0]
    synchronize(device)
    return images / (time.perf_counter() - started)


def write_json(data: dict, path: str | Path | None, default_name: str) -> Path:
    """Write results to `path`, or to benchmarks/results/`default_name` (atomically, like every results file)."""
    return save_json(Path(path) if path else RESULTS_DIR / default_name, data)
