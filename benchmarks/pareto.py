"""GFNet-Dynn against static timm baselines trained with the same recipe and input size, and against each of
those baselines with exits: accuracy against measured batch-1 CPU latency, against GFLOPs, and parameters, in one
process and one run.

  python -m benchmarks.pareto --data-set DEMO \
      --dynn-results checkpoint/checkpoint_DEMO_0.75_confEE/results.json [--epochs N]

Each baseline is trained by `main_dynn.py --stage backbone --arch NAME` under --output-dir (a finished run is
reused, an unfinished one resumed). Each timm baseline then gets exits: `main_dynn.py --stage dynn` from its
checkpoint with the GFNet-Dynn run's own dynn-stage recipe and lambda, then `--eval` (skip with --no-exits). The
early-exit points are each --eval front (or its sweep); their latency is measured here with the EarlyExitEngine
on the same images, so every latency comes from this process.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_DIR, json_path, latency_ms, write_json
from benchmarks.early_exit import load_validation_images
from dataset_config import DATASET_CONFIG
from errors import GFNetDynnError, exit_code
from evaluation.latency import spread_indices
from jobs.outputs import check_output_file
from jobs.run_setup import backbone_run_folder, dynn_run_folder
from jobs.trained_run import RunArgs, reopen
from models.early_exit import EarlyExitEngine
from models.flops import count_flops
from models.gfnet_dynn import GFNetDynn
from models.model_factory import build_backbone
from models.weights import load_state, read_checkpoint

BASELINES = ['mobilenetv3_small_100', 'mobilenetv3_large_100', 'resnet18', 'efficientnet_b0', 'GFNet-ti-dynn']
# The DEMO backbone recipe of example_usage.sh, for every baseline alike
RECIPE = ['--batch', '64', '--lr', '2e-3', '--min-lr', '1e-5', '--warmup-epochs', '1']
# What a baseline's exits are trained with: the GFNet-Dynn run's own values of these (its lambda included)
DYNN_RECIPE = {'batch': '--batch', 'num_epoch': '--num_epoch', 'max_warmup_epoch': '--max_warmup_epoch',
               'patience': '--patience', 'lr': '--lr', 'min_lr': '--min-lr', 'opt': '--opt', 'wd': '--wd',
               'ce_ic_tradeoff': '--ce_ic_tradeoff', 'transfer_ratio': '--transfer-ratio', 'gate': '--gate',
               'bilevel_batch_count': '--bilevel_batch_count'}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('benchmarks.pareto', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data-set', default='DEMO', choices=sorted(DATASET_CONFIG), help='dataset_config.py entry')
    parser.add_argument('--data-path', default=None, help="default: the entry's default_data_path")
    parser.add_argument('--dynn-results', required=True, help='results.json written by main_dynn.py --eval')
    parser.add_argument('--archs', nargs='+', default=BASELINES,
                        help='static baselines: timm names, or GFNet-*-dynn for the plain GFNet')
    parser.add_argument('--epochs', type=int, default=6, help='training epochs of every baseline')
    parser.add_argument('--no-exits', action='store_true',
                        help='only the static baselines: do not train and time each timm baseline with exits')
    parser.add_argument('--output-dir', default=str(DEFAULT_DIR / 'pareto'),
                        help='where the baselines are trained (checkpoint/backbone_{data}_{arch}/)')
    parser.add_argument('--latency-images', type=int, default=100, help='validation images timed at batch 1')
    parser.add_argument('--rounds', type=int, default=2, help='interleaved timing rounds; the best is kept')
    parser.add_argument('--threads', type=int, default=None, help='CPU threads (default: torch default)')
    parser.add_argument('--json', default=None, help='default: bench/pareto_{data}.json')
    parser.add_argument('--plot', default=None, help='default: the JSON path with .png')
    return parser


def read_dynn_points(path: Path) -> tuple[dict, list[dict]]:
    """(the results, its operating points): the `front` list if present, else the `sweep`."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise GFNetDynnError(f'--dynn-results {path} is not a readable JSON file ({type(error).__name__}); pass '
                             f'the results.json of main_dynn.py --eval') from error
    points = results.get('front') or results.get('sweep') if isinstance(results, dict) else None
    if not points or not all({'threshold', 'accuracy', 'expected_gflops'} <= set(p) for p in points):
        raise GFNetDynnError(f'--dynn-results {path} has no front or sweep of thresholds; pass the results.json '
                             f'of main_dynn.py --eval')
    return results, points


def dynn_checkpoint(results: dict, results_path: Path) -> Path:
    """The checkpoint --eval read: its recorded path, else best.pth beside the results (the default place)."""
    for candidate in (Path(results.get('checkpoint', '')), results_path.parent / 'best.pth'):
        if candidate.is_file():
            return candidate
    raise GFNetDynnError(f"--dynn-results {results_path}: its checkpoint {results.get('checkpoint')} is not there; "
                         f'run the benchmark from the folder --eval ran in')


def _run_main_dynn(command: list[str], what: str) -> None:
    started = time.perf_counter()
    main_dynn = Path(__file__).resolve().parent.parent / 'main_dynn.py'
    if subprocess.run([sys.executable, str(main_dynn), *command]).returncode != 0:
        raise GFNetDynnError(f'{what} failed (see above); fix it and run again: finished runs are reused')
    print(f'{what}: {time.perf_counter() - started:.0f} s', flush=True)


def _train_or_reuse(folder: Path, new_run: list[str], what: str) -> Path:
    """best.pth of the run in `folder`: reused when finished, resumed when interrupted, else started."""
    last = folder / 'last.pth'
    if last.is_file():
        checkpoint = read_checkpoint(last)
        if checkpoint['epoch'] + 1 >= checkpoint['args']['num_epoch']:
            print(f'reusing {folder} (trained for {checkpoint["args"]["num_epoch"]} epochs)', flush=True)
            return folder / 'best.pth'
        new_run = ['--resume', str(last)]
    _run_main_dynn(new_run, what)
    return folder / 'best.pth'


def train_baseline(arch: str, args: argparse.Namespace, input_size: int, patch_size: int) -> Path:
    """best.pth of `arch` trained by main_dynn.py: reused when finished, resumed when interrupted."""
    patch = ['--patch-size', str(patch_size)] if arch.startswith('GFNet-') else []
    data_path = ['--data-path', args.data_path] if args.data_path else []
    command = ['--stage', 'backbone', '--data-set', args.data_set, *data_path, '--arch', arch, *patch,
               '--input-size', str(input_size), '--num_epoch', str(args.epochs), *RECIPE,
               '--output-dir', args.output_dir]
    return _train_or_reuse(backbone_run_folder(args.output_dir, args.data_set, arch), command,
                           f'training the {arch} baseline')


def train_exits(arch: str, backbone: Path, args: argparse.Namespace, dynn_args: RunArgs) -> Path:
    """results.json of `arch` with exits: stages 1-2 from its baseline checkpoint with the GFNet-Dynn run's
    dynn-stage recipe and lambda (under OUTPUT/exits_{arch}/), then --eval; each step reused when done."""
    output_dir = Path(args.output_dir) / f'exits_{arch}'
    recipe = [item for dest, flag in DYNN_RECIPE.items() if dynn_args.given(dest) is not None
              for item in (flag, str(dynn_args.given(dest)))]
    data_path = ['--data-path', args.data_path] if args.data_path else []
    command = ['--stage', 'dynn', '--data-set', args.data_set, *data_path, '--checkpoint-path', str(backbone),
               *recipe, '--output-dir', str(output_dir)]
    folder = dynn_run_folder(output_dir, args.data_set, dynn_args.ce_ic_tradeoff)
    best = _train_or_reuse(folder, command, f'training {arch} with exits')
    results = best.parent / 'results.json'
    if not results.is_file():
        _run_main_dynn(['--eval', '--data-set', args.data_set, *data_path, '--checkpoint-path', str(best)],
                       f'evaluating {arch} with exits')
    return results


def pareto_front(points: list[dict], cost: str) -> set[int]:
    """Indices of the points no other point beats: at most the cost and at least the accuracy, one strictly."""
    return {i for i, p in enumerate(points)
            if not any(q[cost] <= p[cost] and q['accuracy'] >= p['accuracy'] and
                       (q[cost] < p[cost] or q['accuracy'] > p['accuracy']) for q in points)}


def benchmark(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    results_path = Path(args.dynn_results)
    results, dynn_points = read_dynn_points(results_path)
    dynn, dynn_args, _ = reopen(read_checkpoint(dynn_checkpoint(results, results_path)), str(results_path))
    input_size, patch_size = dynn_args.input_size, dynn_args.patch_size
    images, labels = load_validation_images(dynn_args, args.data_set, args.data_path)
    checkpoints = {arch: train_baseline(arch, args, input_size, patch_size) for arch in args.archs}
    # the early-exit models: GFNet-Dynn, then each timm baseline with exits -> (model, its operating points)
    dynn_name = 'GFNet-Dynn' if isinstance(dynn, GFNetDynn) else f'{dynn_args.arch} + exits'
    exit_models = {dynn_name: (dynn, dynn_points)}
    for arch, path in checkpoints.items():
        if not args.no_exits and not arch.startswith('GFNet-'):  # the plain GFNet's exits are GFNet-Dynn's
            exits_results = train_exits(arch, path, args, dynn_args)
            exit_models[f'{arch} + exits'] = (reopen(str(exits_results.parent / 'best.pth')).model,
                                              read_dynn_points(exits_results)[1])
    singles = [images[i].unsqueeze(0) for i in spread_indices(len(images), args.latency_images)]
    rows, runners = [], {}
    with torch.inference_mode():
        for arch, path in checkpoints.items():
            checkpoint = read_checkpoint(path)
            patch_size = RunArgs.of(checkpoint).given('patch_size')
            model = build_backbone(arch, len(dynn_args.class_names), input_size, patch_size, 0.0)
            load_state(model, checkpoint, source=str(path))
            model.eval()
            correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in zip(images.split(64), labels.split(64)))
            rows.append({'model': 'GFNet-Ti (static)' if arch.startswith('GFNet-') else arch, 'arch': arch,
                         'kind': 'static', 'accuracy': 100 * correct / len(labels),
                         'gflops': count_flops(model, singles[0]) / 1e9,
                         'params_m': sum(p.numel() for p in model.parameters()) / 1e6})
            runners[arch] = model
        for name, (model, points) in exit_models.items():
            for threshold in sorted({p['threshold'] for p in points}):
                runners[(name, threshold)] = EarlyExitEngine(model, threshold)
        latency = {name: float('inf') for name in runners}
        for _ in range(args.rounds):  # interleaved, best of each: no model gains from running first or last
            for name, run in runners.items():
                latency[name] = min(latency[name], latency_ms(run, singles, torch.device('cpu'), warmup=5)['mean'])
    for row in rows:
        row['latency_ms'] = latency[row['arch']]
    for name, (model, points) in exit_models.items():
        params = sum(p.numel() for p in model.parameters()) / 1e6
        for p in points:
            rows.append({'model': f"{name} t={p['threshold']:g}", 'exit_model': name, 'kind': 'early_exit',
                         'threshold': p['threshold'], 'accuracy': p['accuracy'], 'gflops': p['expected_gflops'],
                         'params_m': params, 'latency_ms': latency[(name, p['threshold'])],
                         'latency_ms_from_results': p.get('expected_latency_ms')})
    for cost in ('latency_ms', 'gflops'):
        front = pareto_front(rows, cost)
        for i, row in enumerate(rows):
            row[f'on_{cost}_front'] = i in front
    return {'data_set': args.data_set, 'input_size': input_size, 'epochs': args.epochs, 'recipe': RECIPE,
            'dynn_results': str(results_path), 'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
            'num_val': len(labels), 'latency_images': args.latency_images, 'rows': rows,
            'summary': summary(rows)}


def summary(rows: list[dict]) -> list[str]:
    """Plain sentences: where each early-exit model is and is not on each front."""
    lines = []
    for cost, name in (('latency_ms', 'batch-1 CPU latency'), ('gflops', 'GFLOPs')):
        static = [r['model'] for r in rows if r['kind'] == 'static' and r[f'on_{cost}_front']]
        lines.append(f"accuracy vs {name}: static models on the front: {', '.join(static) or 'none'}")
        for exit_model in dict.fromkeys(r['exit_model'] for r in rows if r['kind'] == 'early_exit'):
            points = [r for r in rows if r.get('exit_model') == exit_model]
            on = [r for r in points if r[f'on_{cost}_front']]
            if on:
                lines.append(f"  {exit_model} is on it at {len(on)} of {len(points)} thresholds "
                             f"({', '.join(format(r['threshold'], 'g') for r in on)})")
                continue
            best = max(points, key=lambda r: r['accuracy'])
            beaters = [r['model'] for r in rows if r[cost] <= best[cost] and r['accuracy'] >= best['accuracy']
                       and r.get('exit_model') != exit_model]
            lines.append(f'  {exit_model} is not on it' + (f"; {', '.join(beaters)} beat its most accurate point"
                                                           if beaters else ''))
    return lines


def format_table(result: dict) -> str:
    lines = [f"{result['data_set']} at {result['input_size']} px, {result['epochs']} epochs each, "
             f"{result['threads']} threads; * = on the Pareto front",
             f"{'model':<40} {'acc %':>6} {'ms bs1':>8} {'GFLOPs':>7} {'params M':>8}"]
    for r in result['rows']:
        marks = ['*' if r[f'on_{cost}_front'] else ' ' for cost in ('latency_ms', 'gflops')]
        lines.append(f"{r['model']:<40} {r['accuracy']:6.2f} {r['latency_ms']:7.2f}{marks[0]} "
                     f"{r['gflops']:6.3f}{marks[1]} {r['params_m']:8.2f}")
    return '\n'.join(lines + result['summary'])


def plot(result: dict, path: Path) -> Path:
    import matplotlib
    matplotlib.use('Agg')  # no display on servers
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, cost, label in ((axes[0], 'latency_ms', 'batch-1 CPU latency (ms)'), (axes[1], 'gflops', 'GFLOPs')):
        for exit_model in dict.fromkeys(r['exit_model'] for r in result['rows'] if r['kind'] == 'early_exit'):
            points = sorted((r for r in result['rows'] if r.get('exit_model') == exit_model),
                            key=lambda r: r['threshold'])
            ax.plot([r[cost] for r in points], [r['accuracy'] for r in points], 'o-', ms=3,
                    label=f'{exit_model} (thresholds)')
        for r in result['rows']:
            if r['kind'] == 'static':
                ax.scatter(r[cost], r['accuracy'], marker='s')
                ax.annotate(r['model'], (r[cost], r['accuracy']), fontsize=7, xytext=(3, 3),
                            textcoords='offset points')
        ax.set_xlabel(label)
        ax.set_ylabel('top-1 accuracy (%)')
        ax.set_xscale('log')
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{result['data_set']} at {result['input_size']} px: early-exit models vs static baselines")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)

    def run() -> None:
        if args.epochs <= 0:
            raise GFNetDynnError(f'--epochs must be positive, got {args.epochs}')
        path = json_path(args.json, f'pareto_{args.data_set}.json')
        png = check_output_file(args.plot or path.with_suffix('.png'), 'plot', '--plot')
        result = benchmark(args)
        print(format_table(result))
        print(f"written: {write_json(result, path, 'pareto')} {plot(result, png)}")
    return exit_code(run)


if __name__ == '__main__':
    sys.exit(main())
