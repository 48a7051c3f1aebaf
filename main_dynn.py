"""GFNet-Dynn command line: train the backbone (stage 0), the early exits (stages 1-2), evaluate, export.

  python main_dynn.py --stage backbone --data-set UCM ...       distilled GFNet backbone
  python main_dynn.py --data-set UCM --checkpoint-path B ...   warm-up, then joint training of exits and gates
  python main_dynn.py --eval --data-set UCM --checkpoint-path C  per-exit accuracy, threshold sweep, plots
  python main_dynn.py --export onnx --checkpoint-path C --out D  one ONNX graph per segment, for edge runtimes
"""
import argparse
import logging
import signal
import sys
from pathlib import Path

from errors import stopped_while_loading

if __name__ == '__main__':  # Ctrl-C while torch and timm load (seconds): one line, not an import traceback
    signal.signal(signal.SIGINT, stopped_while_loading)

import torch

from dataset_config import DATASET_CONFIG
from deployment.exporters import EXPORTERS
from errors import GFNetDynnError, OneLineParser, exit_code
from evaluation.operating_points import DEFAULT_BUDGET, parse_budget
from evaluation.risk_control import DEFAULT_DELTA, RISK_LOSSES, RISK_RULES
from jobs.flags import (BACKBONE, DYNN, EVAL, EXPORT, READS_DATA, TRAINING, add_flag, below_one, bounded, check_ranges,
                        flag_jobs, non_negative, positive, probability, split_ratio)
from jobs.inference_jobs import run_eval, run_export
from jobs.run_setup import PATH_FLAGS, backbone_run_folder, dynn_run_folder, resolve_device
from jobs.train_jobs import run_backbone, run_dynn
from jobs.trained_run import RunArgs
from learning_helpers.distributed import barrier, init_distributed
from learning_helpers.joint_stage import PHASE_COUNTERS
from learning_helpers.losses import CLASSIFIER_LOSSES, FINAL_EXIT_LOSS
from learning_helpers.stage_common import extend_hint, finished, load_resume_checkpoint
from models import model_factory
from models.flops import EXIT_COSTS
from models.gates import GATES
from models.gfnet_dynn import DEFAULT_EXIT_POSITIONS


# Upper bounds of the learning rates: far above any useful value, low enough that a typo (1e30) is refused.
MAX_LR, MAX_GATE_LR = 10.0, 100.0  # a gate is 5 numbers read by a sigmoid: it tolerates a far larger lr
LR_RANGE = bounded(0, MAX_LR, low_open=True)


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
    add_flag(data, '--data-set', type=str, default='DEMO', choices=sorted(DATASET_CONFIG),
             help='dataset name, an entry of dataset_config.py')
    add_flag(data, '--data-path', type=str, default=None, jobs=READS_DATA | EXPORT,
             help="dataset root; default: the entry's default_data_path (DEMO is generated there)")
    add_flag(data, '--input-size', type=int, default=None, check=positive,
             help="image side in pixels; default: the checkpoint's, else the dataset's default")
    add_flag(data, '--train-ratio', '--split-ratio', '--split_ratio', dest='train_ratio', type=float, default=None,
             jobs=READS_DATA | EXPORT, check=split_ratio,
             help="training share when one folder of class folders is split; default: the checkpoint's "
                  "split, else the entry's first protocol ratio, else 0.8")
    add_flag(data, '--split-seed', type=int, default=None, jobs=READS_DATA | EXPORT, check=non_negative,
             help="seed of that split; default: the checkpoint's, else 42 (the reference's)")
    add_flag(data, '--calib-ratio', type=float, default=None, jobs=READS_DATA,
             check=bounded(0, 1, high_open=True, text='must lie in [0, 1), e.g. 0.1'),
             help="share of the training images held out of every stage for --eval to choose its threshold "
                  "on (stratified, e.g. 0.1); default: the checkpoint's, else 0 (none: --eval chooses on the "
                  "validation images it reports)")
    add_flag(data, '--split-file', type=str, default=None, jobs=READS_DATA | EXPORT,
             help='a published split: a splits/*.json this tool wrote, or a torchgeo *-train.txt')
    augment = parser.add_argument_group('training augmentation (default: the data set entry\'s train_augment, '
                                        'else the reference\'s recipe)')
    add_flag(augment, '--scale', type=float, nargs=2, default=None, jobs=TRAINING, check=positive,
             help='RandomResizedCrop area range (0.08 1)')
    add_flag(augment, '--ratio', type=float, nargs=2, default=None, jobs=TRAINING, check=positive,
             help='RandomResizedCrop aspect range (0.75 1.33)')
    add_flag(augment, '--hflip', type=float, default=None, jobs=TRAINING, check=probability,
             help='horizontal flip probability (0.5)')
    add_flag(augment, '--vflip', type=float, default=None, jobs=TRAINING, check=probability,
             help='vertical flip probability (0)')
    add_flag(augment, '--aa', type=str, default=None, jobs=TRAINING,
             help="auto-augment policy (rand-m9-mstd0.5-inc1) or 'none'")
    add_flag(augment, '--color-jitter', type=float, default=None, jobs=TRAINING, check=non_negative,
             help='colour jitter strength (0.4; timm applies it only without --aa)')
    add_flag(augment, '--train-interpolation', type=str, default=None, jobs=TRAINING,
             help='bicubic, bilinear, nearest or random')
    add_flag(augment, '--no-aug', action='store_true', default=None, jobs=TRAINING,
             help='no augmentation: resize and centre crop, as for evaluation')
    add_flag(augment, '--reprob', type=float, default=None, jobs=TRAINING, check=probability,
             help='random-erase probability (0)')
    data = parser.add_argument_group('data loading')
    add_flag(data, '--skip-bad-images', action='store_true', jobs=READS_DATA | EXPORT,
             help='drop unreadable images with a warning instead of stopping')
    add_flag(data, '--check-images', action='store_true', jobs=READS_DATA | EXPORT,
             help='fully decode every image before training (slower); without it, headers and file structure are '
                  'checked')
    add_flag(data, '--num_workers', type=int, default=2, jobs=READS_DATA | EXPORT, check=non_negative,
             help='data-loading worker processes')

    model = parser.add_argument_group('model')
    add_flag(model, '--arch', type=str, default=None,
             help=f"architecture, one of {', '.join(model_factory.arch_choices())}, a timm ResNet, EfficientNet, "
                  f"MobileNetV3, ConvNeXt or ViT (resnet18), or with --stage backbone any timm model name; "
                  f"default: the checkpoint's, else {model_factory.DEFAULT_ARCH}")
    add_flag(model, '--patch-size', type=int, default=None, check=positive,
             help=f"patch side; default: the checkpoint's, else {model_factory.DEFAULT_PATCH_SIZE}")
    add_flag(model, '--drop-path', type=float, default=0.0, jobs=TRAINING, check=below_one,
             help='stochastic depth rate of the last block')
    add_flag(model, '--exit-positions', type=int, nargs='+', default=None, jobs=DYNN | EVAL | EXPORT,
             check=non_negative,
             help="0-based blocks (GFNet, ViT) or stages (CNNs) followed by an early exit; default: the "
                  f"architecture's ({' '.join(map(str, DEFAULT_EXIT_POSITIONS))} for GFNet; README lists the "
                  "others), with --eval and --export the checkpoint's")
    add_flag(model, '--gate', type=str, default='unc', choices=sorted(GATES), jobs=DYNN | EVAL | EXPORT,
             help='exit gate: learnable uncertainty gate, or identity (max probability, nothing to learn)')
    add_flag(model, '--checkpoint-path', type=str, default=None,
             help='weights to start from (training) or to evaluate/export (--eval, --export)')
    add_flag(model, '--pretrained', type=str, default=None, jobs=BACKBONE,
             help='backbone stage: ImageNet weights of --arch from a local file, loaded by timm (a head '
                  'of another class count is dropped)')

    train = parser.add_argument_group('training')
    add_flag(train, '--stage', type=str, default='dynn', choices=['backbone', 'dynn'], jobs=TRAINING,
             help='backbone: plain GFNet (stage 0); dynn: exit warm-up then joint training')
    add_flag(train, '--batch', type=int, default=64, jobs=READS_DATA, check=positive,
             help='training batch size (validation: 1.5x)')
    add_flag(train, '--num_epoch', type=int, default=100, jobs=TRAINING, check=positive,
             help='epochs of the stage (dynn: warm-up included)')
    add_flag(train, '--opt', type=str, default=None, choices=['adamw', 'sgd'], jobs=TRAINING,
             help='optimizer; default: adamw for the backbone stage, sgd for dynn')
    add_flag(train, '--lr', type=float, default=1e-3, jobs=TRAINING, check=LR_RANGE, help='learning rate')
    add_flag(train, '--min-lr', type=float, default=2e-4, jobs=TRAINING, check=bounded(0, MAX_LR),
             help='cosine schedule floor')
    add_flag(train, '--wd', type=float, default=None, jobs=TRAINING, check=non_negative,
             help='weight decay; default: 0.05 with adamw, 5e-4 with sgd')
    add_flag(train, '--warmup-epochs', type=int, default=0, jobs=BACKBONE, check=non_negative,
             help='backbone stage: epochs of linear learning-rate warm-up (not the exit warm-up, see '
                  '--max_warmup_epoch)')
    add_flag(train, '--smoothing', type=float, default=0.1, jobs=BACKBONE, check=below_one,
             help='label smoothing (backbone stage)')
    add_flag(train, '--amp', action='store_true', jobs=READS_DATA,
             help='bf16 mixed precision on CUDA (Ampere or newer; ignored on CPU)')
    add_flag(train, '--max-nan-skips', type=int, default=5, jobs=TRAINING, check=non_negative,
             help='non-finite losses in a row tolerated (step skipped) before stopping')
    add_flag(train, '--resume', type=str, default=None, jobs=TRAINING,
             help="a run's last.pth: continue where it stopped")
    add_flag(train, '--barely_train', action='store_true', jobs=READS_DATA,
             help='a few batches per epoch (smoke tests)')

    distill = parser.add_argument_group('distillation (backbone stage)')
    add_flag(distill, '--teacher-model', type=str, default=None, jobs=BACKBONE,
             help='teacher: a GFNet variant (GFNet-b-dynn) or any timm model name')
    add_flag(distill, '--teacher-path', type=str, default=None, jobs=BACKBONE, help="teacher's weights on this dataset")
    add_flag(distill, '--distillation-type', type=str, default='none', choices=['none', 'soft', 'hard', 'freq'],
             jobs=BACKBONE, help='soft: KL on logits; hard: CE on teacher argmax; freq: soft + frequency maps')
    add_flag(distill, '--distillation-alpha', type=float, default=0.5, jobs=BACKBONE, check=probability,
             help='weight of the distillation term')
    add_flag(distill, '--distillation-tau', type=float, default=1.0, jobs=BACKBONE, check=positive,
             help='softmax temperature')
    add_flag(distill, '--distillation-freq-weight', type=float, default=1.0, jobs=BACKBONE, check=non_negative,
             help='weight of the frequency term inside the freq distillation loss')

    dynn = parser.add_argument_group('early exits (dynn stage)')
    add_flag(dynn, '--ce_ic_tradeoff', type=float, default=0.75, jobs=DYNN, check=non_negative,
             help='lambda: accuracy vs inference-cost trade-off; higher exits earlier')
    add_flag(dynn, '--patience', type=int, default=2, jobs=DYNN, check=positive,
             help='warm-up epochs without improvement before freezing')
    add_flag(dynn, '--max_warmup_epoch', type=int, default=10, jobs=DYNN, check=non_negative,
             help='dynn stage: at most this many epochs of exit warm-up (stage 1) before joint training')
    add_flag(dynn, '--bilevel_batch_count', type=int, default=60, jobs=DYNN, check=positive,
             help='batches per gate/classifier phase')
    add_flag(dynn, '--phase-counter', type=str, default='epoch', choices=PHASE_COUNTERS, jobs=DYNN,
             help='epoch: the phase counter restarts every epoch, gate phase first (the reference); '
                  'global: it runs across epochs (ours)')
    add_flag(dynn, '--gate_objective', type=str, default='ce', choices=['ce', 'zero_one'], jobs=DYNN,
             help="per-exit error in the gates' target: cross-entropy or 0/1 error")
    add_flag(dynn, '--classifier_loss', type=str, default='boosted', choices=sorted(CLASSIFIER_LOSSES), jobs=DYNN,
             help='classifier phase: boosted (the reference: equals the mean CE over the intermediate '
                  "exits) or gate_weighted (ours: exits weighted by the gates' exit mass, final included)")
    add_flag(dynn, '--final-exit-loss', type=str, default='off', choices=FINAL_EXIT_LOSS, jobs=DYNN,
             help="off: the reference's classifier-phase loss alone; auto (ours): while the backbone trains in "
                  "joint training, the final exit's CE joins it, a guard against the full network drifting in "
                  'long runs (--freeze-backbone is always the reference)')
    add_flag(dynn, '--exit-costs', type=str, default='reference', choices=sorted(EXIT_COSTS), jobs=DYNN,
             help="exit costs the gates trade against: reference (the reference counter's flatter vector, so "
                  "--ce_ic_tradeoff means what it means there) or flops (true FLOPs: the same lambda exits "
                  "earlier, see docs/METHOD.md); reported GFLOPs are always true FLOPs")
    add_flag(dynn, '--transfer-ratio', type=float, default=0.01, jobs=DYNN, check=bounded(0, 1),
             help='backbone lr = lr * this in joint training')
    add_flag(dynn, '--gate-lr', type=float, default=None, jobs=DYNN, check=bounded(0, MAX_GATE_LR, low_open=True),
             help="the gates' lr (default: --lr, the reference's one group for exits and gates); each gate is 5 "
                  'numbers read by a sigmoid: at a small lr over a short run they stay near their random start')
    add_flag(dynn, '--new-head', action='store_true', jobs=DYNN,
             help='start the final classifier fresh when --checkpoint-path predicts another number of classes than '
                  '--data-set has (without it, that is an error)')
    add_flag(dynn, '--freeze-backbone', action='store_true', jobs=DYNN,
             help='keep the backbone frozen in joint training')

    evaluation = parser.add_argument_group('evaluation and export')
    add_flag(evaluation, '--eval', action='store_true', jobs=EVAL,
             help='evaluate --checkpoint-path: sweep, table, plots')
    add_flag(evaluation, '--thresholds', type=float, nargs='+', default=None, jobs=EVAL, check=probability,
             help='gate thresholds of the printed sweep table (results.json always holds the whole '
                  'front); default: about 12 points of the front')
    add_flag(evaluation, '--budget', type=budget_arg, default=DEFAULT_BUDGET, jobs=EVAL,
             help='how --eval picks its threshold: acc-drop=P (cheapest point within P points of the '
                  'full network), gflops=X (most accurate point with expected GFLOPs <= X) or '
                  'latency-ms=X (most accurate point with expected batch-1 latency <= X ms here)')
    add_flag(evaluation, '--risk-control', type=str, default='none', choices=RISK_RULES, jobs=EVAL,
             help='with --budget acc-drop=P, how the threshold is chosen on the calibration images: none (cheapest '
                  'point within P points: no guarantee), crc (conformal risk control: expected loss <= P/100 on '
                  'new images) or ltt (learn-then-test: P(loss <= P/100) >= 1 - --delta)')
    add_flag(evaluation, '--delta', type=float, default=DEFAULT_DELTA, jobs=EVAL,
             check=bounded(0, 1, low_open=True, high_open=True, text='must lie in (0, 1), e.g. 0.1'),
             help='--risk-control ltt: the allowed probability that the loss exceeds P/100')
    add_flag(evaluation, '--risk-loss', type=str, default='error', choices=RISK_LOSSES, jobs=EVAL,
             help="per-image loss the rule controls: error (the exit wrong where the full network is right) or "
                  "consistency (the exit's prediction differs from the full network's; reads no labels)")
    add_flag(evaluation, '--exit-threshold', type=float, default=None, jobs=EVAL | EXPORT, check=probability,
             help='threshold of real early exit (--eval) and of the export, instead of --budget\'s; '
                  "--export's default: the one --eval chose, else 0.5")
    add_flag(evaluation, '--results-json', type=str, default=None, jobs=EVAL,
             help='default: results.json in --output-dir if given, else beside the checkpoint')
    add_flag(evaluation, '--export', type=str, default=None, choices=sorted(EXPORTERS), jobs=EXPORT,
             help='export --checkpoint-path for edge runtimes')
    add_flag(evaluation, '--out', type=str, default=None, jobs=EXPORT, help='folder for --export')
    add_flag(evaluation, '--quantize', type=str, default=None, choices=['int8'], jobs=EXPORT,
             help='--export onnx: also write statically quantised int8 segments (QDQ), calibrated on '
                  'training images of --data-set')
    add_flag(evaluation, '--calib-images', type=int, default=256, jobs=EXPORT, check=positive,
             help='--quantize: training images the int8 calibration reads')

    runtime = parser.add_argument_group('runtime')
    add_flag(runtime, '--output-dir', type=str, default='.', jobs=READS_DATA,
             help='where checkpoint*/ and runs/ go; with --eval, the folder of results.json (default '
                  'there: beside the checkpoint)')
    add_flag(runtime, '--overwrite', action='store_true', jobs=TRAINING,
             help="replace an earlier run's checkpoints in the run folder instead of stopping")
    add_flag(runtime, '--device', type=str, default='auto', jobs=READS_DATA,
             help='auto (cuda if available), cpu, cuda, cuda:N')
    add_flag(runtime, '--seed', type=int, default=42, jobs=READS_DATA, check=non_negative,
             help='seed of the shuffles and of initialisation (--split-seed seeds the split)')
    return parser


# The data flags --export reads with --quantize (calibration images), and only then.
CALIBRATION_FLAGS = ('data_path', 'train_ratio', 'split_seed', 'split_file', 'skip_bad_images', 'check_images',
                     'num_workers')
# how a run runs, not what it is
RESUME_MAY_CHANGE = frozenset({'resume', 'device', 'num_workers', 'data_path', 'check_images'})
# what a resumed run whose checkpoint predates a flag trained with (not the flag's default of today)
BEHAVIOUR_BEFORE_FLAG = {'final_exit_loss': 'off', 'exit_costs': 'flops'}


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
    """Every flag on the command line acts in this job: none is silently ignored. All the flags that do not are
    named in one line; one given at its default value changes nothing, so a script may keep it."""
    parser = get_args_parser()
    names, acts_in = option_names(), flag_jobs(parser)
    idle = [dest for dest in sorted(given) if acts_in[dest] is not None and job not in acts_in[dest]
            and getattr(args, dest) != parser.get_default(dest)]
    if len(idle) == 1:
        raise GFNetDynnError(f'{names[idle[0]]} has no effect with {_describe_jobs({job})}: it applies to '
                             f'{_describe_jobs(acts_in[idle[0]])}; drop it')
    if idle:
        described = '; '.join(f'{names[dest]} to {_describe_jobs(acts_in[dest])}' for dest in idle)
        raise GFNetDynnError(f"{', '.join(names[dest] for dest in idle)} have no effect with "
                             f'{_describe_jobs({job})} (they apply: {described}); drop them')
    if job == 'backbone' and args.distillation_type == 'none':
        extra = sorted(names[d] for d in given & {'teacher_model', 'teacher_path', 'distillation_alpha',
                                                  'distillation_tau', 'distillation_freq_weight'})
        if extra:
            raise GFNetDynnError(f"{', '.join(extra)} given without distillation (--distillation-type none): pass "
                                 f'--distillation-type soft, hard or freq, or drop them')
    if (job == 'dynn' and 'exit_costs' in given and args.exit_costs == 'reference' and args.arch
            and not model_factory.is_gfnet(args.arch)):
        raise GFNetDynnError(f"--exit-costs reference is the reference's GFNet op counter; --arch {args.arch} trains "
                             f'with its true FLOPs: drop --exit-costs or pass flops')
    if job in TRAINING and 'min_lr' in given and args.min_lr > args.lr:
        raise GFNetDynnError(f'--min-lr {args.min_lr:g} exceeds --lr {args.lr:g}: the cosine schedule would rise '
                             f'instead of decay; pass a --min-lr below --lr')
    if job == 'eval' and {'budget', 'exit_threshold'} <= given:
        raise GFNetDynnError('--exit-threshold fixes the threshold, so --budget has no effect; drop one of them')
    risk_flags = sorted(names[d] for d in given & {'risk_control', 'delta', 'risk_loss'})
    if job == 'eval' and risk_flags and 'exit_threshold' in given:
        raise GFNetDynnError(f"--exit-threshold fixes the threshold, so {', '.join(risk_flags)} has no effect; drop "
                             f'one of them')
    if job == 'eval' and risk_flags and parse_budget(args.budget).kind != 'acc-drop':
        raise GFNetDynnError(f"{', '.join(risk_flags)} act with --budget acc-drop=P only (the loss they control is "
                             f'an accuracy drop), not --budget {args.budget}; drop them or use acc-drop')
    if job == 'eval' and 'delta' in given and args.risk_control != 'ltt':
        raise GFNetDynnError(f'--delta is the failure probability of --risk-control ltt; with --risk-control '
                             f'{args.risk_control} it has no effect: drop it or use --risk-control ltt')
    if job == 'export' and not args.quantize:
        extra = sorted(names[d] for d in given & {*CALIBRATION_FLAGS, 'calib_images'}
                       if getattr(args, d) != parser.get_default(d))
        if extra:
            raise GFNetDynnError(f"{', '.join(extra)} given with --export but without --quantize int8, the only export "
                                 f'that reads images (for calibration): add --quantize int8, or drop them')
    if job == 'eval' and {'output_dir', 'results_json'} <= given:
        raise GFNetDynnError('--output-dir has no effect when --results-json names the file; drop one of them')


def validate_args(args: argparse.Namespace) -> None:
    """Reject impossible values (each flag's declared range, then combinations) with a message naming the flag."""
    check_ranges(get_args_parser(), args)
    checks = [
        (args.risk_control == 'none' or (parse_budget(args.budget).kind == 'acc-drop'
                                         and 0 < parse_budget(args.budget).value < 100),
         f'--risk-control {args.risk_control} needs --budget acc-drop=P with 0 < P < 100 (the loss level P/100), '
         f'got {args.budget}'),
        (not args.eval or args.checkpoint_path, '--eval needs --checkpoint-path (a best.pth of the dynn stage)'),
        (not args.export or args.checkpoint_path, '--export needs --checkpoint-path'),
        (not args.export or args.out, '--export needs --out DIR, the folder for the ONNX files'),
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
    checkpoint = load_resume_checkpoint(args.resume, args.output_dir)
    stored = checkpoint['args']
    stage = 'backbone' if checkpoint['stage'] == 'backbone' else 'dynn'
    folder = Path(args.resume).resolve().parent
    if finished(checkpoint):
        raise GFNetDynnError(f"nothing to resume: {args.resume} finished its last epoch ({checkpoint['epoch']}, "
                             f"counted from 0, of --num_epoch {stored['num_epoch']}); to train further, start a new "
                             f"run from its best.pth: "
                             f"{extend_hint(stage, stored.get('data_set'), folder / 'best.pth')}")
    recorded = RunArgs.from_dict(stored)
    expected = (backbone_run_folder('.', recorded.data_set, recorded.given('arch')) if stage == 'backbone' else
                dynn_run_folder('.', recorded.data_set, recorded.ce_ic_tradeoff, recorded.arch)).name
    # a timm backbone's dynn run written before the folder name carried the backbone's name
    earlier = dynn_run_folder('.', recorded.data_set, recorded.ce_ic_tradeoff, model_factory.DEFAULT_ARCH).name
    if folder.name not in {expected, earlier if stage == 'dynn' else expected} or folder.parent.name != 'checkpoint':
        raise GFNetDynnError(f'{args.resume} is not in its run folder (OUTPUT/checkpoint/{expected}/); --resume '
                             f'continues a run where it was written: put the file back there')
    names = option_names()
    # flags added since: their default, or the value that reproduces how runs trained before the flag existed
    run_args = {**vars(args), **BEHAVIOUR_BEFORE_FLAG, **{k: v for k, v in stored.items() if hasattr(args, k)}}
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
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is KeyboardInterrupt again
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s', force=True)
    return exit_code(lambda: run(get_args_parser().parse_args(argv), given_flags(argv)))


if __name__ == '__main__':
    sys.exit(main())
