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

The goal table sets each model with exits at its --eval choice (--budget acc-drop=1, chosen on the calibration
images when the GFNet-Dynn run held some out, and so do the baselines) against the same static model: the
speed-up of the mean batch-1 latency and the accuracy lost on the validation images.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_DIR, SMALL_DATA_BACKBONE, json_path, latency_ms, run_benchmark, write_json
from benchmarks.early_exit import load_validation_images
from dataset_config import DATASET_CONFIG
from errors import GFNetDynnError, OneLineParser
from evaluation.latency import spread_indices
from jobs.flags import add_flag, positive
from jobs.outputs import check_output_file
from jobs.run_setup import backbone_run_folder, dynn_run_folder
from jobs.trained_run import RunArgs, reopen
from models.early_exit import EarlyExitEngine
from models.flops import count_flops
from models.gfnet_dynn import GFNetDynn
from models.model_factory import build_backbone
from models.weights import load_state, read_checkpoint

# one model of each family that takes exits, and the plain GFNet-Ti
BASELINES = ['resnet18', 'resnet50', 'mobilenetv3_large_100', 'efficientnet_b0', 'convnext_atto',
             'deit_tiny_patch16_224', 'GFNet-ti-dynn']
# The DEMO backbone recipe of example_usage.sh, for every baseline alike
RECIPE = ['--batch', '64', *SMALL_DATA_BACKBONE]
# What a baseline's exits are trained with: the GFNet-Dynn run's own values of these (its lambda included)
DYNN_RECIPE = {'batch': '--batch', 'num_epoch': '--num_epoch', 'max_warmup_epoch': '--max_warmup_epoch',
               'patience': '--patience', 'lr': '--lr', 'min_lr': '--min-lr', 'opt': '--opt', 'wd': '--wd',
               'ce_ic_tradeoff': '--ce_ic_tradeoff', 'transfer_ratio': '--transfer-ratio', 'gate': '--gate',
               'bilevel_batch_count': '--bilevel_batch_count', 'gate_lr': '--gate-lr'}
GOAL_SPEEDUP, GOAL_MAX_DROP = 1.3, 1.0  # at least this much faster, at most this many points less accurate


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('benchmarks.pareto', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, '--data-set', default='DEMO', choices=sorted(DATASET_CONFIG), help='dataset_config.py entry')
    add_flag(parser, '--data-path', default=None, help="default: the entry's default_data_path")
    add_flag(parser, '--dynn-results', required=True, help='results.json written by main_dynn.py --eval')
    add_flag(parser, '--archs', nargs='+', default=BASELINES,
                        help='static baselines: timm names, or GFNet-*-dynn for the plain GFNet')
    add_flag(parser, '--epochs', check=positive, type=int, default=6, help='training epochs of every baseline')
    add_flag(parser, '--no-exits', action='store_true',
                        help='only the static baselines: do not train and time each timm baseline with exits')
    add_flag(parser, '--output-dir', default=str(DEFAULT_DIR / 'pareto'),
                        help='where the baselines are trained (checkpoint/backbone_{data}_{arch}/)')
    add_flag(parser, '--latency-images', check=positive, type=int, default=100, help='validation images timed at batch 1')
    add_flag(parser, '--max-points', check=positive, type=int, default=12,
                        help="early-exit operating points timed per model: spread over its --eval front, plus its "
                             'choice (timing every threshold of six models takes long)')
    add_flag(parser, '--rounds', check=positive, type=int, default=2, help='interleaved timing rounds; the best is kept')
    add_flag(parser, '--threads', check=positive, type=int, default=None, help='CPU threads (default: torch default)')
    add_flag(parser, '--json', default=None, help='default: bench/pareto_{data}.json')
    add_flag(parser, '--plot', default=None, help='default: the JSON path with .png')
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


def train_baseline(arch: str, args: argparse.Namespace, input_size: int, patch_size: int,
                   calib_ratio: float | None = None) -> Path:
    """best.pth of `arch` trained by main_dynn.py: reused when finished, resumed when interrupted. With
    calib_ratio (the GFNet-Dynn run's), the same share of training images is held out for --eval to choose on."""
    patch = ['--patch-size', str(patch_size)] if arch.startswith('GFNet-') else []
    data_path = ['--data-path', args.data_path] if args.data_path else []
    calib = ['--calib-ratio', f'{calib_ratio:g}'] if calib_ratio else []
    command = ['--stage', 'backbone', '--data-set', args.data_set, *data_path, '--arch', arch, *patch,
               '--input-size', str(input_size), '--num_epoch', str(args.epochs), *RECIPE, *calib,
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
    folder = dynn_run_folder(output_dir, args.data_set, dynn_args.ce_ic_tradeoff, arch)
    best = _train_or_reuse(folder, command, f'training {arch} with exits')
    results = best.parent / 'results.json'
    if not results.is_file():
        _run_main_dynn(['--eval', '--data-set', args.data_set, *data_path, '--checkpoint-path', str(best)],
                       f'evaluating {arch} with exits')
    return results


def spread_points(points: list[dict], count: int) -> list[dict]:
    """At most `count` of the points, evenly spread over them in accuracy order, both ends kept."""
    ordered = sorted(points, key=lambda p: (p['accuracy'], -p['threshold']))
    if len(ordered) <= count:
        return ordered
    return [ordered[i] for i in sorted({round(i * (len(ordered) - 1) / max(count - 1, 1)) for i in range(count)})]


def timed_points(points: list[dict], selection: dict | None, count: int) -> list[dict]:
    """The operating points to time for one model: `count` spread over its front, and its --eval choice, which
    need not be on the validation front."""
    spread = spread_points(points, count)
    if selection and selection['threshold'] not in {p['threshold'] for p in spread}:
        spread.append(selection)
    return spread


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
    calib_ratio = (dynn_args.recorded_split(args.data_set) or {}).get('calib_ratio')
    checkpoints = {arch: train_baseline(arch, args, input_size, patch_size, calib_ratio) for arch in args.archs}
    # the early-exit models: GFNet-Dynn, then each timm baseline with exits -> (model, its operating points)
    dynn_name = 'GFNet-Dynn' if isinstance(dynn, GFNetDynn) else f'{dynn_args.arch} + exits'
    chosen = {dynn_name: results.get('selection')}  # each early-exit model's --eval choice
    exit_models = {dynn_name: (dynn, timed_points(dynn_points, chosen[dynn_name], args.max_points))}
    for arch, path in checkpoints.items():
        if not args.no_exits and not arch.startswith('GFNet-'):  # the plain GFNet's exits are GFNet-Dynn's
            exits_results = train_exits(arch, path, args, dynn_args)
            exit_results, points = read_dynn_points(exits_results)
            chosen[f'{arch} + exits'] = exit_results.get('selection')
            exit_models[f'{arch} + exits'] = (reopen(str(exits_results.parent / 'best.pth')).model,
                                              timed_points(points, chosen[f'{arch} + exits'], args.max_points))
    singles = [images[i].unsqueeze(0) for i in spread_indices(len(images), args.latency_images)]
    rows, runners = [], {}
    with torch.inference_mode():
        for arch, path in checkpoints.items():
            row, runners[arch] = static_row(arch, path, (images, labels), singles[0], input_size,
                                            len(dynn_args.class_names))
            rows.append(row)
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
        selection = chosen.get(name)
        for p in points:
            rows.append({'model': f"{name} t={p['threshold']:g}", 'exit_model': name, 'kind': 'early_exit',
                         'threshold': p['threshold'], 'accuracy': p['accuracy'], 'gflops': p['expected_gflops'],
                         'params_m': params, 'latency_ms': latency[(name, p['threshold'])],
                         'latency_ms_from_results': p.get('expected_latency_ms'),
                         'chosen': bool(selection) and p['threshold'] == selection['threshold']})
    for cost in ('latency_ms', 'gflops'):
        front = pareto_front(rows, cost)
        for i, row in enumerate(rows):
            row[f'on_{cost}_front'] = i in front
    goal = [goal_row(name, chosen[name], latency[(name, chosen[name]['threshold'])], rows)
            for name in exit_models if chosen.get(name) and name.endswith(' + exits')]
    return {'data_set': args.data_set, 'input_size': input_size, 'epochs': args.epochs, 'recipe': RECIPE,
            'dynn_results': str(results_path), 'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(),
            'num_val': len(labels), 'latency_images': args.latency_images, 'rows': rows, 'goal': goal,
            'summary': summary(rows) + goal_summary(goal, rows)}


def static_row(arch: str, path: Path, validation: tuple[torch.Tensor, torch.Tensor], single: torch.Tensor,
               input_size: int, num_classes: int) -> tuple[dict, torch.nn.Module]:
    """A static baseline's row (accuracy on the validation (images, labels), GFLOPs at batch 1, parameters) and
    its model in eval mode, to be timed."""
    images, labels = validation
    checkpoint = read_checkpoint(path)
    model = build_backbone(arch, num_classes, input_size, RunArgs.of(checkpoint).given('patch_size'), 0.0)
    load_state(model, checkpoint, source=str(path))
    model.eval()
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in zip(images.split(64), labels.split(64)))
    return {'model': 'GFNet-Ti (static)' if arch.startswith('GFNet-') else arch, 'arch': arch, 'kind': 'static',
            'accuracy': 100 * correct / len(labels), 'gflops': count_flops(model, single) / 1e9,
            'params_m': sum(p.numel() for p in model.parameters()) / 1e6}, model


def goal_row(exit_model: str, selection: dict, latency_ms: float, rows: list[dict]) -> dict:
    """A model with exits at its --eval choice against the same static model: speed-up of the mean batch-1
    latency, validation accuracy lost, and whether both meet the goal."""
    arch = exit_model.removesuffix(' + exits')
    static = next(r for r in rows if r['kind'] == 'static' and r['arch'] == arch)
    speedup = static['latency_ms'] / latency_ms
    drop = static['accuracy'] - selection['accuracy']
    return {'arch': arch, 'budget': selection.get('budget'), 'chosen_on': selection.get('set'),
            'threshold': selection['threshold'], 'static_accuracy': static['accuracy'],
            'static_latency_ms': static['latency_ms'], 'accuracy': selection['accuracy'], 'latency_ms': latency_ms,
            'speedup': speedup, 'accuracy_drop': drop,
            'met': speedup >= GOAL_SPEEDUP and drop <= GOAL_MAX_DROP}


def goal_summary(goal: list[dict], rows: list[dict]) -> list[str]:
    """One line per model with exits, and whether the most accurate early-exit point beats every static model
    on the latency front."""
    lines = [f"{g['arch']} + exits at its choice ({g['budget']} on the {g['chosen_on']} images): "
             f"{g['accuracy']:.2f}% at {g['latency_ms']:.2f} ms vs static {g['static_accuracy']:.2f}% at "
             f"{g['static_latency_ms']:.2f} ms: {g['speedup']:.2f}x, {g['accuracy_drop']:+.2f} points lost: "
             f"{'met' if g['met'] else 'missed'} (goal >= {GOAL_SPEEDUP}x, <= {GOAL_MAX_DROP:g} point)" for g in goal]
    exit_points = [r for r in rows if r['kind'] == 'early_exit']
    if exit_points:
        best = max(exit_points, key=lambda r: (r['accuracy'], -r['latency_ms']))
        beaters = [r['model'] for r in rows if r['kind'] == 'static' and r['latency_ms'] <= best['latency_ms']
                   and r['accuracy'] >= best['accuracy']]
        lines.append(f"most accurate early-exit point: {best['model']} ({best['accuracy']:.2f}% at "
                     f"{best['latency_ms']:.2f} ms): " + (f"beaten by {', '.join(beaters)}" if beaters else
                                                         'on the latency front against every static model'))
    return lines


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
                             f"({', '.join(format(r['threshold'], '.3g') for r in on)})")
                continue
            best = max(points, key=lambda r: r['accuracy'])
            beaters = [r['model'] for r in rows if r[cost] <= best[cost] and r['accuracy'] >= best['accuracy']
                       and r.get('exit_model') != exit_model]
            shown = ', '.join(beaters[:3]) + (f' and {len(beaters) - 3} more' if len(beaters) > 3 else '')
            beaten = f'; {shown} beat its most accurate point' if beaters else ''
            lines.append(f'  {exit_model} is not on it{beaten}')
    return lines


def format_table(result: dict) -> str:
    shown = [r for r in result['rows'] if r['kind'] == 'static' or r.get('chosen') or r['on_latency_ms_front']]
    lines = [f"{result['data_set']} at {result['input_size']} px, {result['epochs']} epochs each, "
             f"{result['threads']} threads; * = on the Pareto front; early-exit points shown: each --eval choice "
             f"and the latency front ({len(result['rows']) - len(shown)} more in the JSON)",
             f"{'model':<40} {'acc %':>6} {'ms bs1':>8} {'GFLOPs':>7} {'params M':>8}"]
    for r in shown:
        marks = ['*' if r[f'on_{cost}_front'] else ' ' for cost in ('latency_ms', 'gflops')]
        lines.append(f"{r['model']:<40} {r['accuracy']:6.2f} {r['latency_ms']:7.2f}{marks[0]} "
                     f"{r['gflops']:6.3f}{marks[1]} {r['params_m']:8.2f}")
    return '\n'.join(lines + result['summary'])


def plot(result: dict, path: Path) -> Path:
    """Accuracy against latency and against GFLOPs: each model with exits as a line over its thresholds (a star
    at its --eval choice), each static model as a square in the same colour."""
    import matplotlib
    matplotlib.use('Agg')  # no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    def family(row: dict) -> str:  # a static model and the same model with exits share a colour
        name = row['arch'] if row['kind'] == 'static' else row['exit_model'].removesuffix(' + exits')
        return 'GFNet' if name.startswith('GFNet') else name

    families = list(dict.fromkeys(family(r) for r in result['rows']))
    colour = {name: plt.get_cmap('tab10')(i % 10) for i, name in enumerate(families)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, cost, label in ((axes[0], 'latency_ms', 'batch-1 CPU latency (ms)'), (axes[1], 'gflops', 'GFLOPs')):
        for exit_model in dict.fromkeys(r['exit_model'] for r in result['rows'] if r['kind'] == 'early_exit'):
            points = sorted((r for r in result['rows'] if r.get('exit_model') == exit_model), key=lambda r: r[cost])
            ax.plot([r[cost] for r in points], [r['accuracy'] for r in points], 'o-', ms=3, lw=1,
                    color=colour[family(points[0])], label=f'{exit_model} (thresholds; star: --eval choice)')
            for r in points:
                if r.get('chosen'):
                    ax.scatter(r[cost], r['accuracy'], marker='*', s=90, color=colour[family(r)], zorder=3)
        for r in result['rows']:
            if r['kind'] == 'static':
                ax.scatter(r[cost], r['accuracy'], marker='s', s=40, color=colour[family(r)], zorder=3)
                ax.annotate(r['model'], (r[cost], r['accuracy']), fontsize=7, xytext=(3, 3),
                            textcoords='offset points')
        ax.set_xlabel(label)
        ax.set_ylabel('top-1 accuracy (%)')
        ax.set_xscale('log')
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc='lower center', ncol=3, fontsize=7, frameon=False)
    fig.suptitle(f"{result['data_set']} at {result['input_size']} px: models with exits (lines) vs static models "
                 f"(squares)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    def run(args: argparse.Namespace) -> None:
        path = json_path(args.json, f'pareto_{args.data_set}.json')
        png = check_output_file(args.plot or path.with_suffix('.png'), 'plot', '--plot')
        result = benchmark(args)
        print(format_table(result))
        print(f"written: {write_json(result, path, 'pareto')} {plot(result, png)}")
    return run_benchmark(get_args_parser(), argv, run)


if __name__ == '__main__':
    sys.exit(main())
