"""GFNet-Dynn command line: train the backbone (stage 0), the early exits (stages 1-2), evaluate, export.

  python main_dynn.py --stage backbone --data-set UCM ...       distilled GFNet backbone
  python main_dynn.py --data-set UCM --checkpoint-path B ...   warm-up, then joint training of exits and gates
  python main_dynn.py --eval --data-set UCM --checkpoint-path C  per-exit accuracy, threshold sweep, plots
  python main_dynn.py --export onnx --checkpoint-path C --out D  one ONNX graph per segment, for edge runtimes
"""
import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from dataset_config import DATASET_CONFIG
from errors import GFNetDynnError, exit_code
from learning_helpers import model_factory
from learning_helpers.backbone_stage import BackboneStageConfig, run_backbone_stage
from learning_helpers.checkpoint import check_writable, load_resume_checkpoint, save_json
from learning_helpers.distributed import barrier, init_distributed, is_main_process
from learning_helpers.eval_stage import evaluate_early_exit, format_results_table
from learning_helpers.evaluation import DEFAULT_THRESHOLDS
from learning_helpers.joint_stage import PHASE_COUNTERS, JointStageConfig, dynn_param_groups, run_joint_stage
from learning_helpers.losses import CLASSIFIER_LOSSES, DistillationLoss, FrequencyDistillation
from learning_helpers.optim import build_optimizer, build_scheduler, default_weight_decay, restore_optimizer
from learning_helpers.warmup_stage import ExitPatience, WarmupStageConfig, run_warmup_stage
from models.flops import EXIT_COSTS, exit_gflops, normalized_exit_costs
from models.gates import GATES
from models.gfnet_dynn import DEFAULT_EXIT_POSITIONS
from models.weights import load_state, read_checkpoint


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as our one-line user error instead of the whole usage block."""

    def error(self, message: str):
        raise GFNetDynnError(f'{message}; see python main_dynn.py --help')


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        'main_dynn.py', description='GFNet-Dynn: distilled GFNet backbone with confidence-gated early exits.',
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data = parser.add_argument_group('data')
    data.add_argument('--data-set', type=str, default='DEMO', choices=sorted(DATASET_CONFIG),
                      help='dataset name, an entry of dataset_config.py')
    data.add_argument('--data-path', type=str, default=None,
                      help="dataset root; default: the entry's default_data_path (DEMO is generated there)")
    data.add_argument('--input-size', type=int, default=None,
                      help="image side in pixels; default: the checkpoint's, else the dataset's default")
    data.add_argument('--split-ratio', type=float, default=0.8, help='training share of a random split')
    data.add_argument('--reprob', type=float, default=0.0, help='random-erase probability (training)')
    data.add_argument('--skip-bad-images', action='store_true',
                      help='drop unreadable images with a warning instead of stopping')
    data.add_argument('--num_workers', type=int, default=2, help='data-loading worker processes')

    model = parser.add_argument_group('model')
    model.add_argument('--arch', type=str, default=None, choices=model_factory.arch_choices(),
                       help=f"architecture; default: the checkpoint's, else {model_factory.DEFAULT_ARCH}")
    model.add_argument('--patch-size', type=int, default=None,
                       help=f"patch side; default: the checkpoint's, else {model_factory.DEFAULT_PATCH_SIZE}")
    model.add_argument('--drop-path', type=float, default=0.0, help='stochastic depth rate of the last block')
    model.add_argument('--exit-positions', type=int, nargs='+', default=list(DEFAULT_EXIT_POSITIONS),
                       help='0-based blocks followed by an early exit')
    model.add_argument('--gate', type=str, default='unc', choices=sorted(GATES),
                       help='exit gate: learnable uncertainty gate, or identity (max probability, nothing to learn)')
    model.add_argument('--checkpoint-path', type=str, default=None,
                       help='weights to start from (training) or to evaluate/export (--eval, --export)')

    train = parser.add_argument_group('training')
    train.add_argument('--stage', type=str, default='dynn', choices=['backbone', 'dynn'],
                       help='backbone: plain GFNet (stage 0); dynn: exit warm-up then joint training')
    train.add_argument('--batch', type=int, default=64, help='training batch size (validation: 1.5x)')
    train.add_argument('--num_epoch', type=int, default=100, help='epochs of the stage (dynn: warm-up included)')
    train.add_argument('--opt', type=str, default=None, choices=['adamw', 'sgd'],
                       help='optimizer; default: adamw for the backbone stage, sgd for dynn')
    train.add_argument('--lr', type=float, default=1e-3, help='learning rate')
    train.add_argument('--min-lr', type=float, default=2e-4, help='cosine schedule floor')
    train.add_argument('--wd', type=float, default=None,
                       help='weight decay; default: 0.05 with adamw, 5e-4 with sgd')
    train.add_argument('--warmup-epochs', type=int, default=0, help='linear lr warm-up epochs (backbone stage)')
    train.add_argument('--smoothing', type=float, default=0.1, help='label smoothing (backbone stage)')
    train.add_argument('--amp', action='store_true',
                       help='bf16 mixed precision on CUDA (Ampere or newer; ignored on CPU)')
    train.add_argument('--max-nan-skips', type=int, default=5,
                       help='non-finite losses in a row tolerated (step skipped) before stopping')
    train.add_argument('--resume', type=str, default=None, help="a run's last.pth: continue where it stopped")
    train.add_argument('--barely_train', action='store_true', help='a few batches per epoch (smoke tests)')

    distill = parser.add_argument_group('distillation (backbone stage)')
    distill.add_argument('--teacher-model', type=str, default=None,
                         help='teacher: a GFNet variant (GFNet-b-dynn) or any timm model name')
    distill.add_argument('--teacher-path', type=str, default=None, help="teacher's weights on this dataset")
    distill.add_argument('--distillation-type', type=str, default='none', choices=['none', 'soft', 'hard', 'freq'],
                         help='soft: KL on logits; hard: CE on teacher argmax; freq: soft + frequency maps')
    distill.add_argument('--distillation-alpha', type=float, default=0.5, help='weight of the distillation term')
    distill.add_argument('--distillation-tau', type=float, default=1.0, help='softmax temperature')
    distill.add_argument('--distillation-freq-weight', type=float, default=1.0,
                         help='weight of the frequency term inside the freq distillation loss')

    dynn = parser.add_argument_group('early exits (dynn stage)')
    dynn.add_argument('--ce_ic_tradeoff', type=float, default=0.75,
                      help='lambda: accuracy vs inference-cost trade-off; higher exits earlier')
    dynn.add_argument('--patience', type=int, default=2, help='warm-up epochs without improvement before freezing')
    dynn.add_argument('--max_warmup_epoch', type=int, default=10, help='warm-up epochs at most')
    dynn.add_argument('--bilevel_batch_count', type=int, default=60, help='batches per gate/classifier phase')
    dynn.add_argument('--phase-counter', type=str, default='epoch', choices=PHASE_COUNTERS,
                      help='epoch: the phase counter restarts every epoch, gate phase first (the reference); '
                           'global: it runs across epochs (ours)')
    dynn.add_argument('--gate_objective', type=str, default='ce', choices=['ce', 'zero_one'],
                      help="per-exit error in the gates' target: cross-entropy or 0/1 error")
    dynn.add_argument('--classifier_loss', type=str, default='boosted', choices=sorted(CLASSIFIER_LOSSES),
                      help='classifier phase: boosted (the reference: equals the mean CE over the intermediate '
                           "exits) or gate_weighted (ours: exits weighted by the gates' exit mass, final included)")
    dynn.add_argument('--exit-costs', type=str, default='flops', choices=sorted(EXIT_COSTS),
                      help="exit costs the gates trade against: flops (true FLOPs) or reference (the reference "
                           "counter's flatter vector, to reproduce its released runs); reported GFLOPs stay true")
    dynn.add_argument('--transfer-ratio', type=float, default=0.01, help='backbone lr = lr * this in joint training')
    dynn.add_argument('--freeze-backbone', action='store_true', help='keep the backbone frozen in joint training')

    evaluation = parser.add_argument_group('evaluation and export')
    evaluation.add_argument('--eval', action='store_true', help='evaluate --checkpoint-path: sweep, table, plots')
    evaluation.add_argument('--thresholds', type=float, nargs='+', default=DEFAULT_THRESHOLDS,
                            help='gate thresholds of the sweep')
    evaluation.add_argument('--exit-threshold', type=float, default=None,
                            help='threshold of real early exit (--eval) and of the export; default: cheapest within '
                                 "1 point of full accuracy (--export: the one --eval chose, else 0.5)")
    evaluation.add_argument('--results-json', type=str, default=None,
                            help="default: results.json beside the evaluated checkpoint")
    evaluation.add_argument('--export', type=str, default=None, choices=['onnx'],
                            help='export --checkpoint-path for edge runtimes')
    evaluation.add_argument('--out', type=str, default=None, help='folder for --export')

    runtime = parser.add_argument_group('runtime')
    runtime.add_argument('--output-dir', type=str, default='.', help='where checkpoint*/ and runs/ go')
    runtime.add_argument('--device', type=str, default='auto', help='auto (cuda if available), cpu, cuda, cuda:N')
    runtime.add_argument('--seed', type=int, default=42, help='seed of the split, shuffles and initialisation')
    return parser


def validate_args(args: argparse.Namespace) -> None:
    """Reject impossible values with a message that names the flag."""
    checks = [
        (args.batch > 0, f'--batch must be positive, got {args.batch}'),
        (args.num_epoch > 0, f'--num_epoch must be positive, got {args.num_epoch}'),
        (args.lr > 0, f'--lr must be positive, got {args.lr}'),
        (args.min_lr >= 0, f'--min-lr must be >= 0, got {args.min_lr}'),
        (0 < args.split_ratio < 1, f'--split-ratio must lie strictly between 0 and 1, got {args.split_ratio}'),
        (args.input_size is None or args.input_size > 0, f'--input-size must be positive, got {args.input_size}'),
        (args.patch_size is None or args.patch_size > 0, f'--patch-size must be positive, got {args.patch_size}'),
        (args.patience > 0, f'--patience must be positive, got {args.patience}'),
        (args.bilevel_batch_count > 0, f'--bilevel_batch_count must be positive, got {args.bilevel_batch_count}'),
        (args.num_workers >= 0, f'--num_workers must be >= 0, got {args.num_workers}'),
        (0 <= args.distillation_alpha <= 1, f'--distillation-alpha must lie in [0, 1], got {args.distillation_alpha}'),
        (args.distillation_tau > 0, f'--distillation-tau must be positive, got {args.distillation_tau}'),
        (all(0 <= t <= 1 for t in args.thresholds), f'--thresholds must lie in [0, 1], got {args.thresholds}'),
        (not args.eval or args.checkpoint_path, '--eval needs --checkpoint-path (a best.pth of the dynn stage)'),
        (not args.export or args.checkpoint_path, '--export needs --checkpoint-path'),
        (not args.export or args.out, '--export needs --out DIR, the folder for the ONNX files'),
        (args.distillation_type == 'none' or args.teacher_model,
         f'--distillation-type {args.distillation_type} needs --teacher-model (and --teacher-path)'),
    ]
    for ok, message in checks:
        if not ok:
            raise GFNetDynnError(message)


def resolve_device(name: str, distributed_device: torch.device | None) -> torch.device:
    if distributed_device is not None:
        return distributed_device
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise GFNetDynnError(f'--device {name} is not a device; use auto, cpu, cuda or cuda:N') from error
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise GFNetDynnError(f'--device {name} asked for CUDA but no GPU is visible; use --device cpu')
    return device


def resolve_model_shape(args: argparse.Namespace, source_args: dict) -> dict:
    """Architecture, patch size and input size: the flag if given, else the checkpoint's, else the default."""
    arch = args.arch or source_args.get('arch') or model_factory.DEFAULT_ARCH
    patch_size = args.patch_size or source_args.get('patch_size') or model_factory.DEFAULT_PATCH_SIZE
    input_size = args.input_size or source_args.get('input_size') or DATASET_CONFIG[args.data_set][
        'default_input_size']
    if input_size < patch_size:
        raise GFNetDynnError(f'--input-size {input_size} is smaller than one patch ({patch_size} px); pass an '
                             f'--input-size of at least {patch_size}')
    if input_size % patch_size:  # the patch embedding floors the grid, as the official GFNet does
        logging.info('input %d px with %d px patches: a %d x %d token grid; the last %d pixels of each row and '
                     'column are not used', input_size, patch_size, input_size // patch_size,
                     input_size // patch_size, input_size % patch_size)
    return {'arch': arch, 'patch_size': patch_size, 'input_size': input_size}


def checkpoint_args(path: str | None) -> tuple[dict, dict]:
    """(checkpoint, its stored run args) or empty dicts when no checkpoint is given."""
    if not path:
        return {}, {}
    checkpoint = read_checkpoint(path)
    return checkpoint, checkpoint.get('args', {}) if isinstance(checkpoint.get('args'), dict) else {}


def build_data(args: argparse.Namespace, input_size: int, distributed: bool):
    """Datasets and loaders (imported here so --help stays fast)."""
    from data_loader_help import build_datasets, build_loaders, resolve_data_path
    if not is_main_process():
        barrier()  # under torchrun rank 0 goes first: it may generate DEMO, which the other ranks then read
    data_path = resolve_data_path(args.data_set, args.data_path)
    if is_main_process():
        barrier()
    train_set, val_set, class_names = build_datasets(
        args.data_set, data_path, input_size, split_ratio=args.split_ratio, seed=args.seed,
        reprob=args.reprob, skip_bad_images=args.skip_bad_images)
    train_loader, val_loader = build_loaders(train_set, val_set, args.batch, args.num_workers, args.seed,
                                             distributed=distributed)
    return train_loader, val_loader, class_names


def run_args_dict(args: argparse.Namespace, shape: dict, class_names: list[str]) -> dict:
    """Plain-data copy of the run's arguments with the resolved shape: checkpoints stay weights_only."""
    return {**vars(args), **shape, 'class_names': list(class_names)}


def make_writer(output_dir: Path, name: str) -> SummaryWriter | None:
    if not is_main_process():
        return None
    return SummaryWriter(log_dir=str(output_dir / 'runs' / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"))


def build_criterion(args: argparse.Namespace, student: torch.nn.Module, num_classes: int, shape: dict,
                    device: torch.device) -> DistillationLoss:
    from timm.loss import LabelSmoothingCrossEntropy
    base = LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing > 0 else torch.nn.CrossEntropyLoss()
    teacher, frequency = None, None
    if args.distillation_type != 'none':
        teacher = model_factory.build_teacher(args.teacher_model, args.teacher_path, num_classes,
                                              shape['input_size'], shape['patch_size']).to(device)
        if args.distillation_type == 'freq':
            if not hasattr(teacher, 'forward_tokens'):
                raise GFNetDynnError('--distillation-type freq compares token maps and needs a GFNet teacher '
                                     '(e.g. --teacher-model GFNet-b-dynn); use soft for other teachers')
            frequency = FrequencyDistillation(student.embed_dim, teacher.embed_dim, len(student.blocks),
                                              len(teacher.blocks))
    return DistillationLoss(base, teacher, args.distillation_type, args.distillation_alpha, args.distillation_tau,
                            frequency, args.distillation_freq_weight).to(device)


def run_backbone(args: argparse.Namespace, device: torch.device, distributed: bool, resume: dict) -> Path:
    """Stage 0: plain GFNet, optionally distilled."""
    start, source_args = checkpoint_args(args.checkpoint_path)
    shape = resolve_model_shape(args, resume.get('args', source_args))
    train_loader, val_loader, class_names = build_data(args, shape['input_size'], distributed)
    model = model_factory.build_backbone(shape['arch'], len(class_names), shape['input_size'], shape['patch_size'],
                                         args.drop_path)
    if start:
        load_state(model, start, source=args.checkpoint_path)
    model.to(device)
    criterion = build_criterion(args, model, len(class_names), shape, device)
    opt = args.opt or 'adamw'
    optimizer = build_optimizer([{'params': list(model.parameters()) + list(criterion.parameters())}], opt,
                                args.lr, default_weight_decay(opt) if args.wd is None else args.wd)
    scheduler = build_scheduler(optimizer, args.num_epoch, args.min_lr / args.lr, warmup_epochs=args.warmup_epochs)
    start_epoch, best_acc = 0, 0.0
    if resume:
        model.load_state_dict(resume['model'])
        criterion.load_learned_state_dict(resume['criterion'])
        restore_optimizer(optimizer, scheduler, resume, args.resume)
        start_epoch, best_acc = resume['epoch'] + 1, resume['best_acc']
    train_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    out_dir = Path(args.output_dir)
    config = BackboneStageConfig(
        num_epochs=args.num_epoch, seed=args.seed,
        checkpoint_dir=out_dir / 'checkpoint' / f"backbone_{args.data_set}_{shape['arch']}",
        run_args=run_args_dict(args, shape, class_names), max_batches=4 if args.barely_train else None,
        amp=args.amp, max_nan_skips=args.max_nan_skips)
    writer = make_writer(out_dir, f"backbone_{args.data_set}_{shape['arch']}")
    summary = run_backbone_stage(train_model, criterion, train_loader, val_loader, optimizer, scheduler, device,
                                 config, writer, start_epoch, best_acc)
    if is_main_process():
        print(f"backbone stage done: best val acc {summary['best_acc']:.2f}%; checkpoint: {summary['best_path']}")
    return summary['best_path']


def run_dynn(args: argparse.Namespace, device: torch.device, distributed: bool, resume: dict) -> Path:
    """Stages 1-2: warm-up of the exits, then joint training with the cost trade-off."""
    start, source_args = checkpoint_args(None if resume else args.checkpoint_path)
    shape = resolve_model_shape(args, resume.get('args', source_args))
    train_loader, val_loader, class_names = build_data(args, shape['input_size'], distributed)
    model = model_factory.build_dynn(shape['arch'], len(class_names), shape['input_size'], shape['patch_size'],
                                     args.drop_path, args.exit_positions, args.gate)
    if start:
        load_state(model, start, source=args.checkpoint_path)
    elif not resume:
        logging.warning('no --checkpoint-path: training exits on a randomly initialised backbone; train one '
                        'first with --stage backbone')
    if resume:
        model.load_state_dict(resume['model'])
    model.to(device)
    out_dir = Path(args.output_dir)
    run_args = run_args_dict(args, shape, class_names)
    checkpoint_dir = out_dir / 'checkpoint' / f'checkpoint_{args.data_set}_{args.ce_ic_tradeoff}_confEE'
    max_batches = 4 if args.barely_train else None
    writer = make_writer(out_dir, f'dynn_{args.data_set}_{args.ce_ic_tradeoff}')
    # one optimizer for both stages, as in the reference; its cosine schedule steps only after joint epochs
    opt = args.opt or 'sgd'
    optimizer = build_optimizer(dynn_param_groups(model, args.lr, args.transfer_ratio), opt, args.lr,
                                default_weight_decay(opt) if args.wd is None else args.wd)
    scheduler = build_scheduler(optimizer, args.num_epoch, args.min_lr / args.lr)
    if resume:
        restore_optimizer(optimizer, scheduler, resume, args.resume)

    joint_start = resume['stage_start_epoch'] if resume.get('stage') == 'joint' else None
    if joint_start is None:
        patience = ExitPatience(len(model.exit_positions), args.patience)
        if resume:  # stage 'warmup'
            patience.load_state_dict(resume['warmup'])
        warmup_config = WarmupStageConfig(
            max_epochs=min(args.max_warmup_epoch, args.num_epoch), patience=args.patience, seed=args.seed,
            warmup_dir=out_dir / 'checkpoint_warmup' / (f"{args.data_set}_{shape['arch']}_{shape['input_size']}_"
                                                        f'{args.max_warmup_epoch}'),
            checkpoint_dir=checkpoint_dir, run_args=run_args, max_batches=max_batches, amp=args.amp,
            max_nan_skips=args.max_nan_skips)
        joint_start = run_warmup_stage(model, train_loader, val_loader, optimizer, scheduler, device,
                                       warmup_config, writer, patience, resume['epoch'] + 1 if resume else 0)
    if joint_start >= args.num_epoch:  # warm-up only: its last.pth is the checkpoint this run wrote last
        logging.warning('the warm-up used all %d epochs: the gates were not trained and no best.pth was written; '
                        'pass a --num_epoch larger than --max_warmup_epoch %d', args.num_epoch,
                        args.max_warmup_epoch)
        if is_main_process():
            print(f"dynn stages done: warm-up only; checkpoint: {checkpoint_dir / 'last.pth'}")
        return checkpoint_dir / 'last.pth'
    costs = torch.tensor(EXIT_COSTS[args.exit_costs](model))
    pos_weight, start_epoch, global_step, best_acc = torch.ones(len(model.exit_positions)), joint_start, 0, 0.0
    if resume.get('stage') == 'joint':
        pos_weight, global_step = resume['pos_weight'], resume['global_step']
        start_epoch, best_acc = resume['epoch'] + 1, resume['best_acc']
    joint_config = JointStageConfig(
        num_epochs=args.num_epoch, tradeoff=args.ce_ic_tradeoff, bilevel_batch_count=args.bilevel_batch_count,
        phase_counter=args.phase_counter, gate_objective=args.gate_objective, classifier_loss=args.classifier_loss,
        freeze_backbone=args.freeze_backbone, seed=args.seed, checkpoint_dir=checkpoint_dir, run_args=run_args,
        max_batches=max_batches, amp=args.amp, max_nan_skips=args.max_nan_skips)
    summary = run_joint_stage(model, train_loader, val_loader, optimizer, scheduler, device, costs,
                              normalized_exit_costs(model), joint_config, writer, start_epoch=start_epoch,
                              stage_start_epoch=joint_start, pos_weight=pos_weight, global_step=global_step,
                              best_acc=best_acc)
    if is_main_process():
        print(f"dynn stages done: best gated val acc {summary['best_acc']:.2f}%; checkpoint: {summary['best_path']}")
    return summary['best_path']


def load_for_inference(args: argparse.Namespace) -> tuple[torch.nn.Module, dict, dict]:
    """The early-exit model of --checkpoint-path, built from the checkpoint's own args; also those args and the
    checkpoint itself."""
    checkpoint, source_args = checkpoint_args(args.checkpoint_path)
    shape = resolve_model_shape(args, source_args)
    fallback = {**vars(args), **shape}
    model, model_args = model_factory.load_dynn_checkpoint(checkpoint, args.checkpoint_path,
                                                           input_size=shape['input_size'], fallback=fallback)
    return model, model_args, checkpoint


def run_eval(args: argparse.Namespace, device: torch.device) -> Path:
    """--eval: per-exit accuracy, the cached threshold sweep, real early exit, results.json and plots."""
    from learning_helpers.plots import plot_confusion, plot_tradeoff
    model, model_args, checkpoint = load_for_inference(args)
    json_path = Path(args.results_json) if args.results_json else default_results_json(args.checkpoint_path)
    check_writable(json_path.parent, '--results-json')  # before the evaluation, not after it
    _, val_loader, class_names = build_data(args, model_args['input_size'], distributed=False)
    if len(class_names) != model.num_classes:
        raise GFNetDynnError(f'{args.checkpoint_path} predicts {model.num_classes} classes but --data-set '
                             f'{args.data_set} has {len(class_names)}; evaluate it on the dataset it was trained on')
    model.to(device)
    results, _ = evaluate_early_exit(
        model, val_loader, device, thresholds=args.thresholds, exit_threshold=args.exit_threshold,
        gflops_per_exit=exit_gflops(model), class_names=class_names, conformal=checkpoint.get('conformal'),
        max_batches=4 if args.barely_train else None, amp=args.amp)
    results = {'dataset': args.data_set, 'arch': model_args['arch'], 'input_size': model_args['input_size'],
               'checkpoint': str(args.checkpoint_path), 'device': str(device), **results}
    save_json(json_path, results)
    tradeoff_png = plot_tradeoff(results, json_path.with_name(json_path.stem + '_tradeoff.png'))
    confusion_png = plot_confusion(results, json_path.with_name(json_path.stem + '_confusion.png'))
    print(format_results_table(results))
    print(f'results: {json_path}\nplots: {tradeoff_png} {confusion_png}')
    return json_path


def run_export(args: argparse.Namespace) -> Path:
    """--export onnx: one graph per segment plus a manifest, for onnxruntime on edge boards."""
    from models.onnx_export import export_segments
    model, model_args, _ = load_for_inference(args)
    threshold = args.exit_threshold if args.exit_threshold is not None else evaluated_threshold(args.checkpoint_path)
    out = export_segments(model, check_writable(args.out, '--out'), threshold=threshold,
                          class_names=model_args['class_names'], input_size=model_args['input_size'])
    print(f'exported {len(model.exit_positions) + 1} ONNX segments (exit threshold {threshold:g}) to '
          f'{out.parent}; run them with:\n  python -m models.onnx_runner {out.parent} IMAGE [IMAGE ...]')
    return out


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


def run(args: argparse.Namespace) -> Path:
    """Validate, set up the process, dispatch to the requested job."""
    validate_args(args)
    resume = {}
    if args.resume:
        resume = load_resume_checkpoint(args.resume)
        stored = resume['args']
        if resume['epoch'] + 1 >= stored['num_epoch']:
            raise GFNetDynnError(f"nothing to resume: {args.resume} finished its last epoch "
                                 f"({stored['num_epoch']}); raise --num_epoch in a new run instead")
        # the stored arguments make the resumed run identical to the uninterrupted one
        runtime = {key: getattr(args, key) for key in ('device', 'num_workers', 'resume')}
        # a flag the checkpoint predates keeps its default
        args = argparse.Namespace(**{**vars(args), **{k: v for k, v in stored.items() if hasattr(args, k)},
                                     **runtime})
        args.stage = 'backbone' if resume['stage'] == 'backbone' else 'dynn'
    distributed, distributed_device = init_distributed(args.device)
    device = resolve_device(args.device, distributed_device)
    if args.amp and device.type != 'cuda':
        logging.warning('--amp has no effect on %s: mixed precision runs on CUDA only; training in float32',
                        device.type)
    torch.manual_seed(args.seed)
    if args.export:
        return run_export(args)
    check_writable(args.output_dir)
    if args.eval:
        return run_eval(args, device)
    if args.stage == 'backbone':
        path = run_backbone(args, device, distributed, resume)
    else:
        path = run_dynn(args, device, distributed, resume)
    barrier()
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one line on stderr and exit 2; bugs keep their traceback."""
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s', force=True)
    return exit_code(lambda: run(get_args_parser().parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
