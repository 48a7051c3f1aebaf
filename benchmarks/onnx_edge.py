"""The ONNX runner's early exit on this CPU, float and int8, against the PyTorch engine, in the same run.

  python -m benchmarks.onnx_edge --export export/DEMO --data-set DEMO

Needs an export made with --quantize int8. Reports, on the validation images of the split the checkpoint
trained on: accuracy, batch-1 median and mean ms per image with early exit (the manifest's threshold) and
without (every segment runs), and ms per segment at batch 1. Each timing is the best of --rounds interleaved
rounds (as in benchmarks.early_exit). The PyTorch row is models/early_exit.py's EarlyExitEngine on the
checkpoint the export came from, with the same thread count.
"""
import argparse
import functools
import os
import sys

import numpy as np
import torch

from benchmarks.common import latency_ms, measure_and_write, run_benchmark
from benchmarks.early_exit import load_validation_images
from deployment.onnx_runner import OnnxEarlyExit, read_manifest
from errors import GFNetDynnError, OneLineParser
from evaluation.latency import spread_indices
from jobs.flags import add_flag, positive, probability
from jobs.trained_run import reopen
from models.early_exit import EarlyExitEngine

NO_EXIT = 1.01  # above any gate probability: every sample runs every segment
TARGETS = ('int8 accuracy within 1 point of float', 'int8 early exit >= 1.5x faster than float without early exit',
           'ONNX early exit no slower than the PyTorch engine')


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('benchmarks.onnx_edge', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, '--export', required=True, help='folder written by --export onnx --quantize int8')
    add_flag(parser, '--data-set', default='DEMO', help='dataset_config.py entry for the validation images')
    add_flag(parser, '--data-path', default=None, help="default: the entry's default_data_path")
    add_flag(parser, '--checkpoint', default=None, help="the PyTorch model to compare; default: the manifest's")
    add_flag(parser, '--threshold', check=probability, type=float, default=None,
                        help="exit threshold of the early-exit rows (default: the manifest's)")
    add_flag(parser, '--threads', check=positive, type=int, default=1,
                        help='threads of onnxruntime and torch alike (1: a small board, and steady timings)')
    add_flag(parser, '--latency-images', check=positive, type=int, default=200,
             help='validation images timed at batch 1')
    add_flag(parser, '--rounds', check=positive, type=int, default=3,
             help='interleaved timing rounds; the best is kept')
    add_flag(parser, '--json', default=None, help='default: bench/onnx_edge.json')
    return parser


def _best(previous: dict | None, measured: dict) -> dict:
    """Keep the round with the lower mean per image (the least disturbed one), with its median beside it."""
    current = {'mean_ms': measured['mean'], 'median_ms': measured['median']}
    return current if previous is None or current['mean_ms'] < previous['mean_ms'] else previous


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    return float(100.0 * (predictions == labels).mean())


def benchmark(args: argparse.Namespace) -> dict:
    """Accuracy of float and int8 ONNX early exit (and the PyTorch engine) over the validation set, then their
    batch-1 latency and each segment's, in interleaved rounds."""
    manifest, checkpoint_path = _check_inputs(args)
    torch.set_num_threads(args.threads)
    model, model_args, _ = reopen(checkpoint_path)
    if model_args.input_size != manifest['input_size']:
        raise GFNetDynnError(f"{checkpoint_path} takes {model_args.input_size} px images, the export "
                             f"{manifest['input_size']}; pass the checkpoint the export was made from")
    images, labels = load_validation_images(model_args, args.data_set, args.data_path)
    threshold = manifest['threshold'] if args.threshold is None else args.threshold
    runners = {p: OnnxEarlyExit(args.export, num_threads=args.threads, precision=p) for p in ('float', 'int8')}
    engine = EarlyExitEngine(model, threshold)
    picked = spread_indices(len(images), args.latency_images)  # validation sets are often ordered by class
    result = {'device': 'cpu', 'threads': args.threads, 'cpu_count': os.cpu_count(), 'export': args.export,
              'checkpoint': str(checkpoint_path), 'threshold': threshold, 'num_images': len(images),
              'latency_images': len(picked), 'rounds': args.rounds, 'int8': manifest.get('int8'),
              'rows': _accuracy_rows(runners, engine, images, labels, threshold)}
    latency = _latency(runners, engine, images, picked, threshold, args.rounds)
    for name, row in result['rows'].items():
        row.update(latency[name])
    result['segments_ms'] = {p: [latency[f'{p}_segment_{k}']['median_ms'] for k in range(runners[p].num_exits)]
                             for p in runners}
    rows = result['rows']
    result['targets'] = {
        TARGETS[0]: rows['int8_early_exit']['accuracy'] >= rows['float_early_exit']['accuracy'] - 1.0,
        TARGETS[1]: rows['float_no_exit']['mean_ms'] >= 1.5 * rows['int8_early_exit']['mean_ms'],
        TARGETS[2]: rows['float_early_exit']['mean_ms'] <= rows['pytorch_early_exit']['mean_ms'],
    }
    return result


def _check_inputs(args: argparse.Namespace) -> tuple[dict, str]:
    """The export's manifest and the checkpoint it was made from; one-line errors for what cannot work."""
    if args.threads < 1 or args.latency_images < 1 or args.rounds < 1:
        raise GFNetDynnError('--threads, --latency-images and --rounds must be at least 1')
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise GFNetDynnError(f'--threshold {args.threshold} must lie in [0, 1]')
    manifest = read_manifest(args.export)
    if 'int8_segments' not in manifest:
        raise GFNetDynnError(f'{args.export} holds no int8 segments; export with --export onnx --quantize int8')
    checkpoint_path = args.checkpoint or manifest.get('checkpoint')
    if not checkpoint_path:
        raise GFNetDynnError(f'{args.export}/manifest.json names no checkpoint; pass --checkpoint')
    return manifest, checkpoint_path


def _accuracy_rows(runners: dict, engine: EarlyExitEngine, images: torch.Tensor, labels: torch.Tensor,
                   threshold: float) -> dict:
    """Accuracy (and exit counts) of each runner with and without early exit, and of the PyTorch engine."""
    images_np, labels_np = images.numpy(), labels.numpy()
    batches = [images_np[i:i + 64] for i in range(0, len(images_np), 64)]
    rows = {}
    for precision, runner in runners.items():
        for name, t in (('early_exit', threshold), ('no_exit', NO_EXIT)):
            runner.threshold = t
            predictions, exits = (np.concatenate(parts) for parts in zip(*(runner.predict(x) for x in batches)))
            rows[f'{precision}_{name}'] = {'accuracy': _accuracy(predictions, labels_np),
                                           'exit_share': np.bincount(exits, minlength=runner.num_exits).tolist()}
    with torch.inference_mode():
        torch_result = torch.cat([engine(images[i:i + 64]).predictions for i in range(0, len(images), 64)])
    rows['pytorch_early_exit'] = {'accuracy': _accuracy(torch_result.numpy(), labels_np)}
    return rows


def _latency(runners: dict, engine: EarlyExitEngine, images: torch.Tensor, picked: list[int], threshold: float,
             rounds: int) -> dict:
    """Batch-1 mean and median ms of every configuration and of each segment alone, best of `rounds`
    interleaved rounds (no configuration gains from running first or last)."""
    singles = [images[i:i + 1].numpy() for i in picked]
    timed = {}  # name -> (function of one input, the inputs it is timed on)
    for precision, runner in runners.items():
        for name, t in (('early_exit', threshold), ('no_exit', NO_EXIT)):
            timed[f'{precision}_{name}'] = (functools.partial(_predict_at, runner, t), singles)
    segment_inputs = _segment_inputs(runners['float'], singles)
    for precision, runner in runners.items():
        for k in range(runner.num_exits):
            timed[f'{precision}_segment_{k}'] = (functools.partial(runner.run_segment, k), segment_inputs[k])
    timed['pytorch_early_exit'] = (engine, [images[i:i + 1] for i in picked])
    latency: dict[str, dict | None] = {name: None for name in timed}
    cpu = torch.device('cpu')
    with torch.inference_mode():
        for _ in range(rounds):
            for name, (fn, inputs) in timed.items():
                latency[name] = _best(latency[name], latency_ms(fn, inputs, cpu))
    return latency


def _predict_at(runner: OnnxEarlyExit, threshold: float, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    runner.threshold = threshold
    return runner.predict(images)


def _segment_inputs(runner: OnnxEarlyExit, singles: list[np.ndarray]) -> list[list[np.ndarray]]:
    """The input of every segment for each image, from the float chain: images, then each segment's tokens."""
    inputs = [singles]
    for k in range(runner.num_exits - 1):
        inputs.append([runner.run_segment(k, x)[0] for x in inputs[-1]])
    return inputs


def format_table(result: dict) -> str:
    lines = [f"cpu, {result['threads']} thread(s), {result['num_images']} validation images "
             f"({result['latency_images']} timed at batch 1), exit threshold {result['threshold']:g}",
             f"{'':22} {'acc %':>6} {'median ms':>9} {'mean ms':>8}  exit share"]
    for name, row in result['rows'].items():
        share = ' '.join(str(n) for n in row.get('exit_share', [])) or '-'
        lines.append(f"{name:22} {row['accuracy']:6.2f} {row['median_ms']:9.3f} {row['mean_ms']:8.3f}  {share}")
    lines.append('ms per segment at batch 1 (median of the segment alone): ' + '; '.join(
        f"{p} " + ' '.join(f'{ms:.3f}' for ms in values) for p, values in result['segments_ms'].items()))
    rows = result['rows']
    speedup = rows['float_no_exit']['mean_ms'] / rows['int8_early_exit']['mean_ms']
    versus_torch = rows['pytorch_early_exit']['mean_ms'] / rows['float_early_exit']['mean_ms']
    lines.append(f'mean ms per image: int8 early exit vs float without: {speedup:.2f}x faster; float ONNX early '
                 f'exit vs the PyTorch engine: {versus_torch:.2f}x faster')
    lines.extend(f"{'met' if ok else 'MISSED'}: {target}" for target, ok in result['targets'].items())
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(get_args_parser(), argv, lambda args: measure_and_write(
        'onnx_edge', args.json, 'onnx_edge.json', lambda: benchmark(args), format_table))


if __name__ == '__main__':
    sys.exit(main())
