"""--resume policy: the run's own arguments come back from its last.pth, in its own folder; a flag that would
change the run is a one-line error, and only how it runs may change."""
import argparse
from pathlib import Path

from errors import GFNetDynnError
from jobs.run_setup import PATH_FLAGS, backbone_run_folder, dynn_run_folder
from jobs.trained_run import RunArgs
from learning_helpers.stage_common import extend_hint, finished, load_resume_checkpoint
from models import model_factory

# how a run runs, not what it is
RESUME_MAY_CHANGE = frozenset({'config', 'resume', 'device', 'num_workers', 'data_path', 'check_images'})
# what a resumed run whose checkpoint predates a flag trained with (not the flag's default of today)
BEHAVIOUR_BEFORE_FLAG = {'final_exit_loss': 'off', 'exit_costs': 'flops'}


def _same(dest: str, value, stored) -> bool:
    if dest in PATH_FLAGS and value is not None and stored is not None:
        return Path(value).resolve() == Path(stored).resolve()
    return value == stored


def resumed_args(args: argparse.Namespace, given: set[str],
                 names: dict[str, str]) -> tuple[argparse.Namespace, dict]:
    """--resume: the run's own arguments back, in the run's own folder. A flag that would change the run is a
    one-line error; only how it runs (device, workers, data location) may change. names: dest -> the flag."""
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
    run_args = {**vars(args), **BEHAVIOUR_BEFORE_FLAG, **{k: v for k, v in stored.items() if hasattr(args, k)}}
    run_args.update(stage=stage, output_dir=str(folder.parent.parent))
    for dest in sorted(given - RESUME_MAY_CHANGE):
        if not _same(dest, getattr(args, dest), run_args.get(dest)):
            raise GFNetDynnError(f'{names[dest]} {getattr(args, dest)} would change the run {args.resume} continues '
                                 f'(it has {run_args.get(dest)}); --resume continues a run as it was started: drop '
                                 f'{names[dest]}, or start a new run from its best.pth with --checkpoint-path')
    run_args.update({dest: getattr(args, dest) for dest in RESUME_MAY_CHANGE if dest in given or dest == 'resume'})
    return argparse.Namespace(**run_args), checkpoint
