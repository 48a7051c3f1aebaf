"""--resume: a run interrupted after epoch E and resumed ends exactly where an uninterrupted run with the same
seed ends (same metrics, same weights); a checkpoint with nothing to resume is a one-line user error."""
import contextlib
import io
from pathlib import Path

import pytest
import torch

from torch.utils.data import Dataset

import dataset_config
import main_dynn
from conftest import TINY_FLAGS, tiny_entry, write_learnable_folder
from data_loader_help import build_loaders
from jobs.flags import FlagFacts
from jobs import resume
from learning_helpers import backbone_stage, joint_stage, warmup_stage
from learning_helpers.checkpoint import save_checkpoint
from learning_helpers.optim import seed_epoch
from main_dynn import main

# patch 16: a 2x2 token grid keeps these runs cheap; the resume logic does not depend on the model's size
FLAGS = [*TINY_FLAGS, '--patch-size', '16']
BACKBONE_FLAGS = ['--stage', 'backbone', *FLAGS, '--num_epoch', '3', '--lr', '2e-3']
# 3 warm-up epochs (0-2) then 3 joint epochs (3-5), on a random backbone; each interruption leaves two epochs
# of its stage to run, so the lr schedule must resume too. Phases of 3 batches straddle the 2-batch epochs,
# so the resumed run must also restore the phase counter.
DYNN_FLAGS = ['--stage', 'dynn', *FLAGS, '--num_epoch', '6', '--max_warmup_epoch', '3', '--patience', '2',
              '--bilevel_batch_count', '1', '--lr', '5e-3']


class Interrupted(Exception):
    """Stands for a kill: raised where the next epoch would start, after the previous one was saved."""


@pytest.fixture(scope='module')
def resume_data(tmp_path_factory) -> Path:
    """3 classes, 6 training images each (2 batches of 8 per epoch) and 2 validation images each."""
    return write_learnable_folder(tmp_path_factory.mktemp('resume') / 'tiny', train_per_class=6, val_per_class=2)


@pytest.fixture
def tiny(resume_data, monkeypatch) -> Path:
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(resume_data))
    return resume_data


def quiet_main(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def run_interrupted(argv: list[str], stage_module, epoch: int) -> None:
    """Run main(argv) and stop it as epoch `epoch` of the stage in `stage_module` begins."""
    real = stage_module.seed_epoch

    def seed_or_stop(seed, current, loader):
        if current == epoch:
            raise Interrupted
        real(seed, current, loader)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stage_module, 'seed_epoch', seed_or_stop)
        with pytest.raises(Interrupted):
            quiet_main(argv)


def load(path: Path) -> dict:
    return torch.load(path, map_location='cpu', weights_only=True)


def assert_same(actual, expected, where: str = 'checkpoint') -> None:
    """Nested checkpoint data equal: tensors to 1e-6, numbers and the rest exactly."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), where
        for key in expected:
            assert_same(actual[key], expected[key], f'{where}[{key!r}]')
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f'{where}[{i}]')
    elif isinstance(expected, torch.Tensor):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6, msg=f'{where} differs')
    else:
        assert actual == expected, where


def assert_same_files(resumed: Path, uninterrupted: Path, names: list[str]) -> None:
    """Same metrics, weights and training state (optimizer, schedule, warm-up, gates' pos_weight...); the
    stored args differ only in paths."""
    for name in names:
        got, want = load(resumed / name), load(uninterrupted / name)
        got.pop('args', None), want.pop('args', None)
        assert_same(got, want, name)


@pytest.mark.slow
def test_backbone_resume_matches_uninterrupted_run(tiny, tmp_path):
    full, cut = tmp_path / 'full', tmp_path / 'cut'
    assert quiet_main([*BACKBONE_FLAGS, '--output-dir', str(full)]) == 0
    run_interrupted([*BACKBONE_FLAGS, '--output-dir', str(cut)], backbone_stage, epoch=1)
    folder = Path('checkpoint') / 'backbone_TINY_GFNet-ti-dynn'
    assert load(cut / folder / 'last.pth')['epoch'] == 0

    assert quiet_main(['--resume', str(cut / folder / 'last.pth'), '--num_workers', '0']) == 0

    assert load(full / folder / 'last.pth')['epoch'] == 2
    assert_same_files(cut / folder, full / folder, ['last.pth', 'best.pth'])


@pytest.fixture(scope='module')
def dynn_uninterrupted(resume_data, tmp_path_factory) -> Path:
    """The output folder of one uninterrupted dynn run, shared by the two resume tests."""
    out = tmp_path_factory.mktemp('dynn_full')
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(resume_data))
        assert quiet_main([*DYNN_FLAGS, '--output-dir', str(out)]) == 0
    return out


DYNN_CHECKPOINTS = Path('checkpoint') / 'checkpoint_TINY_0.75_confEE'
WARMUP_HEADS = Path('checkpoint_warmup') / 'TINY_GFNet-ti-dynn_32_3_0.75'
FIRST_JOINT_EPOCH = 3


def assert_same_dynn_run(resumed: Path, uninterrupted: Path) -> None:
    assert load(uninterrupted / DYNN_CHECKPOINTS / 'last.pth')['epoch'] == 5
    assert_same_files(resumed / DYNN_CHECKPOINTS, uninterrupted / DYNN_CHECKPOINTS, ['last.pth', 'best.pth'])
    snapshots = sorted(p.name for p in (uninterrupted / DYNN_CHECKPOINTS).glob('ckpt_epoch*.pth'))  # names hold acc
    assert len(snapshots) == 3
    assert snapshots == sorted(p.name for p in (resumed / DYNN_CHECKPOINTS).glob('ckpt_epoch*.pth'))
    assert_same_files(resumed / DYNN_CHECKPOINTS, uninterrupted / DYNN_CHECKPOINTS, snapshots)
    heads = sorted(p.name for p in (uninterrupted / WARMUP_HEADS).glob('*.pth'))
    assert heads and heads == sorted(p.name for p in (resumed / WARMUP_HEADS).glob('*.pth'))
    assert_same_files(resumed / WARMUP_HEADS, uninterrupted / WARMUP_HEADS, heads)


@pytest.mark.slow
def test_dynn_resume_during_warmup_matches_uninterrupted_run(tiny, tmp_path, dynn_uninterrupted):
    cut, ref = tmp_path / 'cut', tmp_path / 'ref'
    last = cut / DYNN_CHECKPOINTS / 'last.pth'
    run_interrupted([*DYNN_FLAGS, '--output-dir', str(cut)], warmup_stage, 1)
    assert (load(last)['stage'], load(last)['epoch']) == ('warmup', 0)
    # the warm-up ends with each head at its best weights, which can hide a difference in later epochs: compare
    # the end of the warm-up itself (current weights, momentum, schedule, patience) with an uninterrupted one
    run_interrupted(['--resume', str(last), '--num_workers', '0'], joint_stage, FIRST_JOINT_EPOCH)
    run_interrupted([*DYNN_FLAGS, '--output-dir', str(ref)], joint_stage, FIRST_JOINT_EPOCH)
    assert (load(last)['stage'], load(last)['epoch']) == ('warmup', FIRST_JOINT_EPOCH - 1)
    assert_same_files(cut / DYNN_CHECKPOINTS, ref / DYNN_CHECKPOINTS, ['last.pth'])

    assert quiet_main(['--resume', str(last), '--num_workers', '0']) == 0
    assert_same_dynn_run(cut, dynn_uninterrupted)


@pytest.mark.slow
def test_dynn_resume_during_joint_stage_matches_uninterrupted_run(tiny, tmp_path, dynn_uninterrupted):
    cut = tmp_path / 'cut'
    last = cut / DYNN_CHECKPOINTS / 'last.pth'
    run_interrupted([*DYNN_FLAGS, '--output-dir', str(cut)], joint_stage, FIRST_JOINT_EPOCH + 1)
    assert (load(last)['stage'], load(last)['epoch']) == ('joint', FIRST_JOINT_EPOCH)

    assert quiet_main(['--resume', str(last), '--num_workers', '0']) == 0
    assert_same_dynn_run(cut, dynn_uninterrupted)


class RandomItems(Dataset):
    """Each item draws from the RNG of the process that loads it, as a random augmentation does."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int):
        return torch.rand(()), index


def epoch_batches(loader, epoch: int) -> list:
    seed_epoch(0, epoch, loader)
    return list(loader)


@pytest.mark.parametrize('num_workers', [0, 2])
def test_an_epochs_shuffle_and_augmentation_do_not_depend_on_earlier_epochs(num_workers):
    """What lets --resume repeat a run: epoch 1 of a fresh training loader (a resumed run) sees the same order
    and the same random draws as epoch 1 after epoch 0 (the uninterrupted run), with loader workers too."""
    loader, _ = build_loaders(RandomItems(), RandomItems(), 4, num_workers, seed=0)
    epoch_batches(loader, 0)
    uninterrupted = epoch_batches(loader, 1)
    resumed = epoch_batches(build_loaders(RandomItems(), RandomItems(), 4, num_workers, seed=0)[0], 1)
    for (noise, index), (noise_again, index_again) in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(index, index_again) and torch.equal(noise, noise_again)
    assert not torch.equal(epoch_batches(loader, 0)[0][1], uninterrupted[0][1])  # epochs do differ


def assert_one_line_error(capsys, argv: list[str], *fragments: str) -> None:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith('error: '), err
    assert 'Traceback' not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_resume_missing_file_is_a_user_error(tmp_path, capsys):
    assert_one_line_error(capsys, ['--resume', str(tmp_path / 'nope' / 'last.pth')], 'does not exist')


def test_resume_bare_state_dict_is_a_user_error(tmp_path, capsys):
    path = save_checkpoint(tmp_path / 'weights.pth', {'head.weight': torch.zeros(3, 4)})
    assert_one_line_error(capsys, ['--resume', str(path)], 'lacks model, stage, args', '--checkpoint-path')


def test_resume_finished_run_is_a_user_error(tmp_path, capsys):
    path = save_checkpoint(tmp_path / 'last.pth', {
        'model': {}, 'stage': 'backbone', 'epoch': 2, 'acc': 50.0, 'best_acc': 50.0, 'args': {'num_epoch': 3},
        'optimizer': {}, 'scheduler': {}, 'criterion': {}})
    assert_one_line_error(capsys, ['--resume', str(path)], 'nothing to resume', '--num_epoch')


def test_resume_of_a_per_epoch_snapshot_is_a_user_error(tmp_path, capsys):
    """ckpt_epoch*.pth files keep only the weights: resuming one must say so instead of failing on a key."""
    path = save_checkpoint(tmp_path / 'ckpt_epoch2_0.75_50.00.pth', {
        'model': {}, 'stage': 'joint', 'epoch': 2, 'acc': 50.0, 'args': {'num_epoch': 6}})
    assert_one_line_error(capsys, ['--resume', str(path)], 'is a per-epoch snapshot', str(tmp_path / 'last.pth'))


def test_augmentation_does_not_depend_on_the_number_of_loader_workers():
    """Each sample's random draws come from (seed, epoch, index): 0 or 2 workers load the same epoch."""
    draws = {}
    for num_workers in (0, 2):
        loader, _ = build_loaders(RandomItems(), RandomItems(), 4, num_workers, seed=0)
        draws[num_workers] = epoch_batches(loader, 3)
    for (noise, index), (noise_again, index_again) in zip(draws[0], draws[2], strict=True):
        assert torch.equal(index, index_again) and torch.equal(noise, noise_again)


def test_loading_a_training_sample_leaves_the_callers_random_state_alone():
    loader, _ = build_loaders(RandomItems(), RandomItems(), 4, 0, seed=0)
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    loader.dataset[5]
    assert torch.equal(torch.rand(3), expected)  # dropout in the main process draws as if nothing was loaded


def test_a_resumed_run_from_before_a_flag_keeps_what_it_trained_with(tmp_path, monkeypatch):
    """A checkpoint whose args lack --exit-costs trained against true FLOPs (and one that lacks --final-exit-loss
    with the reference's loss): it resumes so, whatever today's defaults are."""
    stored = {'data_set': 'DEMO', 'ce_ic_tradeoff': 0.75, 'num_epoch': 5}
    monkeypatch.setattr(resume, 'load_resume_checkpoint',
                        lambda path, output_dir: {'args': dict(stored), 'stage': 'joint', 'epoch': 1})
    last = tmp_path / 'checkpoint' / 'checkpoint_DEMO_0.75_confEE' / 'last.pth'
    args = main_dynn.get_args_parser().parse_args(['--resume', str(last)])
    assert (args.final_exit_loss, args.exit_costs) == ('off', 'reference')  # a new run's defaults
    resumed = resume.resumed_args(args, {'resume'}, FlagFacts(main_dynn.get_args_parser()))[0]
    assert (resumed.final_exit_loss, resumed.exit_costs) == ('off', 'flops')
    stored.update(final_exit_loss='auto', exit_costs='reference')
    resumed = resume.resumed_args(args, {'resume'}, FlagFacts(main_dynn.get_args_parser()))[0]
    assert (resumed.final_exit_loss, resumed.exit_costs) == ('auto', 'reference')
