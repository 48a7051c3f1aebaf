"""--eval and --export, wired from the command line's arguments: the checkpoint's own model, outputs checked
before any work, then the report or the ONNX folder."""
import argparse
import json
import logging
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Subset

from data_loader_help import build_datasets, resolve_data_path
from data_pipeline.data_splits import split_summary
from deployment.exporters import EXPORTERS
from errors import GFNetDynnError
from evaluation.eval_record import EvalRun
from evaluation.eval_report import evaluate_early_exit, format_results_table
from evaluation.operating_points import parse_budget
from evaluation.risk_control import RiskControl
from jobs.flags import FlagFacts
from jobs.outputs import check_export_folder, check_output_file, replace_folder
from jobs.run_setup import (build_data, check_class_count, checkpoint_args, dataset_num_classes, dynn_run_folder,
                            resolve_model_shape, split_request)
from jobs.trained_run import RunArgs, TrainedRun, reopen
from learning_helpers.checkpoint import suggested_checkpoint
from models.flops import exit_gflops
from models.model_factory import DEFAULT_ARCH
from runtime.atomic import save_json


def load_for_inference(args: argparse.Namespace, given: set[str], flags: FlagFacts) -> TrainedRun:
    """The trained run of --checkpoint-path, its model built from the checkpoint's own args. A flag declared
    from_checkpoint that contradicts the checkpoint, or a checkpoint without trained exits, is an error."""
    wanted = suggested_checkpoint(args.output_dir, f'checkpoint_{args.data_set}_*_confEE/best.pth',
                                  "the dynn stage's best.pth",
                                  dynn_run_folder(args.output_dir, args.data_set, args.ce_ic_tradeoff,
                                                  args.arch or DEFAULT_ARCH) / 'best.pth')
    checkpoint, source_args = checkpoint_args(args.checkpoint_path, wanted)
    names = flags.names
    for dest in flags.where(from_checkpoint=True):
        stored = source_args.given(dest)
        if dest in given and stored is not None and getattr(args, dest) != stored:
            raise GFNetDynnError(f'{names[dest]} {getattr(args, dest)} differs from the checkpoint\'s ({stored}): '
                                 f'the model is built as it was trained; drop {names[dest]}')
    shape = resolve_model_shape(args, source_args)
    return reopen(checkpoint, args.checkpoint_path, input_size=shape['input_size'], fallback={**vars(args), **shape})


def run_eval(args: argparse.Namespace, given: set[str], flags: FlagFacts, device: torch.device) -> Path:
    """--eval: per-exit accuracy, the cached threshold sweep, real early exit, results.json and plots."""
    from evaluation.plots import plot_confusion, plot_tradeoff
    json_path = results_json_path(args, given)
    plot_paths = [json_path.with_name(json_path.stem + suffix) for suffix in ('_tradeoff.png', '_confusion.png')]
    flag = '--output-dir' if 'output_dir' in given else '--results-json'
    check_output_file(json_path, 'results', flag)  # before the evaluation, not after it
    for path in plot_paths:
        check_output_file(path, 'plot', flag)
    model, model_args, checkpoint = load_for_inference(args, given, flags)
    recorded = RunArgs.of(checkpoint).recorded_split(args.data_set)
    data = build_data(args, model_args.input_size, distributed=False, recorded=recorded, need_train=False)
    val_loader, class_names = data.val_loader, data.classes
    check_class_count(args.checkpoint_path, model.num_classes, args.data_set, len(class_names),
                      'evaluate it on the dataset it was trained on')
    model.to(device)
    report, _ = evaluate_early_exit(
        model, val_loader, device, gflops_per_exit=exit_gflops(model), class_names=class_names,
        budget=parse_budget(args.budget), risk=RiskControl(args.risk_control, args.delta, args.risk_loss),
        exit_threshold=args.exit_threshold, thresholds=args.thresholds,
        calib_loader=data.calib_loader,
        conformal=checkpoint.get('conformal'), max_batches=4 if args.barely_train else None, amp=args.amp)
    total = len(val_loader.dataset)
    results = EvalRun(dataset=args.data_set, arch=model_args.arch, input_size=model_args.input_size,
                      checkpoint=str(args.checkpoint_path), device=str(device), partial=report.num_val < total,
                      num_val_total=total, split=split_summary(data.split, (recorded or {}).get('file')),
                      report=report).to_json()
    save_json(json_path, results)
    tradeoff_png = plot_tradeoff(results, plot_paths[0])
    confusion_png = plot_confusion(results, plot_paths[1])
    print(format_results_table(results))
    print(f'results: {json_path}\nplots: {tradeoff_png} {confusion_png}')
    return json_path


def runner_command(module: str) -> str:
    """How to start a runner module: `-m MODULE` from the repository, else its file, which runs from anywhere."""
    repo = Path(__file__).resolve().parent.parent
    return f'-m {module}' if Path.cwd().resolve() == repo else str(repo.joinpath(*module.split('.')).with_suffix('.py'))


def run_export(args: argparse.Namespace, given: set[str], flags: FlagFacts) -> Path:
    """--export: the format's EXPORTERS entry writes it (onnx: one graph per segment plus a manifest; with
    --quantize int8 also statically quantised twins, calibrated on training images). The export is written beside
    --out first and replaces it whole once complete."""
    out = check_export_folder(args.out)
    model, model_args, checkpoint = load_for_inference(args, given, flags)
    if 'data_set' in given or args.quantize:  # the data set names the classes the export is for
        check_class_count(args.checkpoint_path, model.num_classes, args.data_set, dataset_num_classes(args.data_set),
                          'export it with the --data-set it was trained on')
    calibration = None
    if args.quantize:  # read the images before the export: a data problem stops the job before the long part
        recorded = RunArgs.of(checkpoint).recorded_split(args.data_set)
        calibration = calibration_images(args, model_args.input_size, recorded, args.calib_images)
    threshold, threshold_source = export_threshold(args.checkpoint_path, args.exit_threshold,
                                                   model_args.input_size, RunArgs.of(checkpoint).split)
    exporter = EXPORTERS[args.export]
    staged = out.with_name(f'.{out.name}.partial')
    shutil.rmtree(staged, ignore_errors=True)
    try:
        exporter.write(model, staged, threshold=threshold, class_names=list(model_args.class_names),
                               input_size=model_args.input_size, checkpoint=str(args.checkpoint_path),
                               threshold_source=threshold_source, calibration=calibration)
        replace_folder(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    kinds = 'float and int8' if args.quantize else 'float'
    precision = exporter.precision_flag if args.quantize else ''
    print(f'exported {len(model.exit_positions) + 1} {kinds} {exporter.noun} (exit threshold {threshold:g}) to '
          f'{out}; run them with:\n  python {runner_command(exporter.runner)}{precision} {out.resolve()} '
          f'IMAGE_OR_FOLDER [...]')
    return out / exporter.manifest


def calibration_images(args: argparse.Namespace, input_size: int, recorded: dict | None, count: int) -> np.ndarray:
    """`count` training images (of the split the checkpoint trained on), spread evenly over the sorted file list
    so that every class is present, preprocessed as the ONNX runner does: (count, 3, size, size) float32."""
    from deployment.onnx_runner import preprocess
    train_set = build_datasets(args.data_set, resolve_data_path(args.data_set, args.data_path), input_size,
                               split=split_request(args, recorded), skip_bad_images=args.skip_bad_images,
                               check_images=args.check_images).train
    if isinstance(train_set, Subset):
        paths = [train_set.dataset.samples[i][0] for i in train_set.indices]
    else:
        paths = [path for path, _ in train_set.samples]
    if count > len(paths):
        raise GFNetDynnError(f'--calib-images {count}: the training set of {args.data_set} holds {len(paths)} images; '
                             f'pass --calib-images {len(paths)} or fewer')
    chosen = np.linspace(0, len(paths) - 1, count).round().astype(int)
    # batch_size=None: the loader hands each path to collate_fn alone, decoded in --num_workers processes
    loader = DataLoader([paths[i] for i in chosen], batch_size=None, num_workers=args.num_workers,
                        collate_fn=partial(preprocess, input_size=input_size, mean=IMAGENET_DEFAULT_MEAN,
                                           std=IMAGENET_DEFAULT_STD))
    return np.stack(list(loader))


def results_json_path(args: argparse.Namespace, given: set[str]) -> Path:
    """--results-json, else results.json in --output-dir when given, else beside the checkpoint."""
    if args.results_json:
        return Path(args.results_json)
    if 'output_dir' in given:
        return Path(args.output_dir) / 'results.json'
    return default_results_json(args.checkpoint_path)


def default_results_json(checkpoint_path: str) -> Path:
    """Where --eval writes results.json when --results-json is not given: beside the checkpoint."""
    return Path(checkpoint_path).parent / 'results.json'


def export_threshold(checkpoint_path: str, exit_threshold: float | None, input_size: int, recorded: dict | None,
                     fallback: float = 0.5) -> tuple[float, dict]:
    """The export's threshold and where it came from: --exit-threshold, else the one --eval chose for this
    checkpoint (results.json beside it), else `fallback`. A results.json chosen at another input size, on other
    images or on part of them is refused rather than used: its threshold belongs to another operating point, and
    an export that silently ships it runs at an accuracy nobody measured."""
    if exit_threshold is not None:
        return exit_threshold, {'from': '--exit-threshold'}
    path = default_results_json(checkpoint_path)
    try:
        results = json.loads(path.read_text())
        threshold = float(results['chosen']['threshold'])
    except (OSError, ValueError, KeyError, TypeError):
        logging.info('no --exit-threshold and no results.json beside the checkpoint: exporting with %g', fallback)
        return fallback, {'from': f'default {fallback:g} (no --exit-threshold, no results.json of --eval)'}
    differences = []
    if results.get('input_size') != input_size:
        differences.append(f"at {results.get('input_size')} px, this export at {input_size} px")
    evaluated_checkpoint = Path(results.get('checkpoint') or checkpoint_path)  # relative: to --eval's directory
    if (evaluated_checkpoint.name != Path(checkpoint_path).name or
            evaluated_checkpoint.is_absolute() and evaluated_checkpoint.resolve() != Path(checkpoint_path).resolve()):
        differences.append(f"for another checkpoint ({results['checkpoint']})")
    evaluated = results.get('split') if isinstance(results.get('split'), dict) else {}
    for key, images in (('val_hash', 'validation'), ('calib_hash', 'calibration')):
        if (recorded or {}).get(key) and evaluated.get(key) != recorded[key]:
            differences.append(f"on other {images} images than the checkpoint's split")
    if results.get('partial'):
        differences.append(f"on {results.get('num_val')} of {results.get('num_val_total')} validation images "
                           f'(--barely_train)')
    if differences:
        raise GFNetDynnError(f"{path} chose its threshold {', '.join(differences)}; run --eval --checkpoint-path "
                             f'{checkpoint_path} --input-size {input_size} (without --barely_train) again, or pass '
                             f'--exit-threshold')
    selection = results.get('selection', {})
    return threshold, {'from': str(path.resolve()), 'input_size': results['input_size'],
                       'chosen_on': selection.get('set'), 'num_images': selection.get('num_images'),
                       'rule': selection.get('budget'), 'split_val_hash': evaluated.get('val_hash')}
