"""--eval and --export, wired from the command line's arguments: the checkpoint's own model, outputs checked
before any work, then the report or the ONNX folder."""
import argparse
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Subset

from data_loader_help import build_datasets, resolve_data_path
from data_splits import split_summary
from errors import GFNetDynnError
from learning_helpers import model_factory
from learning_helpers.checkpoint import save_json
from learning_helpers.eval_report import evaluate_early_exit, format_results_table
from learning_helpers.operating_points import parse_budget
from learning_helpers.outputs import check_export_folder, check_output_file, replace_folder
from learning_helpers.risk_control import RiskControl
from learning_helpers.run_setup import (build_data, checkpoint_args, recorded_split, resolve_model_shape,
                                        split_request)
from models.flops import exit_gflops

CHECKPOINT_SHAPE_FLAGS = ('arch', 'patch_size', 'exit_positions', 'gate')  # --eval / --export take the checkpoint's


def load_for_inference(args: argparse.Namespace, given: set[str],
                       names: dict[str, str]) -> tuple[torch.nn.Module, dict, dict]:
    """The early-exit model of --checkpoint-path, built from the checkpoint's own args; also those args and the
    checkpoint itself. A model flag that contradicts the checkpoint, or a checkpoint without trained exits, is
    an error."""
    checkpoint, source_args = checkpoint_args(args.checkpoint_path)
    for dest in CHECKPOINT_SHAPE_FLAGS:
        stored = source_args.get(dest)
        if dest in given and stored is not None and getattr(args, dest) != stored:
            raise GFNetDynnError(f'{names[dest]} {getattr(args, dest)} differs from the checkpoint\'s ({stored}): '
                                 f'the model is built as it was trained; drop {names[dest]}')
    shape = resolve_model_shape(args, source_args)
    fallback = {**vars(args), **shape}
    model, model_args = model_factory.load_dynn_checkpoint(checkpoint, args.checkpoint_path,
                                                           input_size=shape['input_size'], fallback=fallback)
    return model, model_args, checkpoint


def run_eval(args: argparse.Namespace, given: set[str], names: dict[str, str], device: torch.device) -> Path:
    """--eval: per-exit accuracy, the cached threshold sweep, real early exit, results.json and plots."""
    from learning_helpers.plots import plot_confusion, plot_tradeoff
    json_path = results_json_path(args, given)
    plot_paths = [json_path.with_name(json_path.stem + suffix) for suffix in ('_tradeoff.png', '_confusion.png')]
    flag = '--output-dir' if 'output_dir' in given else '--results-json'
    check_output_file(json_path, 'results', flag)  # before the evaluation, not after it
    for path in plot_paths:
        check_output_file(path, 'plot', flag)
    model, model_args, checkpoint = load_for_inference(args, given, names)
    recorded = recorded_split(checkpoint.get('args', {}), args.data_set)
    data = build_data(args, model_args['input_size'], distributed=False, recorded=recorded, need_train=False)
    val_loader, class_names = data.val_loader, data.classes
    if len(class_names) != model.num_classes:
        raise GFNetDynnError(f'{args.checkpoint_path} predicts {model.num_classes} classes but --data-set '
                             f'{args.data_set} has {len(class_names)}; evaluate it on the dataset it was trained on')
    model.to(device)
    results, _ = evaluate_early_exit(
        model, val_loader, device, gflops_per_exit=exit_gflops(model), class_names=class_names,
        budget=parse_budget(args.budget), risk=RiskControl(args.risk_control, args.delta, args.risk_loss),
        exit_threshold=args.exit_threshold, thresholds=args.thresholds,
        calib_loader=data.calib_loader,
        conformal=checkpoint.get('conformal'), max_batches=4 if args.barely_train else None, amp=args.amp)
    results = {'dataset': args.data_set, 'arch': model_args['arch'], 'input_size': model_args['input_size'],
               'checkpoint': str(args.checkpoint_path), 'device': str(device),
               'split': split_summary(data.split, (recorded or {}).get('file')), **results}
    save_json(json_path, results)
    tradeoff_png = plot_tradeoff(results, plot_paths[0])
    confusion_png = plot_confusion(results, plot_paths[1])
    print(format_results_table(results))
    print(f'results: {json_path}\nplots: {tradeoff_png} {confusion_png}')
    return json_path


def run_export(args: argparse.Namespace, given: set[str], names: dict[str, str]) -> Path:
    """--export onnx: one graph per segment plus a manifest, for onnxruntime on edge boards; with --quantize int8
    also statically quantised twins, calibrated on training images. The export is written beside --out first
    and replaces it whole once complete."""
    from models.onnx_export import export_segments
    from models.onnx_quantize import quantize_segments
    out = check_export_folder(args.out)
    model, model_args, checkpoint = load_for_inference(args, given, names)
    calibration = None
    if args.quantize:  # read the images before the export: a data problem stops the job before the long part
        calibration = calibration_images(args, model_args['input_size'],
                                         recorded_split(checkpoint.get('args', {}), args.data_set), args.calib_images)
    threshold = args.exit_threshold if args.exit_threshold is not None else evaluated_threshold(args.checkpoint_path)
    staged = out.with_name(f'.{out.name}.partial')
    shutil.rmtree(staged, ignore_errors=True)
    try:
        export_segments(model, staged, threshold=threshold, class_names=model_args['class_names'],
                        input_size=model_args['input_size'], checkpoint=str(args.checkpoint_path))
        if calibration is not None:
            quantize_segments(staged, calibration)
        replace_folder(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    kinds = 'float and int8' if args.quantize else 'float'
    precision = ' --precision int8' if args.quantize else ''
    print(f'exported {len(model.exit_positions) + 1} {kinds} ONNX segments (exit threshold {threshold:g}) to '
          f'{out}; run them with:\n  python -m models.onnx_runner{precision} {out} IMAGE_OR_FOLDER [...]')
    return out / 'manifest.json'


def calibration_images(args: argparse.Namespace, input_size: int, recorded: dict | None, count: int) -> np.ndarray:
    """`count` training images (of the split the checkpoint trained on), spread evenly over the sorted file list
    so that every class is present, preprocessed as the ONNX runner does: (count, 3, size, size) float32."""
    from models.onnx_runner import preprocess
    train_set = build_datasets(args.data_set, resolve_data_path(args.data_set, args.data_path), input_size,
                               split=split_request(args, recorded), skip_bad_images=args.skip_bad_images).train
    if isinstance(train_set, Subset):
        paths = [train_set.dataset.samples[i][0] for i in train_set.indices]
    else:
        paths = [path for path, _ in train_set.samples]
    if count > len(paths):
        raise GFNetDynnError(f'--calib-images {count}: the training set of {args.data_set} holds {len(paths)} images; '
                             f'pass --calib-images {len(paths)} or fewer')
    chosen = np.linspace(0, len(paths) - 1, count).round().astype(int)
    return np.stack([preprocess(paths[i], input_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) for i in chosen])


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


def evaluated_threshold(checkpoint_path: str, fallback: float = 0.5) -> float:
    """The threshold --eval chose for this checkpoint (results.json beside it), else `fallback`."""
    try:
        return float(json.loads(default_results_json(checkpoint_path).read_text())['chosen']['threshold'])
    except (OSError, ValueError, KeyError, TypeError):
        logging.info('no --exit-threshold and no results.json beside the checkpoint: exporting with %g', fallback)
        return fallback
