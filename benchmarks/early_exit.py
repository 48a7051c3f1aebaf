"""Real early exit against the full network, in the same run: accuracy, GFLOPs, latency, throughput.

  python -m benchmarks.early_exit --checkpoint checkpoint/checkpoint_DEMO_0.75_confEE/best.pth \
      --data-set DEMO --device cpu --json out.json

Full network = the plain GFNet path (patch embedding, every block, final head; no exit heads or gates).
Each threshold runs the EarlyExitEngine, which stops computing for the samples that have left.
"""
import argparse
import os
import sys

import torch

from benchmarks.common import latency_ms, measure_and_write, run_benchmark, throughput
from errors import OneLineParser
from evaluation.exit_cache import (DEFAULT_THRESHOLDS, collect_exit_outputs, per_exit_accuracy, sweep_point,
                                   threshold_sweep)
from evaluation.latency import spread_indices
from evaluation.operating_points import DEFAULT_BUDGET, choose, parse_budget
from jobs.flags import add_flag, positive, probability
from jobs.run_setup import resolve_device
from jobs.trained_run import RunArgs, reopen, reopen_data
from models.early_exit import EarlyExitEngine
from models.flops import exit_gflops
from models.gfnet import GFNet

NO_EXIT = 1.01  # above any gate probability: measures the engine's overhead when nobody leaves


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('benchmarks.early_exit', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, '--checkpoint', required=True, help='a dynn-stage checkpoint (best.pth)')
    add_flag(parser, '--data-set', default='DEMO', help='dataset_config.py entry for the validation images')
    add_flag(parser, '--data-path', default=None, help="default: the entry's default_data_path")
    add_flag(parser, '--device', default='cpu', help='cpu, cuda or cuda:N')
    add_flag(parser, '--threads', check=positive, type=int, default=None, help='CPU threads (default: torch default)')
    add_flag(parser, '--thresholds', check=probability, type=float, nargs='+', default=DEFAULT_THRESHOLDS)
    add_flag(parser, '--latency-images', check=positive, type=int, default=120,
                        help='images timed at batch 1, spread over the validation set')
    add_flag(parser, '--batch', check=positive, type=int, default=64, help='batch size of the throughput runs')
    add_flag(parser, '--rounds', check=positive, type=int, default=3,
             help='interleaved timing rounds; the best is kept')
    add_flag(parser, '--json', default=None, help='default: bench/early_exit_{device}.json')
    return parser


def load_validation_images(run_args: RunArgs, data_set: str,
                           data_path: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """All validation images of the split a run trained on, preprocessed, in memory: timing then measures the
    model, not the decoder."""
    val_set = reopen_data(run_args, data_set, data_path, need_train=False).val
    images, labels = zip(*(val_set[i] for i in range(len(val_set))))
    return torch.stack(images), torch.tensor(labels)


def benchmark(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device, None)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, model_args, _ = reopen(args.checkpoint)
    model.to(device)
    images, labels = load_validation_images(model_args, args.data_set, args.data_path)
    batches = [(images[i:i + args.batch], labels[i:i + args.batch]) for i in range(0, len(images), args.batch)]
    cache = collect_exit_outputs(model, batches, device)
    gflops = exit_gflops(model)
    singles = [images[i].unsqueeze(0).to(device) for i in spread_indices(len(images), args.latency_images)]
    big_batches = [x.to(device) for x, _ in batches]

    def full_network(x: torch.Tensor) -> torch.Tensor:
        return GFNet.forward(model, x)  # the plain backbone path: no exit heads, no gates

    runners = {'full': full_network}
    runners.update({threshold: EarlyExitEngine(model, threshold) for threshold in list(args.thresholds) + [NO_EXIT]})
    latency = {name: float('inf') for name in runners}
    median = dict(latency)
    rate = {name: 0.0 for name in runners}
    with torch.inference_mode():
        # Interleaved rounds, best of each: no configuration gains from running first or last on a CPU whose
        # clock and caches drift (timeit's reasoning: the minimum is the measurement least disturbed).
        for _ in range(args.rounds):
            for name, run in runners.items():
                measured = latency_ms(run, singles, device)
                latency[name] = min(latency[name], measured['mean'])
                median[name] = min(median[name], measured['median'])
                rate[name] = max(rate[name], throughput(run, big_batches, device))
    full = {'accuracy': per_exit_accuracy(cache)[-1], 'gflops': gflops[-1], 'latency_ms_bs1': latency['full'],
            'median_ms_bs1': median['full'], 'throughput_bs64': rate['full']}
    points = []
    for threshold in list(args.thresholds) + [NO_EXIT]:
        point = sweep_point(cache, threshold, gflops)
        points.append({'threshold': threshold, 'accuracy': point['accuracy'],
                       'gflops': point['expected_gflops'], 'exit_share': point['exit_share'],
                       'latency_ms_bs1': latency[threshold], 'median_ms_bs1': median[threshold],
                       'throughput_bs64': rate[threshold], 'speedup_bs1': full['latency_ms_bs1'] / latency[threshold],
                       'median_speedup_bs1': full['median_ms_bs1'] / median[threshold],
                       'speedup_bs64': rate[threshold] / full['throughput_bs64'],
                       'flop_bound': gflops[-1] / point['expected_gflops']})
    return {'device': torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu',
            'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(), 'checkpoint': args.checkpoint,
            'rounds': args.rounds,
            'chosen_threshold': choose(threshold_sweep(cache, args.thresholds, gflops), parse_budget(DEFAULT_BUDGET),
                                       full['accuracy'])['threshold'],
            'num_images': len(images), 'full': full, 'points': [p for p in points if p['threshold'] != NO_EXIT],
            'no_exit_overhead': 1 - points[-1]['throughput_bs64'] / full['throughput_bs64'],
            'no_exit_overhead_bs1': points[-1]['latency_ms_bs1'] / full['latency_ms_bs1'] - 1}


def format_table(result: dict) -> str:
    full = result['full']
    lines = [f"device {result['device']}, {result['threads']} threads, {result['num_images']} images",
             'batch-1 latency is the mean per image (median in brackets: it flatters early exit)',
             f"{'threshold':>9} {'acc %':>7} {'GFLOPs':>7} {'ms bs1':>15} {'img/s bs64':>10} {'x bs1':>6} "
             f"{'x bs64':>6} {'FLOP bound':>10} {'% of bound':>10}",
             f"{'full':>9} {full['accuracy']:7.2f} {full['gflops']:7.3f} {full['latency_ms_bs1']:7.2f} "
             f"({full['median_ms_bs1']:5.2f}) {full['throughput_bs64']:10.1f} {1:6.2f} {1:6.2f} {1:10.2f}"]
    for p in result['points']:
        lines.append(f"{p['threshold']:9.2f} {p['accuracy']:7.2f} {p['gflops']:7.3f} {p['latency_ms_bs1']:7.2f} "
                     f"({p['median_ms_bs1']:5.2f}) {p['throughput_bs64']:10.1f} {p['speedup_bs1']:6.2f} "
                     f"{p['speedup_bs64']:6.2f} "
                     f"{p['flop_bound']:10.2f} {100 * p['speedup_bs1'] / p['flop_bound']:9.0f}%")
    lines.append(f"cheapest threshold within 1 point of full accuracy: {result['chosen_threshold']:.2f}")
    lines.append(f"engine overhead with no exit firing: {100 * result['no_exit_overhead']:.1f}% at batch "
                 f"{64}, {100 * result['no_exit_overhead_bs1']:.1f}% at batch 1")
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_benchmark(get_args_parser(), argv, lambda args: measure_and_write(
        'early_exit', args.json, 'early_exit_' + args.device.replace(':', '') + '.json', lambda: benchmark(args),
        format_table))


if __name__ == '__main__':
    sys.exit(main())
