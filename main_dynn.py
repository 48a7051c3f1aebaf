"""GFNet-Dynn command line: train the backbone (stage 0), the early exits (stages 1-2), evaluate, export.

  python main_dynn.py --stage backbone --data-set UCM ...       distilled GFNet backbone
  python main_dynn.py --data-set UCM --checkpoint-path B ...   warm-up, then joint training of exits and gates
  python main_dynn.py --eval --data-set UCM --checkpoint-path C  per-exit accuracy, threshold sweep, plots
  python main_dynn.py --export onnx --checkpoint-path C --out D  one ONNX graph per segment, for edge runtimes
"""
import argparse
import json
import logging
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from dataset_config import DATASET_CONFIG
from data_loader_help import dataset_entry
from errors import GFNetDynnError, Interrupted, OneLineParser, exit_code
from learning_helpers import model_factory
from learning_helpers.backbone_stage import BackboneStageConfig, run_backbone_stage
from learning_helpers.checkpoint import load_resume_checkpoint, save_json
from learning_helpers.distributed import barrier, init_distributed, is_main_process
from learning_helpers.eval_report import evaluate_early_exit, format_results_table
from learning_helpers.exit_cache import DEFAULT_THRESHOLDS
from learning_helpers.joint_stage import PHASE_COUNTERS, JointStageConfig, dynn_param_groups, run_joint_stage
from learning_helpers.loop import TrainingStopped
from learning_helpers.losses import CLASSIFIER_LOSSES, DistillationLoss, FrequencyDistillation
from learning_helpers.optim import build_optimizer, build_scheduler, default_weight_decay, restore_optimizer
from learning_helpers.outputs import (check_export_folder, check_new_run, check_output_file, folder_lock,
                                      remove_previous_run, replace_folder, writable_location)
from learning_helpers.warmup_stage import ExitPatience, WarmupStageConfig, run_warmup_stage
from models.flops import EXIT_COSTS, exit_gflops, normalized_exit_costs
from models.gates import GATES
from models.gfnet_dynn import DEFAULT_EXIT_POSITIONS
from models.weights import load_state, read_checkpoint


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser('python main_dynn.py', formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           description='GFNet-Dynn: distilled GFNet backbone with confidence-gated early exits.')
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
                            help='default: results.json in --output-dir if given, else beside the checkpoint')
    evaluation.add_argument('--export', type=str, default=None, choices=['onnx'],
                            help='export --checkpoint-path for edge runtimes')
    evaluation.add_argument('--out', type=str, default=None, help='folder for --export')

    runtime = parser.add_argument_group('runtime')
    runtime.add_argument('--output-dir', type=str, default='.',
                         help='where checkpoint*/ and runs/ go; with --eval, the folder of results.json (default '
                              'there: beside the checkpoint)')
    runtime.add_argument('--overwrite', action='store_true',
                         help="replace an earlier run's checkpoints in the run folder instead of stopping")
    runtime.add_argument('--device', type=str, default='auto', help='auto (cuda if available), cpu, cuda, cuda:N')
    runtime.add_argument('--seed', type=int, default=42, help='seed of the split, shuffles and initialisation')
    return parser


TRAINING_JOBS = frozenset({'backbone', 'dynn'})
DATA_JOBS = frozenset({'backbone', 'dynn', 'eval'})
# Flags that act in some jobs only: given to another job they would be ignored, so they are an error. A flag
# not listed acts in every job. --arch, --patch-size, --exit-positions and --gate also reach --eval and
# --export, where they must match the checkpoint.
FLAG_JOBS = {
    'data_path': DATA_JOBS, 'split_ratio': DATA_JOBS, 'reprob': TRAINING_JOBS, 'skip_bad_images': DATA_JOBS,
    'num_workers': DATA_JOBS, 'drop_path': TRAINING_JOBS, 'exit_positions': {'dynn', 'eval', 'export'},
    'gate': {'dynn', 'eval', 'export'}, 'stage': TRAINING_JOBS, 'batch': DATA_JOBS, 'num_epoch': TRAINING_JOBS,
    'opt': TRAINING_JOBS, 'lr': TRAINING_JOBS, 'min_lr': TRAINING_JOBS, 'wd': TRAINING_JOBS,
    'warmup_epochs': {'backbone'}, 'smoothing': {'backbone'}, 'amp': DATA_JOBS, 'max_nan_skips': TRAINING_JOBS,
    'resume': TRAINING_JOBS, 'barely_train': DATA_JOBS,
    **{dest: {'backbone'} for dest in ('teacher_model', 'teacher_path', 'distillation_type', 'distillation_alpha',
                                       'distillation_tau', 'distillation_freq_weight')},
    **{dest: {'dynn'} for dest in ('ce_ic_tradeoff', 'patience', 'max_warmup_epoch', 'bilevel_batch_count',
                                   'phase_counter', 'gate_objective', 'classifier_loss', 'exit_costs',
                                   'transfer_ratio', 'freeze_backbone')},
    'eval': {'eval'}, 'thresholds': {'eval'}, 'results_json': {'eval'}, 'exit_threshold': {'eval', 'export'},
    'export': {'export'}, 'out': {'export'}, 'output_dir': {'backbone', 'dynn', 'eval'}, 'device': DATA_JOBS,
    'seed': DATA_JOBS, 'overwrite': TRAINING_JOBS,
}
CHECKPOINT_SHAPE_FLAGS = ('arch', 'patch_size', 'exit_positions', 'gate')  # --eval / --export take the checkpoint's
RESUME_MAY_CHANGE = frozenset({'resume', 'device', 'num_workers', 'data_path'})  # how a run runs, not what it is
PATH_FLAGS = ('data_path', 'checkpoint_path', 'teacher_path', 'output_dir')
DYNN_STAGES = ('warmup', 'joint')  # what a dynn-stage checkpoint says under 'stage'


def option_names() -> dict[str, str]:
    """dest -> the flag as users write it (--data-set, --num_epoch)."""
    return {action.dest: action.option_strings[0] for action in get_args_parser()._actions if action.option_strings}


def given_flags(argv: list[str] | None) -> set[str]:
    """The dests of the flags written on the command line; argparse fills in the others with defaults."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def job_of(args: argparse.Namespace) -> str:
    if args.eval and args.export:
        raise GFNetDynnError('--eval and --export are separate jobs; run one, then the other')
    return 'export' if args.export else 'eval' if args.eval else args.stage


def _describe_jobs(jobs) -> str:
    words = {'backbone': '--stage backbone', 'dynn': '--stage dynn', 'eval': '--eval', 'export': '--export'}
    named = [words[job] for job in ('backbone', 'dynn', 'eval', 'export') if job in jobs]
    return ' and '.join(named) if len(named) < 3 else f"{', '.join(named[:-1])} and {named[-1]}"


def check_flags_apply(job: str, given: set[str], args: argparse.Namespace) -> None:
    """Every flag on the command line acts in this job: none is silently ignored."""
    names = option_names()
    for dest in sorted(given):
        jobs = FLAG_JOBS.get(dest)
        if jobs is not None and job not in jobs:
            raise GFNetDynnError(f'{names[dest]} has no effect with {_describe_jobs({job})}: it applies to '
                                 f'{_describe_jobs(jobs)}; drop it')
    if job == 'backbone' and args.distillation_type == 'none':
        extra = sorted(names[d] for d in given & {'teacher_model', 'teacher_path', 'distillation_alpha',
                                                  'distillation_tau', 'distillation_freq_weight'})
        if extra:
            raise GFNetDynnError(f"{', '.join(extra)} given without distillation (--distillation-type none): pass "
                                 f'--distillation-type soft, hard or freq, or drop them')
    if job == 'eval' and {'output_dir', 'results_json'} <= given:
        raise GFNetDynnError('--output-dir has no effect when --results-json names the file; drop one of them')


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
        (args.exit_threshold is None or 0 <= args.exit_threshold <= 1,
         f'--exit-threshold must lie in [0, 1], got {args.exit_threshold}'),
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
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GFNetDynnError(f'--device {name} is not available in this PyTorch ({reason}); use --device cpu '
                             f'or cuda') from None
    return device


def backbone_run_folder(output_dir: str | Path, data_set: str, arch: str) -> Path:
    return Path(output_dir) / 'checkpoint' / f'backbone_{data_set}_{arch}'


def dynn_run_folder(output_dir: str | Path, data_set: str, tradeoff: float) -> Path:
    return Path(output_dir) / 'checkpoint' / f'checkpoint_{data_set}_{tradeoff}_confEE'


def warmup_folder(output_dir: str | Path, data_set: str, arch: str, input_size: int, max_warmup_epoch: int,
                  tradeoff: float) -> Path:
    """The reference's checkpoint_warmup/{dataset}_{arch}_{size}_{max warm-up}, plus lambda: one per run."""
    return Path(output_dir) / 'checkpoint_warmup' / f'{data_set}_{arch}_{input_size}_{max_warmup_epoch}_{tradeoff}'


def _same(dest: str, value, stored) -> bool:
    if dest in PATH_FLAGS and value is not None and stored is not None:
        return Path(value).resolve() == Path(stored).resolve()
    return value == stored


def resumed_args(args: argparse.Namespace, given: set[str]) -> tuple[argparse.Namespace, dict]:
    """--resume: the run's own arguments back, in the run's own folder. A flag that would change the run is a
    one-line error; only how it runs (device, workers, data location) may change."""
    checkpoint = load_resume_checkpoint(args.resume)
    stored = checkpoint['args']
    stage = 'backbone' if checkpoint['stage'] == 'backbone' else 'dynn'
    folder = Path(args.resume).resolve().parent
    if checkpoint['epoch'] + 1 >= stored['num_epoch']:
        raise GFNetDynnError(f"nothing to resume: {args.resume} finished its last epoch ({checkpoint['epoch']}, "
                             f"counted from 0, of --num_epoch {stored['num_epoch']}); to train further, start a new "
                             f"run from its best.pth: --checkpoint-path {folder / 'best.pth'} --num_epoch N "
                             f'--output-dir NEW')
    expected = (backbone_run_folder('.', stored.get('data_set'), stored.get('arch')) if stage == 'backbone' else
                dynn_run_folder('.', stored.get('data_set'), stored.get('ce_ic_tradeoff'))).name
    if folder.name != expected or folder.parent.name != 'checkpoint':
        raise GFNetDynnError(f'{args.resume} is not in its run folder (OUTPUT/checkpoint/{expected}/); --resume '
                             f'continues a run where it was written: put the file back there')
    names = option_names()
    run_args = {**vars(args), **{k: v for k, v in stored.items() if hasattr(args, k)}}  # flags added since: default
    run_args.update(stage=stage, output_dir=str(folder.parent.parent))
    for dest in sorted(given - RESUME_MAY_CHANGE):
        if not _same(dest, getattr(args, dest), run_args.get(dest)):
            raise GFNetDynnError(f'{names[dest]} {getattr(args, dest)} would change the run {args.resume} continues '
                                 f'(it has {run_args.get(dest)}); --resume continues a run as it was started: drop '
                                 f'{names[dest]}, or start a new run from its best.pth with --checkpoint-path')
    run_args.update({dest: getattr(args, dest) for dest in RESUME_MAY_CHANGE if dest in given or dest == 'resume'})
    return argparse.Namespace(**run_args), checkpoint


def resolve_model_shape(args: argparse.Namespace, source_args: dict) -> dict:
    """Architecture, patch size and input size: the flag if given, else the checkpoint's, else the default."""
    arch = args.arch or source_args.get('arch') or model_factory.DEFAULT_ARCH
    patch_size = args.patch_size or source_args.get('patch_size') or model_factory.DEFAULT_PATCH_SIZE
    input_size = args.input_size or source_args.get('input_size') or dataset_entry(args.data_set)[
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
    """(train loader, val loader, class names, the data folder). Imported here so --help stays fast."""
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
    return train_loader, val_loader, class_names, data_path


def run_args_dict(args: argparse.Namespace, shape: dict, class_names: list[str], data_path: Path) -> dict:
    """Plain-data copy of the run's arguments with the resolved shape, paths made absolute so that --resume
    works from any directory: checkpoints stay weights_only."""
    run_args = {**vars(args), **shape, 'class_names': list(class_names), 'data_path': str(Path(data_path).resolve())}
    for dest in PATH_FLAGS:
        if run_args.get(dest):
            run_args[dest] = str(Path(run_args[dest]).resolve())
    return run_args


def make_writer(output_dir: Path, name: str) -> SummaryWriter | None:
    if not is_main_process():
        return None
    return SummaryWriter(log_dir=str(output_dir / 'runs' / f"{name}_{time.strftime('%Y%m%d-%H%M%S')}"))


@contextmanager
def claim_run(folders: list[Path], overwrite: bool):
    """This process writes `folders` (created, the first one locked) for the block; with `overwrite` the files an
    earlier run left there go first. Ctrl-C inside becomes one line naming what to resume from."""
    with folder_lock(folders[0]) if is_main_process() else nullcontext():
        if is_main_process():
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
                if overwrite:
                    remove_previous_run(folder)
        try:
            yield
        except KeyboardInterrupt as stop:
            where = f'in {stop}' if isinstance(stop, TrainingStopped) else 'while validating or saving'
            last = folders[0] / 'last.pth'
            if last.is_file():
                raise Interrupted(f'{where}; the last finished epoch is in {last}: continue with python '
                                  f'main_dynn.py --resume {last}') from None
            raise Interrupted(f'{where}, before the first epoch finished: nothing was saved') from None


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
    start, source_args = checkpoint_args(None if resume else args.checkpoint_path)
    if start.get('stage') in DYNN_STAGES:
        raise GFNetDynnError(f'--checkpoint-path {args.checkpoint_path} is a dynn-stage checkpoint (exits and gates); '
                             f'--stage backbone starts from a backbone checkpoint or official GFNet weights: pass '
                             f'the backbone_*/best.pth it was trained from, or continue its run with --resume')
    shape = resolve_model_shape(args, resume.get('args', source_args))
    model = model_factory.build_backbone(shape['arch'], dataset_num_classes(args.data_set), shape['input_size'],
                                         shape['patch_size'], args.drop_path)
    if start:
        load_state(model, start, source=args.checkpoint_path)
    out_dir = Path(args.output_dir)
    run_folder = backbone_run_folder(out_dir, args.data_set, shape['arch'])
    if not resume:
        check_new_run([run_folder], args.overwrite, {'--checkpoint-path': args.checkpoint_path,
                                                     '--teacher-path': args.teacher_path})
    writable_location(out_dir, '--output-dir')
    train_loader, val_loader, class_names, data_path = build_data(args, shape['input_size'], distributed)
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
    config = BackboneStageConfig(
        num_epochs=args.num_epoch, seed=args.seed, checkpoint_dir=run_folder,
        run_args=run_args_dict(args, shape, class_names, data_path), max_batches=4 if args.barely_train else None,
        amp=args.amp, max_nan_skips=args.max_nan_skips)
    with claim_run([run_folder], args.overwrite and not resume):
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
    model = model_factory.build_dynn(shape['arch'], dataset_num_classes(args.data_set), shape['input_size'],
                                     shape['patch_size'], args.drop_path, args.exit_positions, args.gate)
    if start:
        load_state(model, start, source=args.checkpoint_path)
    elif not resume:
        logging.warning('no --checkpoint-path: training exits on a randomly initialised backbone; train one '
                        'first with --stage backbone')
    if resume:
        model.load_state_dict(resume['model'])
    out_dir = Path(args.output_dir)
    checkpoint_dir = dynn_run_folder(out_dir, args.data_set, args.ce_ic_tradeoff)
    heads_dir = warmup_folder(out_dir, args.data_set, shape['arch'], shape['input_size'], args.max_warmup_epoch,
                              args.ce_ic_tradeoff)
    if not resume:
        check_new_run([checkpoint_dir, heads_dir], args.overwrite, {'--checkpoint-path': args.checkpoint_path})
    writable_location(out_dir, '--output-dir')
    train_loader, val_loader, class_names, data_path = build_data(args, shape['input_size'], distributed)
    model.to(device)
    run_args = run_args_dict(args, shape, class_names, data_path)
    max_batches = 4 if args.barely_train else None
    # one optimizer for both stages, as in the reference; its cosine schedule steps only after joint epochs
    opt = args.opt or 'sgd'
    optimizer = build_optimizer(dynn_param_groups(model, args.lr, args.transfer_ratio), opt, args.lr,
                                default_weight_decay(opt) if args.wd is None else args.wd)
    scheduler = build_scheduler(optimizer, args.num_epoch, args.min_lr / args.lr)
    if resume:
        restore_optimizer(optimizer, scheduler, resume, args.resume)
    with claim_run([checkpoint_dir, heads_dir], args.overwrite and not resume):
        writer = make_writer(out_dir, f'dynn_{args.data_set}_{args.ce_ic_tradeoff}')
        joint_start = resume['stage_start_epoch'] if resume.get('stage') == 'joint' else None
        if joint_start is None:
            patience = ExitPatience(len(model.exit_positions), args.patience)
            if resume:  # stage 'warmup'
                patience.load_state_dict(resume['warmup'])
            warmup_config = WarmupStageConfig(
                max_epochs=min(args.max_warmup_epoch, args.num_epoch), patience=args.patience, seed=args.seed,
                warmup_dir=heads_dir, checkpoint_dir=checkpoint_dir, run_args=run_args, max_batches=max_batches,
                amp=args.amp, max_nan_skips=args.max_nan_skips)
            joint_start = run_warmup_stage(model, train_loader, val_loader, optimizer, scheduler, device,
                                           warmup_config, writer, patience, resume['epoch'] + 1 if resume else 0)
        if joint_start >= args.num_epoch:  # warm-up only: its last.pth is the checkpoint this run wrote last
            logging.warning('the warm-up used all %d epochs: the gates were not trained and no best.pth was '
                            'written; pass a --num_epoch larger than --max_warmup_epoch %d', args.num_epoch,
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
            phase_counter=args.phase_counter, gate_objective=args.gate_objective,
            classifier_loss=args.classifier_loss, freeze_backbone=args.freeze_backbone, seed=args.seed,
            checkpoint_dir=checkpoint_dir, run_args=run_args, max_batches=max_batches, amp=args.amp,
            max_nan_skips=args.max_nan_skips)
        summary = run_joint_stage(model, train_loader, val_loader, optimizer, scheduler, device, costs,
                                  normalized_exit_costs(model), joint_config, writer, start_epoch=start_epoch,
                                  stage_start_epoch=joint_start, pos_weight=pos_weight, global_step=global_step,
                                  best_acc=best_acc)
    if is_main_process():
        print(f"dynn stages done: best gated val acc {summary['best_acc']:.2f}%; checkpoint: {summary['best_path']}")
    return summary['best_path']


def dataset_num_classes(data_set: str) -> int:
    """The class count dataset_config.py promises (the data folder is checked against it when read)."""
    return dataset_entry(data_set)['num_classes']


def load_for_inference(args: argparse.Namespace, given: set[str]) -> tuple[torch.nn.Module, dict, dict]:
    """The early-exit model of --checkpoint-path, built from the checkpoint's own args; also those args and the
    checkpoint itself. A model flag that contradicts the checkpoint, or a checkpoint without trained exits, is
    an error."""
    checkpoint, source_args = checkpoint_args(args.checkpoint_path)
    names = option_names()
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


def run_eval(args: argparse.Namespace, given: set[str], device: torch.device) -> Path:
    """--eval: per-exit accuracy, the cached threshold sweep, real early exit, results.json and plots."""
    from learning_helpers.plots import plot_confusion, plot_tradeoff
    json_path = results_json_path(args, given)
    plot_paths = [json_path.with_name(json_path.stem + suffix) for suffix in ('_tradeoff.png', '_confusion.png')]
    flag = '--output-dir' if 'output_dir' in given else '--results-json'
    check_output_file(json_path, 'results', flag)  # before the evaluation, not after it
    for path in plot_paths:
        check_output_file(path, 'plot', flag)
    model, model_args, checkpoint = load_for_inference(args, given)
    _, val_loader, class_names, _ = build_data(args, model_args['input_size'], distributed=False)
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
    tradeoff_png = plot_tradeoff(results, plot_paths[0])
    confusion_png = plot_confusion(results, plot_paths[1])
    print(format_results_table(results))
    print(f'results: {json_path}\nplots: {tradeoff_png} {confusion_png}')
    return json_path


def run_export(args: argparse.Namespace, given: set[str]) -> Path:
    """--export onnx: one graph per segment plus a manifest, for onnxruntime on edge boards. The export is
    written beside --out first and replaces it whole once complete."""
    from models.onnx_export import export_segments
    out = check_export_folder(args.out)
    model, model_args, _ = load_for_inference(args, given)
    threshold = args.exit_threshold if args.exit_threshold is not None else evaluated_threshold(args.checkpoint_path)
    staged = out.with_name(f'.{out.name}.partial')
    shutil.rmtree(staged, ignore_errors=True)
    try:
        export_segments(model, staged, threshold=threshold, class_names=model_args['class_names'],
                        input_size=model_args['input_size'])
        replace_folder(staged, out)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    print(f'exported {len(model.exit_positions) + 1} ONNX segments (exit threshold {threshold:g}) to '
          f'{out}; run them with:\n  python -m models.onnx_runner {out} IMAGE [IMAGE ...]')
    return out / 'manifest.json'


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


def run(args: argparse.Namespace, given: set[str]) -> Path:
    """Check every flag, set up the process, dispatch to the requested job."""
    validate_args(args)
    resume = {}
    if args.resume:
        args, resume = resumed_args(args, given)
    job = job_of(args)
    check_flags_apply(job, given, args)
    distributed, distributed_device = init_distributed(args.device)
    device = resolve_device(args.device, distributed_device)
    if args.amp and device.type != 'cuda':
        logging.warning('--amp has no effect on %s: mixed precision runs on CUDA only; running in float32',
                        device.type)
    torch.manual_seed(args.seed)
    if job == 'export':
        return run_export(args, given)
    if job == 'eval':
        return run_eval(args, given, device)
    path = (run_backbone if job == 'backbone' else run_dynn)(args, device, distributed, resume)
    barrier()
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one line on stderr and exit 2, Ctrl-C one line and 130; bugs keep
    their traceback."""
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s', force=True)
    return exit_code(lambda: run(get_args_parser().parse_args(argv), given_flags(argv)))


if __name__ == '__main__':
    sys.exit(main())
