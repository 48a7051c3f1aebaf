"""Shared timing helpers: synchronised wall-clock timing, thread settings, writing results as JSON."""
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from errors import exit_code
from jobs.outputs import check_output_file
from runtime.atomic import save_json
from runtime.distributed import synchronize

# Default output folder, relative to the working directory and git-ignored: a run never rewrites the
# measurements committed under benchmarks/results/ unless --json names them.
DEFAULT_DIR = Path('bench')

# Stage 0 from scratch on small data (DEMO, DIGITS): the values it trained with before its defaults became GFNet's
# transfer recipe, whose lr scaled to the batch, long warm-up and Mixup/CutMix cost these short runs accuracy
# (docs/RESULTS.md, "Stage 0's recipe on small data"). example_usage.sh and the README spell the same values out.
SMALL_DATA_BACKBONE = ['--lr', '2e-3', '--min-lr', '1e-5', '--warmup-epochs', '1', '--warmup-lr', '1e-3',
                       '--lr-base-batch', '0', '--wd', '0.05', '--clip-grad', '0', '--mixup', '0', '--cutmix', '0']


def latency_ms(fn: Callable, inputs: list[torch.Tensor], device: torch.device, warmup: int = 10) -> dict:
    """Wall-clock ms of fn(x) over `inputs` (one call each, after `warmup` calls): the mean, which is what a
    stream of images costs, and the median, which early exit flatters when most images leave at one exit."""
    for x in inputs[:warmup]:
        fn(x)
    times = []
    for x in inputs:
        synchronize(device)
        started = time.perf_counter()
        fn(x)
        synchronize(device)
        times.append((time.perf_counter() - started) * 1e3)
    return {'mean': statistics.fmean(times), 'median': statistics.median(times)}


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


def json_path(path: str | None, default_name: str) -> Path:
    """Where a benchmark writes its JSON: --json, else bench/`default_name`; checked before the benchmark runs,
    so it never replaces a file that is not an earlier benchmark JSON."""
    return check_output_file(Path(path) if path else DEFAULT_DIR / default_name, 'benchmark', '--json')


def write_json(data: dict, path: Path, benchmark: str) -> Path:
    """Write results atomically, marked with the benchmark's name (how a later run recognises the file)."""
    return save_json(path, {'benchmark': benchmark, **data})


def measure_and_write(benchmark: str, json_arg: str | None, default_name: str, measure: Callable[[], dict],
                      format_table: Callable[[dict], str]) -> int:
    """A benchmark's main: check the JSON path, measure, print the table, write the JSON; the exit code."""
    def run() -> None:
        path = json_path(json_arg, default_name)
        result = measure()
        print(format_table(result))
        print(f"written: {write_json(result, path, benchmark)}")
    return exit_code(run)
