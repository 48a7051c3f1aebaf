"""λ sweeps: the accuracy / GFLOPs fronts of several early-exit checkpoints (trained with different
--ce_ic_tradeoff) on the same validation images, in one table and one plot.

  python -m benchmarks.tradeoff checkpoint/checkpoint_DEMO_0.1_confEE/best.pth \
      checkpoint/checkpoint_DEMO_0.75_confEE/best.pth --data-set DEMO

For each checkpoint the table gives its full-network accuracy, the size of its front, the most accurate point
within 40, 60 and 80% of the full network's GFLOPs, and the cheapest point within 1 point of full accuracy.
"""
import argparse
import sys
from pathlib import Path

import torch

from benchmarks.common import json_path, run_benchmark, write_json
from data_loader_help import build_loaders
from errors import GFNetDynnError, OneLineParser
from evaluation.exit_cache import collect_exit_outputs, per_exit_accuracy
from evaluation.operating_points import Budget, all_points, choose, pareto_front
from jobs.flags import add_flag, positive
from jobs.outputs import check_output_file
from jobs.trained_run import reopen, reopen_data
from models.flops import exit_gflops

COMPUTE_SHARES = (0.4, 0.6, 0.8)  # the table's GFLOPs budgets, as shares of the full network


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('benchmarks.tradeoff', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, 'checkpoints', nargs='+', help='dynn-stage checkpoints (best.pth) of one data set')
    add_flag(parser, '--data-set', default='DEMO', help='dataset_config.py entry of the validation images')
    add_flag(parser, '--data-path', default=None, help="default: the entry's default_data_path")
    add_flag(parser, '--batch', check=positive, type=int, default=96)
    add_flag(parser, '--json', default=None, help='default: bench/tradeoff.json')
    add_flag(parser, '--plot', default=None, help='default: the JSON path with .png')
    return parser


def checkpoint_front(path: str, data_set: str, data_path: str | None, batch: int) -> dict:
    """One checkpoint's λ, per-exit GFLOPs and its front on the validation images of its recorded split."""
    model, model_args, _ = reopen(path)
    data = reopen_data(model_args, data_set, data_path, need_train=False)
    _, loader = build_loaders(None, data.val, batch, num_workers=0, seed=0)
    cache = collect_exit_outputs(model, loader, torch.device('cpu'))
    gflops = exit_gflops(model)
    points = all_points(cache, 'gate', gflops)
    full = per_exit_accuracy(cache)[-1]
    return {'checkpoint': path, 'tradeoff': model_args.ce_ic_tradeoff, 'num_val': int(cache.targets.numel()),
            'full_accuracy': full, 'full_gflops': gflops[-1], 'front': pareto_front(points),
            'at_compute_share': {str(share): choose(points, Budget('gflops', share * gflops[-1]), full)
                                 for share in COMPUTE_SHARES if share * gflops[-1] >= gflops[0]},
            'within_one_point': choose(points, Budget('acc-drop', 1.0), full)}


def format_table(rows: list[dict]) -> str:
    header = f"{'lambda':>7} {'full %':>7} {'front':>5} " + ' '.join(
        f"{f'<={int(100 * s)}% GFLOPs':>14}" for s in COMPUTE_SHARES) + f" {'within 1 point':>22}"
    lines = [header]
    for row in rows:
        cells = []
        for share in COMPUTE_SHARES:
            point = row['at_compute_share'].get(str(share))
            cells.append(f"{point['accuracy']:13.2f}%" if point else f"{'-':>14}")
        best = row['within_one_point']
        lines.append(f"{row['tradeoff']!s:>7} {row['full_accuracy']:7.2f} {len(row['front']):5d} " + ' '.join(cells)
                     + f" {best['accuracy']:6.2f}% at {100 * best['expected_gflops'] / row['full_gflops']:5.1f}% "
                       f"GFLOPs")
    return '\n'.join(lines)


def plot_fronts(rows: list[dict], path: Path) -> Path:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    for row in rows:
        front = row['front']
        ax.step([p['expected_gflops'] for p in front], [p['accuracy'] for p in front], '.-', where='post',
                label=f"λ = {row['tradeoff']}")
    ax.set_xlabel('expected GFLOPs per image')
    ax.set_ylabel('validation accuracy (%)')
    ax.set_title('accuracy / compute fronts by --ce_ic_tradeoff')
    ax.grid(alpha=0.3)
    ax.legend(loc='lower right')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> None:
        json_file = json_path(args.json, 'tradeoff.json')
        plot = check_output_file(Path(args.plot) if args.plot else json_file.with_suffix('.png'), 'plot', '--plot')
        for path in args.checkpoints:
            if not Path(path).is_file():
                raise GFNetDynnError(f'checkpoint {path} does not exist; pass best.pth files of the dynn stage')
        rows = [checkpoint_front(path, args.data_set, args.data_path, args.batch) for path in args.checkpoints]
        rows.sort(key=lambda row: (row['tradeoff'] is None, row['tradeoff'] or 0))
        print(format_table(rows))
        print(f"written: {write_json({'data_set': args.data_set, 'checkpoints': rows}, json_file, 'tradeoff')} "
              f'{plot_fronts(rows, plot)}')
    return run_benchmark(get_args_parser(), argv, run)


if __name__ == '__main__':
    sys.exit(main())
