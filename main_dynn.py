"""GFNet-Dynn command line: train the backbone (stage 0), the early exits (stages 1-2), evaluate, export.

  python main_dynn.py --stage backbone --data-set UCM ...       distilled GFNet backbone
  python main_dynn.py --data-set UCM --checkpoint-path B ...   warm-up, then joint training of exits and gates
  python main_dynn.py --eval --data-set UCM --checkpoint-path C  per-exit accuracy, threshold sweep, plots
  python main_dynn.py --export onnx --checkpoint-path C --out D  one ONNX graph per segment, for edge runtimes
"""
import argparse
import logging
import sys
from pathlib import Path

import torch

from dataset_config import DATASET_CONFIG
from errors import GFNetDynnError, OneLineParser, exit_code
from learning_helpers import model_factory
from learning_helpers.distributed import barrier, init_distributed
from learning_helpers.inference_jobs import run_eval, run_export
from learning_helpers.joint_stage import PHASE_COUNTERS
from learning_helpers.losses import CLASSIFIER_LOSSES
from learning_helpers.operating_points import DEFAULT_BUDGET, parse_budget
from learning_helpers.run_setup import (AUGMENT_FLAGS, PATH_FLAGS, backbone_run_folder, dynn_run_folder,
                                        resolve_device)
from learning_helpers.stage_common import load_resume_checkpoint
from learning_helpers.train_jobs import run_backbone, run_dynn
from models.flops import EXIT_COSTS
from models.gates import GATES
from models.gfnet_dynn import DEFAULT_EXIT_POSITIONS


def budget_arg(text: str) -> str:
    """--budget's type: checked by parse_budget (its message is argparse's one-line error), kept as the text,
    since run args are stored in checkpoints as plain data."""
    try:
        return str(parse_budget(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


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
    data.add_argument('--train-ratio', '--split-ratio', '--split_ratio', dest='train_ratio', type=float, default=None,
                      help="training share when one folder of class folders is split; default: the checkpoint's "
                           "split, else the entry's first protocol ratio, else 0.8")
    data.add_argument('--split-seed', type=int, default=None,
                      help="seed of that split; default: the checkpoint's, else 42 (the reference's)")
    data.add_argument('--calib-ratio', type=float, default=None,
                      help="share of the training images held out of every stage for --eval to choose its threshold "
                           "on (stratified, e.g. 0.1); default: the checkpoint's, else 0 (none: --eval chooses on the "
                           "validation images it reports)")
    data.add_argument('--split-file', type=str, default=None,
                      help='a published split: a splits/*.json this tool wrote, or a torchgeo *-train.txt')
    augment = parser.add_argument_group('training augmentation (default: the data set entry\'s train_augment, '
                                        'else the reference\'s recipe)')
    augment.add_argument('--scale', type=float, nargs=2, default=None, help='RandomResizedCrop area range (0.08 1)')
    augment.add_argument('--ratio', type=float, nargs=2, default=None,
                         help='RandomResizedCrop aspect range (0.75 1.33)')
    augment.add_argument('--hflip', type=float, default=None, help='horizontal flip probability (0.5)')
    augment.add_argument('--vflip', type=float, default=None, help='vertical flip probability (0)')
    augment.add_argument('--aa', type=str, default=None, help="auto-augment policy (rand-m9-mstd0.5-inc1) or 'none'")
    augment.add_argument('--color-jitter', type=float, default=None,
                         help='colour jitter strength (0.4; timm applies it only without --aa)')
    augment.add_argument('--train-interpolation', type=str, default=None, help='bicubic, bilinear, nearest or random')
    augment.add_argument('--no-aug', action='store_true', default=None,
                         help='no augmentation: resize and centre crop, as for evaluation')
    augment.add_argument('--reprob', type=float, default=None, help='random-erase probability (0)')
    data = parser.add_argument_group('data loading')
    data.add_argument('--skip-bad-images', action='store_true',
                      help='drop unreadable images with a warning instead of stopping')
    data.add_argument('--num_workers', type=int, default=2, help='data-loading worker processes')

    model = parser.add_argument_group('model')
    model.add_argument('--arch', type=str, default=None,
                       help=f"architecture, one of {', '.join(model_factory.arch_choices())}, a timm ResNet, "
                            f"EfficientNet, MobileNetV3, ConvNeXt or ViT (resnet18), or with --stage backbone any "
                            f"timm model name; default: the checkpoint's, else {model_factory.DEFAULT_ARCH}")
    model.add_argument('--patch-size', type=int, default=None,
                       help=f"patch side; default: the checkpoint's, else {model_factory.DEFAULT_PATCH_SIZE}")
    model.add_argument('--drop-path', type=float, default=0.0, help='stochastic depth rate of the last block')
    model.add_argument('--exit-positions', type=int, nargs='+', default=None,
                       help="0-based blocks (GFNet, ViT) or stages (CNNs) followed by an early exit; default: the "
                            f"architecture's ({' '.join(map(str, DEFAULT_EXIT_POSITIONS))} for GFNet; README lists "
                            "the others), with --eval and --export the checkpoint's")
    model.add_argument('--gate', type=str, default='unc', choices=sorted(GATES),
                       help='exit gate: learnable uncertainty gate, or identity (max probability, nothing to learn)')
    model.add_argument('--checkpoint-path', type=str, default=None,
                       help='weights to start from (training) or to evaluate/export (--eval, --export)')
    model.add_argument('--pretrained', type=str, default=None,
                       help='backbone stage: ImageNet weights of --arch from a local file, loaded by timm (a head '
                            'of another class count is dropped)')

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
    train.add_argument('--warmup-epochs', type=int, default=0,
                       help='backbone stage: epochs of linear learning-rate warm-up (not the exit warm-up, see '
                            '--max_warmup_epoch)')
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
    dynn.add_argument('--max_warmup_epoch', type=int, default=10,
                      help='dynn stage: at most this many epochs of exit warm-up (stage 1) before joint training')
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
    evaluation.add_argument('--thresholds', type=float, nargs='+', default=None,
                            help='gate thresholds of the printed sweep table (results.json always holds the whole '
                                 'front); default: about 12 points of the front')
    evaluation.add_argument('--budget', type=budget_arg, default=DEFAULT_BUDGET,
                            help='how --eval picks its threshold: acc-drop=P (cheapest point within P points of the '
                                 'full network), gflops=X (most accurate point with expected GFLOPs <= X) or '
                                 'latency-ms=X (most accurate point with expected batch-1 latency <= X ms here)')
    evaluation.add_argument('--exit-threshold', type=float, default=None,
                            help='threshold of real early exit (--eval) and of the export, instead of --budget\'s; '
                                 "--export's default: the one --eval chose, else 0.5")
    evaluation.add_argument('--results-json', type=str, default=None,
                            help='default: results.json in --output-dir if given, else beside the checkpoint')
    evaluation.add_argument('--export', type=str, default=None, choices=['onnx'],
                            help='export --checkpoint-path for edge runtimes')
    evaluation.add_argument('--out', type=str, default=None, help='folder for --export')
    evaluation.add_argument('--quantize', type=str, default=None, choices=['int8'],
                            help='--export onnx: also write statically quantised int8 segments (QDQ), calibrated on '
                                 'training images of --data-set')
    evaluation.add_argument('--calib-images', type=int, default=256,
                            help='--quantize: training images the int8 calibration reads')

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
# The data flags --export reads with --quantize (calibration images), and only then.
CALIBRATION_FLAGS = ('data_path', 'train_ratio', 'split_seed', 'split_file', 'skip_bad_images')
FLAG_JOBS = {
    **{dest: DATA_JOBS | {'export'} for dest in CALIBRATION_FLAGS}, 'calib_ratio': DATA_JOBS, 'budget': {'eval'},
    **{dest: TRAINING_JOBS for dest in AUGMENT_FLAGS},
    'num_workers': DATA_JOBS, 'drop_path': TRAINING_JOBS, 'exit_positions': {'dynn', 'eval', 'export'},
    'gate': {'dynn', 'eval', 'export'}, 'stage': TRAINING_JOBS, 'batch': DATA_JOBS, 'num_epoch': TRAINING_JOBS,
    'opt': TRAINING_JOBS, 'lr': TRAINING_JOBS, 'min_lr': TRAINING_JOBS, 'wd': TRAINING_JOBS,
    'warmup_epochs': {'backbone'}, 'smoothing': {'backbone'}, 'amp': DATA_JOBS, 'max_nan_skips': TRAINING_JOBS,
    'resume': TRAINING_JOBS, 'barely_train': DATA_JOBS, 'pretrained': {'backbone'},
    **{dest: {'backbone'} for dest in ('teacher_model', 'teacher_path', 'distillation_type', 'distillation_alpha',
                                       'distillation_tau', 'distillation_freq_weight')},
    **{dest: {'dynn'} for dest in ('ce_ic_tradeoff', 'patience', 'max_warmup_epoch', 'bilevel_batch_count',
                                   'phase_counter', 'gate_objective', 'classifier_loss', 'exit_costs',
                                   'transfer_ratio', 'freeze_backbone')},
    'eval': {'eval'}, 'thresholds': {'eval'}, 'results_json': {'eval'}, 'exit_threshold': {'eval', 'export'},
    'export': {'export'}, 'out': {'export'}, 'quantize': {'export'}, 'calib_images': {'export'},
    'output_dir': {'backbone', 'dynn', 'eval'}, 'device': DATA_JOBS,
    'seed': DATA_JOBS, 'overwrite': TRAINING_JOBS,
}
RESUME_MAY_CHANGE = frozenset({'resume', 'device', 'num_workers', 'data_path'})  # how a run runs, not what it is


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
    if job == 'eval' and {'budget', 'exit_threshold'} <= given:
        raise GFNetDynnError('--exit-threshold fixes the threshold, so --budget has no effect; drop one of them')
    if job == 'export' and not args.quantize:
        extra = sorted(names[d] for d in given & {*CALIBRATION_FLAGS, 'calib_images'})
        if extra:
            raise GFNetDynnError(f"{', '.join(extra)} given with --export but without --quantize int8, the only export "
                                 f'that reads images (for calibration): add --quantize int8, or drop them')
    if job == 'eval' and {'output_dir', 'results_json'} <= given:
        raise GFNetDynnError('--output-dir has no effect when --results-json names the file; drop one of them')


def validate_args(args: argparse.Namespace) -> None:
    """Reject impossible values with a message that names the flag."""
    checks = [
        (args.batch > 0, f'--batch must be positive, got {args.batch}'),
        (args.num_epoch > 0, f'--num_epoch must be positive, got {args.num_epoch}'),
        (args.lr > 0, f'--lr must be positive, got {args.lr}'),
        (args.min_lr >= 0, f'--min-lr must be >= 0, got {args.min_lr}'),
        (args.input_size is None or args.input_size > 0, f'--input-size must be positive, got {args.input_size}'),
        (args.patch_size is None or args.patch_size > 0, f'--patch-size must be positive, got {args.patch_size}'),
        (args.patience > 0, f'--patience must be positive, got {args.patience}'),
        (args.bilevel_batch_count > 0, f'--bilevel_batch_count must be positive, got {args.bilevel_batch_count}'),
        (args.num_workers >= 0, f'--num_workers must be >= 0, got {args.num_workers}'),
        (0 <= args.distillation_alpha <= 1, f'--distillation-alpha must lie in [0, 1], got {args.distillation_alpha}'),
        (args.distillation_tau > 0, f'--distillation-tau must be positive, got {args.distillation_tau}'),
        (all(0 <= t <= 1 for t in args.thresholds or []), f'--thresholds must lie in [0, 1], got {args.thresholds}'),
        (args.calib_ratio is None or 0 <= args.calib_ratio < 1,
         f'--calib-ratio must lie in [0, 1), e.g. 0.1, got {args.calib_ratio}'),
        (args.exit_threshold is None or 0 <= args.exit_threshold <= 1,
         f'--exit-threshold must lie in [0, 1], got {args.exit_threshold}'),
        (not args.eval or args.checkpoint_path, '--eval needs --checkpoint-path (a best.pth of the dynn stage)'),
        (not args.export or args.checkpoint_path, '--export needs --checkpoint-path'),
        (not args.export or args.out, '--export needs --out DIR, the folder for the ONNX files'),
        (args.calib_images > 0, f'--calib-images must be positive, got {args.calib_images}'),
        (not (args.pretrained and args.checkpoint_path),
         '--pretrained and --checkpoint-path both give starting weights; pass one of them'),
        (args.distillation_type == 'none' or args.teacher_model,
         f'--distillation-type {args.distillation_type} needs --teacher-model (and --teacher-path)'),
    ]
    for ok, message in checks:
        if not ok:
            raise GFNetDynnError(message)


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


def run(args: argparse.Namespace, given: set[str]) -> Path:
    """Check every flag, set up the process, dispatch to the requested job."""
    validate_args(args)
    resume = {}
    if args.resume:
        args, resume = resumed_args(args, given)
    job = job_of(args)
    check_flags_apply(job, given, args)
    model_factory.check_arch(args.arch, job)
    distributed, distributed_device = init_distributed(args.device)
    device = resolve_device(args.device, distributed_device)
    if args.amp and device.type != 'cuda':
        logging.warning('--amp has no effect on %s: mixed precision runs on CUDA only; running in float32',
                        device.type)
    torch.manual_seed(args.seed)
    if job == 'export':
        return run_export(args, given, option_names())
    if job == 'eval':
        return run_eval(args, given, option_names(), device)
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
