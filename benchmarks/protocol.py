"""Multi-seed protocol runs, as remote-sensing papers report: for each split seed, train the backbone, the exits and
gates, evaluate; then the mean and standard deviation over seeds of the full network's accuracy, the accuracy at the
threshold --eval chose, the FLOPs that threshold saves and the measured batch-1 speed-up of real early exit (the
full network's batch-1 time over real early exit's mean time per image). A stage that already finished is reused and
an interrupted one resumed, so a killed protocol run picks up where it stopped.

  python -m benchmarks.protocol --data-set UCM --data-path data/UCM --train-ratio 0.8 --seeds 0 1 2 \\
      --backbone-flags "--num_epoch 100" --dynn-flags "--num_epoch 50" [flags for every stage]

Each seed's run lives in OUT/seed{S} (--seed and --split-seed both S); the table goes to
OUT/protocol_{dataset}_r{ratio}.json and .md. The backbone stage runs stage 0's defaults, GFNet's transfer recipe
for fine-tuning real data from ImageNet weights (pass them in --backbone-flags: --checkpoint-path weights/...);
a short run from scratch on small data wants benchmarks/common.py's SMALL_DATA_BACKBONE values there instead.
"""
import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

from data_loader_help import default_train_ratio
from errors import GFNetDynnError, OneLineParser, exit_code
from jobs.flags import add_flag, check_ranges, non_negative, split_ratio
from jobs.outputs import check_output_file
from jobs.run_setup import backbone_run_folder, dynn_run_folder
from main_dynn import main as run_main
from runtime.atomic import save_json, save_text

METRICS = (('full_accuracy', 'full network accuracy (%)'), ('chosen_accuracy', 'accuracy at the chosen threshold (%)'),
           ('flops_saving', 'FLOPs saved (%)'), ('speedup', 'batch-1 speed-up, mean latency (x)'))


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('python -m benchmarks.protocol', description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, '--data-set', required=True, help='a dataset_config.py entry')
    add_flag(parser, '--data-path', default=None, help="default: the entry's default_data_path")
    add_flag(parser, '--train-ratio', check=split_ratio, type=float, default=None,
             help="default: the entry's first protocol ratio")
    add_flag(parser, '--seeds', check=non_negative, type=int, nargs='+', default=[0, 1, 2],
             help='split (and training) seeds')
    add_flag(parser, '--backbone-flags', default='', help='flags for the backbone stage only, quoted')
    add_flag(parser, '--dynn-flags', default='', help='flags for the exit stages only, quoted')
    add_flag(parser, '--arch', default='GFNet-xs-dynn', help='--arch of every stage')
    add_flag(parser, '--ce_ic_tradeoff', check=non_negative, type=float, default=0.75, help='lambda of the exit stages')
    add_flag(parser, '--output-dir', default='bench/protocol', help='one folder per seed, and the tables')
    return parser


def _finished(last: Path) -> bool:
    checkpoint = torch.load(last, map_location='cpu', weights_only=True)
    return checkpoint['epoch'] + 1 >= checkpoint['args']['num_epoch']


def run_stage(folder: Path, argv: list[str]) -> None:
    """Run a stage unless its folder holds a finished run; resume an unfinished one."""
    last = folder / 'last.pth'
    if last.is_file() and _finished(last):
        print(f'already trained: {folder}')
        return
    if run_main(['--resume', str(last)] if last.is_file() else argv) != 0:
        raise GFNetDynnError(f'the stage writing {folder} failed (its error is above); fix it and run the protocol '
                             f'again: finished stages are kept')


def run_seed(args: argparse.Namespace, seed: int, ratio: float, common: list[str]) -> dict:
    """Backbone, exits and evaluation of one split seed; returns the seed's metrics."""
    out = Path(args.output_dir) / f'seed{seed}'
    shared = ['--data-set', args.data_set, *(['--data-path', args.data_path] if args.data_path else []),
              '--arch', args.arch, '--seed', str(seed), *common, '--output-dir', str(out)]
    backbone = backbone_run_folder(out, args.data_set, args.arch)
    run_stage(backbone, ['--stage', 'backbone', *shared, '--train-ratio', str(ratio), '--split-seed', str(seed),
                         *shlex.split(args.backbone_flags)])
    dynn = dynn_run_folder(out, args.data_set, args.ce_ic_tradeoff, args.arch)
    run_stage(dynn, [*shared, '--checkpoint-path', str(backbone / 'best.pth'), '--ce_ic_tradeoff',
                     str(args.ce_ic_tradeoff), *shlex.split(args.dynn_flags)])
    results_path = dynn / 'results.json'  # --eval's default: beside the checkpoint
    if not results_path.is_file() or results_path.stat().st_mtime < (dynn / 'best.pth').stat().st_mtime:
        data = ['--data-set', args.data_set, *(['--data-path', args.data_path] if args.data_path else [])]
        if run_main([*data, *_inference_flags(common), '--eval', '--checkpoint-path', str(dynn / 'best.pth')]) != 0:
            raise GFNetDynnError(f'--eval of {dynn / "best.pth"} failed (its error is above)')
    results = json.loads(results_path.read_text())
    real = results['real_early_exit']
    return {'seed': seed, 'full_accuracy': results['full_accuracy'], 'chosen_accuracy': results['chosen']['accuracy'],
            'chosen_threshold': results['chosen']['threshold'], 'flops_saving': 100 * results['chosen']['flops_saving'],
            'speedup': results['latency_table_ms']['cumulative'][-1] / max(real['mean_ms'], 1e-9),
            'split_hash': results['split']['hash'], 'results': str(results_path)}


def _inference_flags(common: list[str]) -> list[str]:
    """Of the flags for every stage, those --eval takes (how data is read and run, not how it trains)."""
    keep = {'--batch', '--num_workers', '--device', '--input-size', '--patch-size', '--skip-bad-images', '--amp'}
    flags, i = [], 0
    while i < len(common):
        takes_value = i + 1 < len(common) and not common[i + 1].startswith('--')
        if common[i] in keep:
            flags += common[i:i + 2] if takes_value else common[i:i + 1]
        i += 2 if takes_value else 1
    return flags


def summarise(rows: list[dict]) -> dict:
    """mean and (sample) standard deviation of every metric over the seeds."""
    summary = {}
    for key, _ in METRICS:
        values = [row[key] for row in rows]
        summary[key] = {'mean': statistics.fmean(values), 'std': statistics.stdev(values) if len(values) > 1 else 0.0}
    return summary


def markdown(data_set: str, ratio: float, rows: list[dict], summary: dict) -> str:
    lines = [f'{data_set}, training share {ratio:g}, split seeds {", ".join(str(r["seed"]) for r in rows)}', '',
             '| measure | mean ± std | ' + ' | '.join(f'seed {r["seed"]}' for r in rows) + ' |',
             '|---|---|' + '---|' * len(rows)]
    for key, label in METRICS:
        lines.append(f'| {label} | {summary[key]["mean"]:.2f} ± {summary[key]["std"]:.2f} | '
                     + ' | '.join(f'{r[key]:.2f}' for r in rows) + ' |')
    return '\n'.join(lines) + '\n'


def run(args: argparse.Namespace, common: list[str]) -> dict:
    ratio = args.train_ratio if args.train_ratio is not None else default_train_ratio(args.data_set)
    json_path = check_output_file(Path(args.output_dir) / f'protocol_{args.data_set}_r{ratio:g}.json', 'benchmark',
                                  '--output-dir')
    md_path = json_path.with_suffix('.md')
    if md_path.exists() and not json_path.exists():  # the table is replaced only together with its JSON
        raise GFNetDynnError(f'{md_path} exists and is not a table this benchmark wrote; pass another --output-dir')
    rows = [run_seed(args, seed, ratio, common) for seed in args.seeds]
    summary = summarise(rows)
    save_json(json_path, {'benchmark': 'protocol', 'dataset': args.data_set, 'train_ratio': ratio,
                          'seeds': args.seeds, 'runs': rows, 'summary': summary})
    table = markdown(args.data_set, ratio, rows, summary)
    save_text(md_path, table)
    print(table + f'written: {json_path} and {md_path}')
    return summary


def main(argv: list[str] | None = None) -> int:
    """Entry point: unknown flags go to every stage; a user mistake prints one line and exits 2."""
    parser = get_args_parser()

    def parsed_run() -> None:
        args, common = parser.parse_known_args(argv)
        check_ranges(parser, args)
        run(args, common)
    return exit_code(parsed_run)


if __name__ == '__main__':
    sys.exit(main())
