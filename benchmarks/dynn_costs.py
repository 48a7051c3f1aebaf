"""The early-exit pipeline's own costs on DEMO, against the project's targets:

  1. --eval (one cached pass, the latency table, real early exit at batch 1 on a spread of images) vs one plain
     forward pass over the validation and calibration images (target <= 1.5x; the reference runs the full
     network once per threshold, nine times);
  2. one warm-up epoch (frozen backbone, no autograd) vs one backbone training epoch (target <= 0.5x);
  3. FLOPs saved at the cheapest threshold within 1 point of full accuracy (target >= 30%).

  python -m benchmarks.dynn_costs [--checkpoint C] [--backbone B] [--json PATH]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import json_path, run_benchmark, write_json
from data_loader_help import build_loaders
from errors import OneLineParser
from evaluation.eval_report import evaluate_early_exit
from jobs.flags import add_flag, non_negative
from jobs.trained_run import reopen, reopen_data
from learning_helpers.backbone_stage import BackboneStep, train_one_epoch
from learning_helpers.losses import DistillationLoss
from learning_helpers.optim import NonFiniteGuard, build_optimizer
from learning_helpers.stage_common import RunConfig
from learning_helpers.warmup_stage import train_one_epoch as warmup_train_one_epoch
from models.flops import exit_gflops
from models.gfnet import GFNet
from models.model_factory import build_backbone

DEMO_DYNN = 'checkpoint/checkpoint_DEMO_0.75_confEE/best.pth'


def timed(fn) -> tuple[float, object]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


@torch.inference_mode()
def plain_forward_pass(model: torch.nn.Module, loader) -> None:
    for images, _ in loader:
        GFNet.forward(model, images)


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('benchmarks.dynn_costs', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(parser, '--checkpoint', default=DEMO_DYNN, help='dynn-stage checkpoint (make demo writes it)')
    add_flag(parser, '--data-set', default='DEMO')
    add_flag(parser, '--data-path', default=None)
    add_flag(parser, '--num_workers', check=non_negative, type=int, default=2)
    add_flag(parser, '--json', default=None, help='default: bench/dynn_costs.json')
    return parser


def run(args: argparse.Namespace) -> None:
    path = json_path(args.json, 'dynn_costs.json')
    device = torch.device('cpu')
    model, model_args, _ = reopen(args.checkpoint)
    data = reopen_data(model_args, args.data_set, args.data_path)  # the run's split, its calibration images included
    train_loader, val_loader = build_loaders(data.train, data.val, model_args.batch, args.num_workers, seed=0)
    calib_loader = build_loaders(None, data.calib, model_args.batch, args.num_workers, seed=0)[1] \
        if data.calib is not None else None
    class_names = data.classes
    gflops = exit_gflops(model)

    # One-time imports are not passes over the data: load scikit-learn (about 3 s) before the clock starts.
    import sklearn.metrics  # noqa: F401
    plain_forward_pass(model, val_loader)  # warm-up: first-call allocations, loader start-up code paths
    plain_seconds, _ = timed(lambda: [plain_forward_pass(model, loader) for loader in (val_loader, calib_loader)
                                      if loader is not None])
    eval_seconds, (report, _) = timed(lambda: evaluate_early_exit(
        model, val_loader, device, gflops_per_exit=gflops, class_names=class_names, calib_loader=calib_loader))

    run = RunConfig(num_epochs=1, seed=0, checkpoint_dir=Path('unused'), run_args={})  # no files written
    heads = build_optimizer([{'params': list(model.intermediate_heads.parameters())}], 'sgd', 5e-4, lr=1e-3)
    warmup_seconds, _ = timed(lambda: warmup_train_one_epoch(model, train_loader, heads, device, 0,
                                                             NonFiniteGuard(5), run))
    backbone = build_backbone(model_args.arch, len(class_names), model_args.input_size, model_args.patch_size, 0.0)
    criterion = DistillationLoss(torch.nn.CrossEntropyLoss(), None, 'none', 0.0, 1.0)
    adamw = build_optimizer([{'params': list(backbone.parameters())}], 'adamw', 0.05, lr=1e-3)
    backbone_seconds, _ = timed(lambda: train_one_epoch(backbone, criterion, train_loader, adamw, device, 0,
                                                        NonFiniteGuard(5), run, BackboneStep()))
    results = report.to_json()
    chosen = results['chosen']
    report = {
        'threads': torch.get_num_threads(), 'checkpoint': args.checkpoint,
        'plain_forward_pass_s': plain_seconds, 'eval_s': eval_seconds, 'eval_over_plain': eval_seconds / plain_seconds,
        'eval_cached_pass_s': results['timing']['cached_pass_seconds'],
        'eval_selection_set': results['selection']['set'],
        'eval_batch1_images': results['real_early_exit']['images'],
        'eval_batch1_mean_ms': results['real_early_exit']['mean_ms'],
        'eval_batch1_predicted_ms': results['real_early_exit']['predicted_mean_ms'],
        'warmup_epoch_s': warmup_seconds, 'backbone_epoch_s': backbone_seconds,
        'warmup_over_backbone': warmup_seconds / backbone_seconds,
        'full_accuracy': results['full_accuracy'], 'chosen_threshold': chosen['threshold'],
        'chosen_accuracy': chosen['accuracy'], 'flops_saving': chosen['flops_saving'],
    }
    print(f"--eval {eval_seconds:.1f} s vs plain forward pass {plain_seconds:.1f} s over validation + calibration "
          f"images: {report['eval_over_plain']:.2f}x (target <= 1.5x)")
    print(f"warm-up epoch {warmup_seconds:.1f} s vs backbone epoch {backbone_seconds:.1f} s: "
          f"{report['warmup_over_backbone']:.2f}x (target <= 0.5x)")
    print(f"threshold {chosen['threshold']:.2f}: {chosen['accuracy']:.2f}% vs full {results['full_accuracy']:.2f}%, "
          f"{100 * chosen['flops_saving']:.1f}% fewer FLOPs (target >= 30%)")
    print(f"written: {write_json(report, path, 'dynn_costs')}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: a user mistake prints one line and exits 2."""
    return run_benchmark(get_args_parser(), argv, run)


if __name__ == '__main__':
    sys.exit(main())
