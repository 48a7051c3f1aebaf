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
from deployment.exporters import EXPORTERS, exporters_help
from errors import OneLineParser, exit_code
from evaluation.operating_points import DEFAULT_BUDGET, parse_budget
from evaluation.risk_control import DEFAULT_DELTA, RISK_LOSSES, RISK_RULES
from jobs.config_file import CONFIG_FLAG, expand_config
from jobs.flag_docs import PrintFlagsDoc
from jobs.flag_policy import check_flags_apply, job_of, validate_args
from jobs.flags import (BACKBONE, DYNN, DYNN_WEIGHT_DECAY, EVAL, EXPORT, MAY_CHANGE, READS_DATA, STAGE_DEFAULTS,
                        TRAINING, FlagFacts, add_flag, below_one, bounded, non_negative, positive, probability,
                        split_ratio, stage_default_help)
from jobs.inference_jobs import run_eval, run_export
from jobs.resume import resumed_args
from jobs.run_setup import resolve_device
from jobs.train_jobs import run_backbone, run_dynn
from learning_helpers.joint_stage import PHASE_COUNTERS
from learning_helpers.losses import CLASSIFIER_LOSSES, FINAL_EXIT_LOSS
from models import model_factory
from models.exit_costs import EXIT_COSTS, exit_costs_help
from models.exit_heads import EXIT_HEADS, EXIT_NORMS
from models.gates import GATES, gates_help
from models.gfnet_dynn import DEFAULT_EXIT_POSITIONS
from runtime.distributed import barrier, init_distributed


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
    add_flag(data, '--data-path', type=str, default=None, jobs=READS_DATA | EXPORT, path=True, on_resume=MAY_CHANGE,
             calibration=True,
             help="dataset root; default: the entry's default_data_path (DEMO is generated there)")
    add_flag(data, '--input-size', type=int, default=None, check=positive,
             help="image side in pixels; default: the checkpoint's, else the dataset's default")
    add_flag(data, '--train-ratio', '--split-ratio', '--split_ratio', dest='train_ratio', type=float, default=None,
             jobs=READS_DATA | EXPORT, calibration=True, check=split_ratio,
             help="training share when one folder of class folders is split; default: the checkpoint's "
                  "split, else the entry's first protocol ratio, else 0.8")
    add_flag(data, '--split-seed', type=int, default=None, jobs=READS_DATA | EXPORT, calibration=True,
             check=non_negative,
             help="seed of that split; default: the checkpoint's, else 42 (the reference's)")
    add_flag(data, '--calib-ratio', type=float, default=None, jobs=READS_DATA,
             check=bounded(0, 1, high_open=True, text='must lie in [0, 1), e.g. 0.1'),
             help="share of the training images held out of every stage for --eval to choose its threshold "
                  "on (stratified, e.g. 0.1); default: the checkpoint's, else 0 (none: --eval chooses on the "
                  "validation images it reports)")
    add_flag(data, '--split-file', type=str, default=None, jobs=READS_DATA | EXPORT, path=True, calibration=True,
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
    add_flag(data, '--skip-bad-images', action='store_true', jobs=READS_DATA | EXPORT, calibration=True,
             help='drop unreadable images with a warning instead of stopping')
    add_flag(data, '--check-images', action='store_true', jobs=READS_DATA | EXPORT, on_resume=MAY_CHANGE,
             calibration=True,
             help='fully decode every image before training (slower); without it, headers and file structure are '
                  'checked')
    add_flag(data, '--num_workers', type=int, default=2, jobs=READS_DATA | EXPORT, on_resume=MAY_CHANGE,
             calibration=True, check=non_negative,
             help='data-loading worker processes')

    model = parser.add_argument_group('model')
    add_flag(model, '--arch', type=str, default=None, from_checkpoint=True,
             help=f"architecture, one of {', '.join(model_factory.arch_choices())}, a timm ResNet, EfficientNet, "
                  f"MobileNetV3, ConvNeXt or ViT (resnet18), or with --stage backbone any timm model name; "
                  f"default: the checkpoint's, else {model_factory.DEFAULT_ARCH}")
    add_flag(model, '--patch-size', type=int, default=None, from_checkpoint=True, check=positive,
             help=f"patch side; default: the checkpoint's, else {model_factory.DEFAULT_PATCH_SIZE}")
    add_flag(model, '--drop-path', type=float, default=0.0, jobs=TRAINING, check=below_one,
             help="stochastic depth rate of the last block; 0 is GFNet's for XS and Ti (its scripts parse "
                  "--drop-path 0.1 but fix the rate per model: S 0.15, B 0.25 from scratch, none when fine-tuning) "
                  "and the reference's model's")
    add_flag(model, '--exit-positions', type=int, nargs='+', default=None, jobs=DYNN | EVAL | EXPORT,
             from_checkpoint=True, check=non_negative,
             help="0-based blocks (GFNet, ViT) or stages (CNNs) followed by an early exit; default: the "
                  f"architecture's ({' '.join(map(str, DEFAULT_EXIT_POSITIONS))} for GFNet; README lists the "
                  "others), with --eval and --export the checkpoint's")
    add_flag(model, '--gate', type=str, default='unc', choices=sorted(GATES), jobs=DYNN | EVAL | EXPORT,
             from_checkpoint=True,
             help=gates_help())
    add_flag(model, '--checkpoint-path', type=str, default=None, path=True,
             help='weights to start from (training) or to evaluate/export (--eval, --export)')
    add_flag(model, '--pretrained', type=str, default=None, jobs=BACKBONE, path=True,
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
             help='optimizer; default: adamw for the backbone stage (built by timm\'s create_optimizer_v2), sgd '
                  'for dynn')
    add_flag(train, '--lr', type=float, default=None, jobs=TRAINING, check=LR_RANGE,
             help=f"learning rate; {stage_default_help('lr')}; the backbone stage trains at --lr x total batch "
                  f"(--batch x processes) / --lr-base-batch, GFNet's linear scaling rule (1e-4 is its transfer "
                  f"command's, at 8 x 64 images; its script's default is 5e-4)")
    add_flag(train, '--min-lr', type=float, default=None, jobs=TRAINING, check=bounded(0, MAX_LR),
             help=f"cosine schedule floor (never scaled); {stage_default_help('min_lr')}")
    add_flag(train, '--wd', type=float, default=None, jobs=TRAINING, check=non_negative,
             help=f"weight decay; default: {STAGE_DEFAULTS['backbone']['wd']:g} with --stage backbone (GFNet's "
                  f"transfer command; timm's factory exempts norms, biases and other 1-d parameters), with --stage "
                  f"dynn {DYNN_WEIGHT_DECAY['sgd']:g} with sgd, {DYNN_WEIGHT_DECAY['adamw']:g} with adamw")
    add_flag(train, '--warmup-epochs', type=int, default=5, jobs=BACKBONE, check=non_negative,
             help="backbone stage: epochs of linear learning-rate warm-up from --warmup-lr (GFNet's; not the exit "
                  "warm-up, see --max_warmup_epoch)")
    add_flag(train, '--smoothing', type=float, default=0.1, jobs=BACKBONE, check=below_one,
             help='label smoothing (backbone stage)')
    add_flag(train, '--amp', action='store_true', jobs=READS_DATA,
             help='bf16 mixed precision on CUDA (Ampere or newer; ignored on CPU)')
    add_flag(train, '--max-nan-skips', type=int, default=5, jobs=TRAINING, check=non_negative,
             help='non-finite losses in a row tolerated (step skipped) before stopping')
    add_flag(train, '--resume', type=str, default=None, jobs=TRAINING, on_resume=MAY_CHANGE,
             help="a run's last.pth: continue where it stopped")
    add_flag(train, '--barely_train', action='store_true', jobs=READS_DATA,
             help='a few batches per epoch (smoke tests)')

    distill = parser.add_argument_group('distillation (backbone stage)')
    add_flag(distill, '--teacher-model', type=str, default=None, jobs=BACKBONE,
             help='teacher: a GFNet variant (GFNet-b-dynn) or any timm model name')
    add_flag(distill, '--teacher-path', type=str, default=None, jobs=BACKBONE, path=True,
             help="teacher's weights on this dataset")
    add_flag(distill, '--distillation-type', type=str, default='none', choices=['none', 'soft', 'hard', 'freq'],
             jobs=BACKBONE, help='soft: KL on logits; hard: CE on teacher argmax; freq: soft + frequency maps')
    add_flag(distill, '--distillation-alpha', type=float, default=0.5, jobs=BACKBONE, check=probability,
             help='weight of the distillation term')
    add_flag(distill, '--distillation-tau', type=float, default=1.0, jobs=BACKBONE, check=positive,
             help='softmax temperature')
    add_flag(distill, '--distillation-freq-weight', type=float, default=1.0, jobs=BACKBONE, check=non_negative,
             help='weight of the frequency term inside the freq distillation loss')

    recipe = parser.add_argument_group("backbone recipe (stage 0; defaults: GFNet's transfer recipe through timm's "
                                       "Mixup and scheduler factories)")
    add_flag(recipe, '--lr-base-batch', type=int, default=512, jobs=BACKBONE, check=non_negative,
             help='the total batch --lr is given for: stage 0 trains at --lr x --batch x processes / this '
                  "(GFNet's 512); 0: --lr as given, unscaled")
    add_flag(recipe, '--warmup-lr', type=float, default=1e-6, jobs=BACKBONE, check=non_negative,
             help='lr of the first warm-up epoch (never scaled)')
    add_flag(recipe, '--cooldown-epochs', type=int, default=0, jobs=BACKBONE, check=non_negative,
             help="the last N of --num_epoch run at --min-lr after the cosine; GFNet's script declares 10 but "
                  'its loop stops at --epochs, where its cosine ends, so they never run: 0')
    add_flag(recipe, '--clip-grad', type=float, default=1.0, jobs=BACKBONE, check=non_negative,
             help='clip the gradient norm at this value (0: no clipping)')
    add_flag(recipe, '--mixup', type=float, default=0.8, jobs=BACKBONE, check=non_negative,
             help='Mixup alpha (0: off); with Mixup or CutMix on, --smoothing goes into the mixed targets and the '
                  'loss is a soft-target cross-entropy')
    add_flag(recipe, '--cutmix', type=float, default=1.0, jobs=BACKBONE, check=non_negative,
             help='CutMix alpha (0: off); Mixup or CutMix needs an even --batch')
    add_flag(recipe, '--mixup-prob', type=float, default=1.0, jobs=BACKBONE, check=probability,
             help='probability that a batch is mixed')
    add_flag(recipe, '--mixup-switch-prob', type=float, default=0.5, jobs=BACKBONE, check=probability,
             help='probability of CutMix rather than Mixup when both are on')
    add_flag(recipe, '--mixup-mode', type=str, default='batch', choices=['batch', 'pair', 'elem'], jobs=BACKBONE,
             help='one mixing draw per batch, per pair of images or per image')

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
    add_flag(dynn, '--final-exit-loss', type=str, default='off', choices=FINAL_EXIT_LOSS, jobs=DYNN, before_flag='off',
             help="off: the reference's classifier-phase loss alone; auto (ours): while the backbone trains in "
                  "joint training, the final exit's CE joins it, a guard against the full network drifting in "
                  'long runs (--freeze-backbone is always the reference)')
    add_flag(dynn, '--exit-costs', type=str, default='reference', choices=sorted(EXIT_COSTS), jobs=DYNN,
             before_flag='flops',
             help=exit_costs_help())
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
    add_flag(dynn, '--joint-momentum', default='keep', choices=['keep', 'reset'], jobs=DYNN,
             help="keep: joint training goes on with the warm-up's optimizer state (the reference); reset: it "
                  "starts without the warm-up's momentum, which at a high lr throws the first exits off")
    add_flag(dynn, '--exit-head', type=str, default='linear', choices=sorted(EXIT_HEADS), jobs=DYNN,
             help='each intermediate exit\'s head: ' + '; '.join(f'{name}: {kind.help}'
                                                                for name, kind in EXIT_HEADS.items()))
    add_flag(dynn, '--exit-grid', type=int, default=2, jobs=DYNN, check=positive,
             help='--exit-head pool: cells per side of the pooled grid (2: 2 x 2)')
    add_flag(dynn, '--exit-norm', type=str, default='none', choices=EXIT_NORMS, jobs=DYNN,
             help="none: the reference (GFNet's and ViT's exits share the final norm, a CNN's have none); "
                  "layernorm (ours): a LayerNorm before each exit head's Linear layer, so the heads learn at the lr "
                  "whatever the scale of the backbone's features")
    add_flag(dynn, '--exit-distill', type=float, default=0.0, jobs=DYNN, check=non_negative,
             help='weight w of self-distillation (ours; 0: off, the reference): each intermediate exit also learns '
                  "the final exit's softened predictions, w * T^2 * KL, in warm-up and in the classifier phase")
    add_flag(dynn, '--exit-distill-tau', type=float, default=1.0, jobs=DYNN, check=positive,
             help='--exit-distill: softmax temperature T')

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
             help=exporters_help())
    add_flag(evaluation, '--out', type=str, default=None, jobs=EXPORT, help='folder for --export')
    add_flag(evaluation, '--quantize', type=str, default=None, choices=['int8'], jobs=EXPORT,
             help='--export onnx: also write statically quantised int8 segments (QDQ), calibrated on '
                  'training images of --data-set')
    add_flag(evaluation, '--calib-images', type=int, default=256, jobs=EXPORT, calibration=True, check=positive,
             help='--quantize: training images the int8 calibration reads')

    runtime = parser.add_argument_group('runtime')
    add_flag(runtime, CONFIG_FLAG, type=str, default=None, on_resume=MAY_CHANGE,
             help='a YAML file of flag values (num_epoch: 16, or the spelling min-lr: 1e-4), read before the command '
                  'line, which wins; recipes/ holds some. Runs record the resolved values')
    add_flag(runtime, '--output-dir', type=str, default='.', jobs=READS_DATA, path=True,
             help='where checkpoint*/ and runs/ go; with --eval, the folder of results.json (default '
                  'there: beside the checkpoint)')
    add_flag(runtime, '--overwrite', action='store_true', jobs=TRAINING,
             help="replace an earlier run's checkpoints in the run folder instead of stopping")
    add_flag(runtime, '--device', type=str, default='auto', jobs=READS_DATA, on_resume=MAY_CHANGE,
             help='auto (cuda if available), cpu, cuda, cuda:N')
    add_flag(runtime, '--seed', type=int, default=42, jobs=READS_DATA, check=non_negative,
             help='seed of the shuffles and of initialisation (--split-seed seeds the split)')
    add_flag(runtime, '--flags-doc', action=PrintFlagsDoc, on_resume=MAY_CHANGE,
             help="print every flag's declaration (type, default, range, jobs, --resume policy) as markdown, the "
                  'page docs/FLAGS.md, and exit')
    return parser


def given_flags(argv: list[str] | None) -> set[str]:
    """The dests of the flags written on the command line; argparse fills in the others with defaults."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def run(args: argparse.Namespace, given: set[str]) -> Path:
    """Check every flag, set up the process, dispatch to the requested job."""
    flags = FlagFacts(get_args_parser())
    validate_args(flags, args)
    resume = {}
    if args.resume:
        args, resume = resumed_args(args, given, flags)
    job = job_of(args)
    check_flags_apply(flags, job, given, args)
    model_factory.check_arch(args.arch, job)
    distributed, distributed_device = init_distributed(args.device)
    device = resolve_device(args.device, distributed_device)
    if args.amp and device.type != 'cuda':
        logging.warning('--amp has no effect on %s: mixed precision runs on CUDA only; running in float32',
                        device.type)
    torch.manual_seed(args.seed)
    if job == 'export':
        return run_export(args, given, flags)
    if job == 'eval':
        return run_eval(args, given, flags, device)
    path = (run_backbone if job == 'backbone' else run_dynn)(args, flags, device, distributed, resume)
    barrier()
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one line on stderr and exit 2, Ctrl-C one line and 130; bugs keep
    their traceback."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # loaded: Ctrl-C is KeyboardInterrupt again
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s', force=True)
    def parse_and_run() -> Path:
        full_argv = expand_config(sys.argv[1:] if argv is None else argv, get_args_parser())
        return run(get_args_parser().parse_args(full_argv), given_flags(full_argv))
    return exit_code(parse_and_run)


if __name__ == '__main__':
    sys.exit(main())
