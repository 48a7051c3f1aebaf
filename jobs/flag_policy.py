"""Cross-flag policy: which job a command line asks for, that every flag given acts in it, and the combinations
no job can run. Each check reads the flags' own declarations (jobs/flags.py) from the FlagFacts it is handed."""
import argparse

from errors import GFNetDynnError
from evaluation.operating_points import parse_budget
from jobs.flags import TRAINING, FlagFacts, check_ranges, with_stage_defaults
from models import model_factory
from models.exit_costs import EXIT_COSTS
from models.exit_heads import EXIT_HEADS


def job_of(args: argparse.Namespace) -> str:
    """The one job the command line asks for: export, eval, or the training stage."""
    if args.eval and args.export:
        raise GFNetDynnError('--eval and --export are separate jobs; run one, then the other')
    return 'export' if args.export else 'eval' if args.eval else args.stage


def _describe_jobs(jobs) -> str:
    words = {'backbone': '--stage backbone', 'dynn': '--stage dynn', 'eval': '--eval', 'export': '--export'}
    named = [words[job] for job in ('backbone', 'dynn', 'eval', 'export') if job in jobs]
    return ' and '.join(named) if len(named) < 3 else f"{', '.join(named[:-1])} and {named[-1]}"


def check_flags_apply(flags: FlagFacts, job: str, given: set[str], args: argparse.Namespace) -> None:
    """Every flag on the command line acts in this job: none is silently ignored. All the flags that do not are
    named in one line; one given at its default value changes nothing, so a script may keep it."""
    names = flags.names
    idle = [dest for dest in sorted(given) if flags[dest].jobs is not None and job not in flags[dest].jobs
            and getattr(args, dest) != flags.default(dest)]
    if len(idle) == 1:
        raise GFNetDynnError(f'{names[idle[0]]} has no effect with {_describe_jobs({job})}: it applies to '
                             f'{_describe_jobs(flags[idle[0]].jobs)}; drop it')
    if idle:
        described = '; '.join(f'{names[dest]} to {_describe_jobs(flags[dest].jobs)}' for dest in idle)
        raise GFNetDynnError(f"{', '.join(names[dest] for dest in idle)} have no effect with "
                             f'{_describe_jobs({job})} (they apply: {described}); drop them')
    if job == 'backbone' and args.distillation_type == 'none':
        extra = sorted(names[d] for d in given & {'teacher_model', 'teacher_path', 'distillation_alpha',
                                                  'distillation_tau', 'distillation_freq_weight'})
        if extra:
            raise GFNetDynnError(f"{', '.join(extra)} given without distillation (--distillation-type none): pass "
                                 f'--distillation-type soft, hard or freq, or drop them')
    _check_exit_head_flags(job, given, args)
    if (job == 'dynn' and 'exit_costs' in given and EXIT_COSTS[args.exit_costs].gfnet_only and args.arch
            and not model_factory.is_gfnet(args.arch)):
        raise GFNetDynnError(f"--exit-costs {args.exit_costs} is the reference's GFNet op counter; --arch {args.arch} "
                             f'trains with its true FLOPs: drop --exit-costs or pass flops')
    if job in TRAINING and 'min_lr' in given and args.min_lr > (lr := with_stage_defaults(args, job).lr):
        raise GFNetDynnError(f'--min-lr {args.min_lr:g} exceeds --lr {lr:g}: the cosine schedule would '
                             f'rise instead of decay; pass a --min-lr below --lr')
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
        extra = sorted(names[d] for d in given & set(flags.where(calibration=True))
                       if getattr(args, d) != flags.default(d))
        if extra:
            raise GFNetDynnError(f"{', '.join(extra)} given with --export but without --quantize int8, the only export "
                                 f'that reads images (for calibration): add --quantize int8, or drop them')
    if job == 'eval' and {'output_dir', 'results_json'} <= given:
        raise GFNetDynnError('--output-dir has no effect when --results-json names the file; drop one of them')


def _check_exit_head_flags(job: str, given: set[str], args: argparse.Namespace) -> None:
    """The exit-head flags that refine another: a grid needs a head that pools to one, a temperature a weight."""
    if job == 'dynn' and 'exit_grid' in given and not EXIT_HEADS[args.exit_head].pools_grid:
        raise GFNetDynnError(f'--exit-grid sizes the grid of --exit-head pool; --exit-head {args.exit_head} pools '
                             f'over all positions: drop --exit-grid or pass --exit-head pool')
    if job == 'dynn' and 'exit_distill_tau' in given and args.exit_distill == 0:
        raise GFNetDynnError('--exit-distill-tau given without --exit-distill: pass a weight, e.g. --exit-distill '
                             '0.5, or drop it')


def validate_args(flags: FlagFacts, args: argparse.Namespace) -> None:
    """Reject impossible values (each flag's declared range, then combinations) with a message naming the flag."""
    check_ranges(flags.parser, args)
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
