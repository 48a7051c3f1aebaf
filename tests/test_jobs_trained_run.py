"""The trained-run record: a checkpoint's stored args read once, with defaults in one place; the split it reuses."""
from data_loader_help import SplitRequest
from jobs.trained_run import RunArgs
from models.gfnet_dynn import DEFAULT_EXIT_POSITIONS
from models.model_factory import DEFAULT_ARCH, DEFAULT_PATCH_SIZE


def test_missing_and_null_keys_take_the_defaults_and_unknown_keys_are_kept_aside():
    args = RunArgs.from_dict({'arch': None, 'input_size': 64, 'some_later_flag': 3})
    assert (args.arch, args.patch_size, args.input_size) == (DEFAULT_ARCH, DEFAULT_PATCH_SIZE, 64)
    assert tuple(args.exit_positions) == tuple(DEFAULT_EXIT_POSITIONS) and args.gate == 'unc'
    assert args.given('some_later_flag') == 3 and args.given('arch') is None


def test_a_checkpoint_without_args_reads_as_the_defaults():
    assert RunArgs.of({'model': {}}) == RunArgs()


def test_the_recorded_split_is_reused_only_for_its_own_data_set():
    args = RunArgs.from_dict({'split': {'dataset': 'UCM', 'seed': 3}})
    assert args.recorded_split('UCM') == {'dataset': 'UCM', 'seed': 3} and args.recorded_split('AID') is None


def test_reusing_a_split_keeps_a_recorded_seed_of_zero():
    request = SplitRequest.reusing({'dataset': 'UCM', 'train_ratio': 0.5, 'seed': 0, 'calib_ratio': None})
    assert (request.seed, request.train_ratio, request.calib_ratio) == (0, 0.5, 0.0)
    assert SplitRequest.reusing(None).seed == SplitRequest().seed  # nothing recorded: the default
