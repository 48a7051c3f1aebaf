"""Shared timing helpers: synchronised wall-clock timing, thread settings, writing results as JSON."""
import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from errors import GFNetDynnError, exit_code
from jobs.flags import check_ranges
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
    """Write results atomically, marked with the benchmark's name (how a later run recognises the file). A result
    holding NaN or inf measured nothing there: it is refused, and an earlier JSON at `path` is kept."""
    bad = non_finite_numbers(data)
    if bad:
        raise GFNetDynnError(f"{benchmark} measured nothing usable ({', '.join(bad[:3])} not finite): {path} is not "
                             f'written (an earlier file there is kept)')
    return save_json(path, {'benchmark': benchmark, **data})


def non_finite_numbers(tree, prefix: str = '') -> list[str]:
    """The dotted keys of the NaN and inf floats in nested dicts and lists."""
    if isinstance(tree, float):
        return [] if math.isfinite(tree) else [prefix]
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    return [key for name, value in items for key in non_finite_numbers(value, f'{prefix}.{name}'.lstrip('.'))]


def measure_and_write(benchmark: str, json_arg: str | None, default_name: str, measure: Callable[[], dict],
                      format_table: Callable[[dict], str]) -> None:
    """Check the JSON path, measure, print the table, write the JSON."""
    path = json_path(json_arg, default_name)
    result = measure()
    print(format_table(result))
    print(f"written: {write_json(result, path, benchmark)}")


def run_benchmark(parser: argparse.ArgumentParser, argv: list[str] | None,
                  work: Callable[[argparse.Namespace], object]) -> int:
    """A benchmark's main, as main_dynn.py's: the flags parsed and held to their declared ranges, then work(args);
    a user mistake anywhere is one `error:` line and exit code 2; the exit code."""
    def run() -> None:
        args = parser.parse_args(argv)
        check_ranges(parser, args)
        work(args)
    return exit_code(run)
