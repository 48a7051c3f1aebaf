"""--resume policy: the run's own arguments come back from its last.pth, in its own folder; a flag that would
change the run is a one-line error, and only how it runs may change."""
import argparse
from pathlib import Path

from errors import GFNetDynnError
from jobs.flags import MAY_CHANGE, FlagFacts
from jobs.run_setup import backbone_run_folder, dynn_run_folder
from jobs.trained_run import RunArgs
from learning_helpers.stage_common import extend_hint, finished, load_resume_checkpoint
from models import model_factory


def _same(path: bool, value, stored) -> bool:
    """A value given again is the stored one; a path (stored absolute) when both resolve to the same place."""
    if path and value is not None and stored is not None:
        return Path(value).resolve() == Path(stored).resolve()
    return value == stored


def resumed_args(args: argparse.Namespace, given: set[str], flags: FlagFacts) -> tuple[argparse.Namespace, dict]:
    """--resume: the run's own arguments back, in the run's own folder. A flag that would change the run is a
    one-line error; only the flags declared on_resume=MAY_CHANGE (how it runs: device, workers, data location)
    take a new value."""
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
    # flags added since: their default, or the value that reproduces how runs trained before the flag existed
    run_args = {**vars(args), **flags.before_flags(), **{k: v for k, v in stored.items() if hasattr(args, k)}}
    run_args.update(stage=stage, output_dir=str(folder.parent.parent))
    may_change, names = flags.where(on_resume=MAY_CHANGE), flags.names
    for dest in sorted(given - set(may_change)):
        if not _same(flags[dest].path, getattr(args, dest), run_args.get(dest)):
            raise GFNetDynnError(f'{names[dest]} {getattr(args, dest)} would change the run {args.resume} continues '
                                 f'(it has {run_args.get(dest)}); --resume continues a run as it was started: drop '
                                 f'{names[dest]}, or start a new run from its best.pth with --checkpoint-path')
    run_args.update({dest: getattr(args, dest) for dest in may_change if dest in given or dest == 'resume'})
    return argparse.Namespace(**run_args), checkpoint
