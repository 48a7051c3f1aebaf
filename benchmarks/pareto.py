"""GFNet-Ti and six timm families, each static and with exits, trained here with one recipe on one data set:
accuracy against measured batch-1 CPU latency, against GFLOPs, and parameters, in one process and one run.

  python -m benchmarks.pareto --data-set DIGITS --epochs 15 --seeds 42 43 44

Each model is trained by `main_dynn.py --stage backbone --arch NAME` with a share of the training images held out
(--calib-ratio), then given exits by `main_dynn.py --stage dynn --config RECIPE` (the small-data recipe; a CNN's
recipe adds heads that keep layout), then `--eval --budget B --risk-control R` chooses its threshold on the
held-out images. Finished runs are reused and interrupted ones resumed, so a second call only times; --train-only
trains and evaluates without timing (two such calls over different --archs fill two cores). Each run has its own
folder per seed: OUTPUT/seed{S}/. The models of --seeded-archs run with every --seeds, the others with the first.

The goal table sets each model with exits at its --eval choice against the same static model (the same seed):
the speed-up of the mean batch-1 latency and the accuracy lost on the validation images.
"""
import argparse
import json
import os
import statistics
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
from jobs.flags import add_flag, below_one, non_negative, positive
from jobs.outputs import check_output_file
from jobs.run_setup import backbone_run_folder, dynn_run_folder
from jobs.trained_run import RunArgs, reopen
from models.early_exit import EarlyExitEngine
from models.flops import count_flops
from models.model_factory import build_backbone, check_arch, is_gfnet
from models.timm_dynn import layout_for_name
from models.weights import load_state, read_checkpoint

# GFNet-Ti and one model of each timm family that takes exits
BASELINES = ['GFNet-ti-dynn', 'resnet18', 'resnet50', 'mobilenetv3_large_100', 'efficientnet_b0', 'convnext_atto',
             'deit_tiny_patch16_224']
SEEDED = ['GFNet-ti-dynn', 'resnet18', 'deit_tiny_patch16_224']  # run with every seed by default
RECIPES = Path(__file__).resolve().parent.parent / 'recipes'
# Stage 0 of every model: the small-data backbone recipe (example_usage.sh's), at one batch size
RECIPE = ['--batch', '64', *SMALL_DATA_BACKBONE]
GOAL_SPEEDUP, GOAL_MAX_DROP = 1.3, 1.0  # at least this much faster, at most this many points less accurate


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('benchmarks.pareto', description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, '--data-set', default='DEMO', choices=sorted(DATASET_CONFIG), help='dataset_config.py entry')
    add_flag(parser, '--data-path', default=None, help="default: the entry's default_data_path")
    add_flag(parser, '--archs', nargs='+', default=BASELINES, help='timm names, or GFNet-*-dynn for a GFNet')
    add_flag(parser, '--seeds', nargs='+', type=int, check=non_negative, default=[42],
             help='--seed of each run; every model runs with the first')
    add_flag(parser, '--seeded-archs', nargs='+', default=SEEDED, help='the models trained with every --seeds')
    add_flag(parser, '--epochs', check=positive, type=int, default=15, help='stage-0 epochs of every model')
    add_flag(parser, '--input-size', check=positive, type=int, default=None, help="default: the entry's")
    add_flag(parser, '--patch-size', check=positive, type=int, default=None,
             help="a GFNet's patch size (default: the input size / 8, an 8 x 8 token grid)")
    add_flag(parser, '--calib-ratio', check=below_one, type=float, default=0.2,
             help='share of the training images held out from stage 0 on, for --eval to choose on')
    add_flag(parser, '--exit-config', default=str(RECIPES / 'small_data.yaml'),
             help="stages 1-2 recipe (--config) of GFNet and ViT models")
    add_flag(parser, '--cnn-exit-config', default=str(RECIPES / 'small_data_cnn.yaml'),
             help='stages 1-2 recipe (--config) of the CNN families')
    add_flag(parser, '--ce-ic-tradeoff', type=float, check=non_negative, default=0.75,
             help='lambda of stages 1-2')
    add_flag(parser, '--budget', default='acc-drop=1', help="--eval's budget")
    add_flag(parser, '--risk-control', default='crc', choices=['none', 'crc', 'ltt'], help="--eval's rule")
    add_flag(parser, '--no-exits', action='store_true', help='only the static models')
    add_flag(parser, '--train-only', action='store_true', help='train and evaluate; time nothing, write no JSON')
    add_flag(parser, '--output-dir', default=None, help='where the runs are trained (default: bench/pareto_{data})')
    add_flag(parser, '--latency-images', check=positive, type=int, default=100,
             help='validation images timed at batch 1')
    add_flag(parser, '--max-points', check=positive, type=int, default=12,
             help="early-exit operating points timed per model of the first seed: spread over its --eval front, "
                  "plus its choice (timing every threshold of every model takes long)")
    add_flag(parser, '--rounds', check=positive, type=int, default=2,
             help='interleaved timing rounds; the best is kept')
    add_flag(parser, '--threads', check=positive, type=int, default=None, help='CPU threads (default: torch default)')
    add_flag(parser, '--json', default=None, help='default: bench/pareto_{data}.json')
    add_flag(parser, '--plot', default=None, help='default: the JSON path with .png')
    return parser


def read_points(path: Path) -> tuple[dict, list[dict]]:
    """(the results, its operating points): the `front` list if present, else the `sweep`."""
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise GFNetDynnError(f'{path} is not a readable JSON file ({type(error).__name__}); delete it and run '
                             f'again to evaluate anew') from error
    points = results.get('front') or results.get('sweep') if isinstance(results, dict) else None
    if not points or not all({'threshold', 'accuracy', 'expected_gflops'} <= set(p) for p in points):
        raise GFNetDynnError(f'{path} has no front or sweep of thresholds; delete it and run again to evaluate anew')
    return results, points


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


def planned_runs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(arch, seed) of every run: each model with the first seed, the seeded ones with every seed."""
    return [(arch, seed) for index, seed in enumerate(args.seeds) for arch in args.archs
            if index == 0 or arch in args.seeded_archs]


def seed_folder(args: argparse.Namespace, seed: int) -> Path:
    return Path(args.output_dir or DEFAULT_DIR / f'pareto_{args.data_set}') / f'seed{seed}'


def _data_flags(args: argparse.Namespace) -> list[str]:
    return ['--data-set', args.data_set, *(['--data-path', args.data_path] if args.data_path else [])]


def input_size(args: argparse.Namespace) -> int:
    return args.input_size or DATASET_CONFIG[args.data_set]['default_input_size']


def train_baseline(arch: str, seed: int, args: argparse.Namespace) -> Path:
    """best.pth of `arch` trained by main_dynn.py with `seed` and the --calib-ratio hold-out: reused when
    finished, resumed when interrupted."""
    size = input_size(args)
    patch = ['--patch-size', str(args.patch_size or max(size // 8, 1))] if is_gfnet(arch) else []
    command = ['--stage', 'backbone', *_data_flags(args), '--arch', arch, *patch, '--input-size', str(size),
               '--num_epoch', str(args.epochs), *RECIPE, '--calib-ratio', f'{args.calib_ratio:g}',
               '--seed', str(seed), '--output-dir', str(seed_folder(args, seed))]
    return _train_or_reuse(backbone_run_folder(seed_folder(args, seed), args.data_set, arch), command,
                           f'training {arch} (seed {seed})')


def exit_recipe(arch: str, args: argparse.Namespace) -> str:
    """The stages 1-2 recipe of `arch`: the CNN one for families exiting after stages, else the general one."""
    cnn = not is_gfnet(arch) and getattr(layout_for_name(arch), 'unit', None) == 'stage'
    return args.cnn_exit_config if cnn else args.exit_config


def train_exits(arch: str, seed: int, backbone: Path, args: argparse.Namespace) -> Path:
    """results.json of `arch` with exits: stages 1-2 from its stage-0 checkpoint with its recipe (under
    OUTPUT/seed{S}/exits_{arch}/), then --eval with the benchmark's budget and rule; each step reused when done
    (--eval again when its results.json chose with another budget or rule)."""
    output_dir = seed_folder(args, seed) / f'exits_{arch}'
    command = ['--stage', 'dynn', '--config', exit_recipe(arch, args), *_data_flags(args), '--checkpoint-path',
               str(backbone), '--batch', '64', '--ce_ic_tradeoff', f'{args.ce_ic_tradeoff:g}', '--seed', str(seed),
               '--output-dir', str(output_dir)]
    folder = dynn_run_folder(output_dir, args.data_set, args.ce_ic_tradeoff, arch)
    best = _train_or_reuse(folder, command, f'training {arch} with exits (seed {seed})')
    results = best.parent / 'results.json'
    if not _chose_as_asked(results, args):
        _run_main_dynn(['--eval', *_data_flags(args), '--checkpoint-path', str(best), '--budget', args.budget,
                        '--risk-control', args.risk_control], f'evaluating {arch} with exits (seed {seed})')
    return results


def _chose_as_asked(results: Path, args: argparse.Namespace) -> bool:
    """Whether an earlier --eval's results.json chose its threshold with this budget and rule."""
    try:
        selection = json.loads(results.read_text()).get('selection') or {}
    except (OSError, ValueError, AttributeError):
        return False
    return selection.get('budget') == args.budget and selection.get('risk_control') == args.risk_control


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


def check_plan(args: argparse.Namespace) -> None:
    """Every --archs name and recipe is usable, checked before the first of many runs trains."""
    for arch in args.archs:
        check_arch(arch, 'backbone' if args.no_exits else 'dynn')
    for flag, path in (('--exit-config', args.exit_config), ('--cnn-exit-config', args.cnn_exit_config)):
        if not args.no_exits and not Path(path).is_file():
            raise GFNetDynnError(f'{flag} {path} is not a file; pass a recipe such as recipes/small_data.yaml')


def train_all(args: argparse.Namespace) -> dict[tuple[str, int], tuple[Path, Path | None]]:
    """(arch, seed) -> (its stage-0 best.pth, its results.json with exits or None): every planned run, trained and
    evaluated, or reused."""
    check_plan(args)
    runs = {}
    for arch, seed in planned_runs(args):
        backbone = train_baseline(arch, seed, args)
        runs[(arch, seed)] = (backbone, None if args.no_exits else train_exits(arch, seed, backbone, args))
    return runs


def benchmark(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    runs = train_all(args)
    size = input_size(args)
    first_seed = args.seeds[0]
    models, points, results, params = {}, {}, {}, {}  # by (arch, seed); runners also by (arch, seed, threshold)
    for (arch, seed), (backbone, exits) in runs.items():
        models[(arch, seed)] = backbone
        if exits is not None:
            results[(arch, seed)], front = read_points(exits)
            chosen = results[(arch, seed)]['selection']
            points[(arch, seed)] = timed_points(front, chosen, args.max_points) if seed == first_seed else [chosen]
    # every run records the same split (the data set's val folder, the same hold-out share): the first one's serves
    images, labels = load_validation_images(RunArgs.of(read_checkpoint(next(iter(models.values())))), args.data_set,
                                            args.data_path)
    singles = [images[i].unsqueeze(0) for i in spread_indices(len(images), args.latency_images)]
    rows, runners = [], {}
    with torch.inference_mode():
        for (arch, seed), path in models.items():
            row, runners[(arch, seed)] = static_row(arch, path, (images, labels), singles[0], size)
            rows.append({**row, 'seed': seed})
        for (arch, seed), timed in points.items():
            model = reopen(results[(arch, seed)]['checkpoint']).model
            params[(arch, seed)] = sum(p.numel() for p in model.parameters()) / 1e6
            for threshold in sorted({p['threshold'] for p in timed}):
                runners[(arch, seed, threshold)] = EarlyExitEngine(model, threshold)
        latency = time_all(runners, singles, args.rounds)
    for row in rows:
        row['latency_ms'] = latency[(row['arch'], row['seed'])]
    for (arch, seed), timed in points.items():
        rows += exit_rows(arch, seed, timed, results[(arch, seed)]['selection'], latency, params[(arch, seed)])
    first = seed_rows(rows, first_seed)
    for cost in ('latency_ms', 'gflops'):
        front = pareto_front(first, cost)
        for i, row in enumerate(first):
            row[f'on_{cost}_front'] = i in front
    goal = [goal_row(arch, seed, results[(arch, seed)], latency[(arch, seed, results[(arch, seed)]['selection']
                                                                  ['threshold'])], rows)
            for (arch, seed) in results]
    return {'data_set': args.data_set, 'input_size': size, 'epochs': args.epochs, 'recipe': RECIPE,
            'exit_configs': {'general': _shown(args.exit_config), 'cnn': _shown(args.cnn_exit_config)},
            'budget': args.budget,
            'risk_control': args.risk_control, 'calib_ratio': args.calib_ratio, 'seeds': args.seeds,
            'threads': torch.get_num_threads(), 'cpu_count': os.cpu_count(), 'num_val': len(labels),
            'latency_images': args.latency_images, 'rows': rows, 'goal': goal, 'by_model': by_model(goal),
            'summary': summary(first) + goal_summary(goal, first)}


def _shown(path: str) -> str:
    """A recipe's path as the JSON records it: relative to the repository when inside it, so the results name no
    machine's folders."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(RECIPES.parent)) if resolved.is_relative_to(RECIPES.parent) else path


def time_all(runners: dict, singles: list[torch.Tensor], rounds: int) -> dict:
    """Mean batch-1 ms of each runner, best of `rounds` interleaved rounds: no model gains from running first."""
    latency = {name: float('inf') for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            latency[name] = min(latency[name], latency_ms(run, singles, torch.device('cpu'), warmup=5)['mean'])
    return latency


def exit_rows(arch: str, seed: int, timed: list[dict], selection: dict, latency: dict, params: float) -> list[dict]:
    """One row per timed threshold of `arch` with exits (seed `seed`); `selection` is its --eval choice."""
    name = f'{display_name(arch)} + exits'
    chosen = selection['threshold']
    return [{'model': f"{name} t={p['threshold']:g}", 'exit_model': name, 'arch': arch, 'seed': seed,
             'kind': 'early_exit', 'threshold': p['threshold'], 'accuracy': p['accuracy'],
             'gflops': p['expected_gflops'], 'params_m': params, 'latency_ms': latency[(arch, seed, p['threshold'])],
             'latency_ms_from_results': p.get('expected_latency_ms'), 'chosen': p['threshold'] == chosen}
            for p in timed]


def display_name(arch: str) -> str:
    return 'GFNet-Ti' if arch == 'GFNet-ti-dynn' else arch


def static_row(arch: str, path: Path, validation: tuple[torch.Tensor, torch.Tensor], single: torch.Tensor,
               size: int) -> tuple[dict, torch.nn.Module]:
    """A static model's row (accuracy on the validation (images, labels), GFLOPs at batch 1, parameters) and
    the model in eval mode, to be timed."""
    images, labels = validation
    checkpoint = read_checkpoint(path)
    run_args = RunArgs.of(checkpoint)
    model = build_backbone(arch, len(run_args.class_names), size, run_args.given('patch_size'), 0.0)
    load_state(model, checkpoint, source=str(path))
    model.eval()
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in zip(images.split(64), labels.split(64)))
    return {'model': display_name(arch), 'arch': arch, 'kind': 'static', 'accuracy': 100 * correct / len(labels),
            'gflops': count_flops(model, single) / 1e9,
            'params_m': sum(p.numel() for p in model.parameters()) / 1e6}, model


def goal_row(arch: str, seed: int, results: dict, latency_ms: float, rows: list[dict]) -> dict:
    """`arch` with exits at its --eval choice against the same static model of the same seed: speed-up of the
    mean batch-1 latency, validation accuracy lost, whether both meet the goal, and the measurements that explain
    a miss (each exit's accuracy, the oracle)."""
    static = next(r for r in rows if r['kind'] == 'static' and r['arch'] == arch and r['seed'] == seed)
    selection, oracle = results['selection'], results.get('oracle') or {}
    speedup = static['latency_ms'] / latency_ms
    drop = static['accuracy'] - selection['accuracy']
    return {'arch': arch, 'seed': seed, 'budget': selection.get('budget'), 'chosen_on': selection.get('set'),
            'risk_control': selection.get('risk_control'), 'certified': selection.get('certified'),
            'threshold': selection['threshold'], 'static_accuracy': static['accuracy'],
            'static_latency_ms': static['latency_ms'], 'accuracy': selection['accuracy'], 'latency_ms': latency_ms,
            'speedup': speedup, 'accuracy_drop': drop, 'met': speedup >= GOAL_SPEEDUP and drop <= GOAL_MAX_DROP,
            'per_exit_accuracy': results.get('per_exit_accuracy'), 'flops_saving': 1 - selection['expected_gflops']
            / results['full_gflops'] if results.get('full_gflops') else None,
            'oracle_flops_saving': oracle.get('flops_saving'), 'oracle_captured_share': oracle.get('captured_share')}


def by_model(goal: list[dict]) -> list[dict]:
    """Per model over its seeds: the mean and standard deviation (0 for one seed) of the speed-up and of the
    points lost, and in how many seeds the goal was met."""
    rows = []
    for arch in dict.fromkeys(g['arch'] for g in goal):
        runs = [g for g in goal if g['arch'] == arch]
        stats = {key: (statistics.fmean(g[key] for g in runs),
                       statistics.stdev(g[key] for g in runs) if len(runs) > 1 else 0.0)
                 for key in ('speedup', 'accuracy_drop', 'static_accuracy', 'accuracy')}
        rows.append({'arch': arch, 'seeds': [g['seed'] for g in runs], 'met': sum(g['met'] for g in runs),
                     **{f'{key}_mean': mean for key, (mean, _) in stats.items()},
                     **{f'{key}_std': std for key, (_, std) in stats.items()},
                     'met_on_mean': stats['speedup'][0] >= GOAL_SPEEDUP and stats['accuracy_drop'][0] <= GOAL_MAX_DROP})
    return rows


def goal_summary(goal: list[dict], rows: list[dict]) -> list[str]:
    """One line per model with exits (mean ± std over its seeds), and whether the most accurate early-exit point
    beats every static model on the latency front."""
    lines = []
    for m in by_model(goal):
        seeds = len(m['seeds'])
        lines.append(f"{display_name(m['arch'])} + exits at its choice vs static, {seeds} seed{'s' * (seeds > 1)}: "
                     f"{m['speedup_mean']:.2f}x ± {m['speedup_std']:.2f}, {m['accuracy_drop_mean']:+.2f} ± "
                     f"{m['accuracy_drop_std']:.2f} points lost (static {m['static_accuracy_mean']:.2f}%): "
                     f"{'met' if m['met_on_mean'] else 'missed'} on the mean, in {m['met']} of {seeds} "
                     f"(goal >= {GOAL_SPEEDUP}x, <= {GOAL_MAX_DROP:g} point)")
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


def seed_rows(rows: list[dict], seed: int) -> list[dict]:
    """The rows of one seed: the fronts, the table and the plot show the first seed's."""
    return [r for r in rows if r['seed'] == seed]


def format_table(result: dict) -> str:
    rows = seed_rows(result['rows'], result['seeds'][0])
    shown = [r for r in rows if r['kind'] == 'static' or r.get('chosen') or r['on_latency_ms_front']]
    lines = [f"{result['data_set']} at {result['input_size']} px, {result['epochs']} epochs each, seed "
             f"{result['seeds'][0]}, {result['threads']} threads; * = on the Pareto front; early-exit points shown: "
             f"each --eval choice and the latency front ({len(rows) - len(shown)} more in the JSON)",
             f"{'model':<40} {'acc %':>6} {'ms bs1':>8} {'GFLOPs':>7} {'params M':>8}"]
    for r in shown:
        marks = ['*' if r[f'on_{cost}_front'] else ' ' for cost in ('latency_ms', 'gflops')]
        lines.append(f"{r['model']:<40} {r['accuracy']:6.2f} {r['latency_ms']:7.2f}{marks[0]} "
                     f"{r['gflops']:6.3f}{marks[1]} {r['params_m']:8.2f}")
    lines.append(f"each choice ({result['budget']}, --risk-control {result['risk_control']}) against its static "
                 f"model, per seed:")
    lines += [f"  {display_name(g['arch']):<24} seed {g['seed']:<4} {g['accuracy']:6.2f}% vs "
              f"{g['static_accuracy']:6.2f}% "
              f"({g['accuracy_drop']:+.2f}), {g['latency_ms']:6.2f} vs {g['static_latency_ms']:6.2f} ms "
              f"({g['speedup']:.2f}x), exits {' / '.join(f'{a:.1f}' for a in g['per_exit_accuracy'] or [])}, "
              f"oracle saves {100 * (g['oracle_flops_saving'] or 0):.1f}% of the FLOPs, the choice "
              f"{100 * (g['flops_saving'] or 0):.1f}%" for g in result['goal']]
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

    rows = seed_rows(result['rows'], result['seeds'][0])
    families = list(dict.fromkeys(family(r) for r in rows))
    colour = {name: plt.get_cmap('tab10')(i % 10) for i, name in enumerate(families)}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, cost, label in ((axes[0], 'latency_ms', 'batch-1 CPU latency (ms)'), (axes[1], 'gflops', 'GFLOPs')):
        for exit_model in dict.fromkeys(r['exit_model'] for r in rows if r['kind'] == 'early_exit'):
            points = sorted((r for r in rows if r.get('exit_model') == exit_model), key=lambda r: r[cost])
            ax.plot([r[cost] for r in points], [r['accuracy'] for r in points], 'o-', ms=3, lw=1,
                    color=colour[family(points[0])], label=f'{exit_model} (thresholds; star: --eval choice)')
            for r in points:
                if r.get('chosen'):
                    ax.scatter(r[cost], r['accuracy'], marker='*', s=90, color=colour[family(r)], zorder=3)
        for r in rows:
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
        if args.train_only:
            train_all(args)
            return
        path = json_path(args.json, f'pareto_{args.data_set}.json')
        png = check_output_file(args.plot or path.with_suffix('.png'), 'plot', '--plot')
        result = benchmark(args)
        print(format_table(result))
        print(f"written: {write_json(result, path, 'pareto')} {plot(result, png)}")
    return run_benchmark(get_args_parser(), argv, run)


if __name__ == '__main__':
    sys.exit(main())
