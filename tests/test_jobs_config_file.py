"""--config FILE: flag values from YAML, read before the command line (which wins), checked like flags, recorded
as resolved values; and the shipped recipes parse."""
from pathlib import Path

import pytest
import torch

from conftest import FAST_FLAGS, one_error
from jobs.config_file import expand_config
from jobs.flag_policy import check_flags_apply
from jobs.flags import FlagFacts
from main_dynn import get_args_parser, given_flags, main

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, text: str) -> str:
    path = tmp_path / 'flags.yaml'
    path.write_text(text)
    return str(path)


def _parsed(argv: list[str]):
    full = expand_config(argv, get_args_parser())
    return get_args_parser().parse_args(full), given_flags(full)


def test_config_values_apply_and_the_command_line_wins(tmp_path):
    config = _config(tmp_path, 'lr: 0.01\nnum_epoch: 16\nexit_positions: [3, 7]\nfreeze-backbone: true\n')
    args, given = _parsed(['--config', config, '--lr', '0.1'])
    assert args.lr == 0.1 and args.num_epoch == 16 and args.exit_positions == [3, 7] and args.freeze_backbone
    assert {'lr', 'num_epoch', 'exit_positions', 'freeze_backbone'} <= given
    args, _ = _parsed(['--lr', '0.1', '--config', config])  # wherever --config stands
    assert args.lr == 0.1


def test_config_keys_may_be_dest_names_or_flag_spellings(tmp_path):
    for key in ('min_lr', 'min-lr', '--min-lr'):
        args, _ = _parsed(['--config', _config(tmp_path, f'{key}: 1.0e-4\n')])
        assert args.min_lr == pytest.approx(1e-4)
    args, _ = _parsed(['--config', _config(tmp_path, 'split_ratio: 0.7\nmin-lr: 1e-4\n')])  # an alias; YAML's 1e-4
    assert args.train_ratio == 0.7 and args.min_lr == pytest.approx(1e-4)


def test_config_false_switch_and_null_leave_the_default(tmp_path):
    args, given = _parsed(['--config', _config(tmp_path, 'freeze_backbone: false\ngate-lr: null\n')])
    assert args.freeze_backbone is False and args.gate_lr is None and not given & {'freeze_backbone', 'gate_lr'}


def test_unknown_config_key_is_the_one_line_error_of_an_unknown_flag(tmp_path, capsys):
    line = one_error(capsys, ['--config', _config(tmp_path, 'lr: 0.01\nlearning_rate: 0.1\n')])
    assert line.startswith('error: unrecognized arguments: learning_rate') and 'flags.yaml' in line
    assert one_error(capsys, ['--learning_rate', '0.1']).startswith('error: unrecognized arguments: --learning_rate')


def test_config_key_of_another_job_is_the_error_of_that_flag(tmp_path, capsys):
    config = _config(tmp_path, 'warmup-epochs: 3\n')
    from_file = one_error(capsys, ['--config', config, '--checkpoint-path', 'x.pth'])
    from_flag = one_error(capsys, ['--warmup-epochs', '3', '--checkpoint-path', 'x.pth'])
    assert from_file == from_flag and '--warmup-epochs has no effect with --stage dynn' in from_file


def test_config_values_are_checked_as_flags(tmp_path, capsys):
    assert 'argument --lr: invalid float value' in one_error(capsys, ['--config', _config(tmp_path, 'lr: fast\n')])
    assert '--lr must lie in (0, 10], got -1.0' in one_error(capsys, ['--config', _config(tmp_path, 'lr: -1\n')])
    assert 'give it true or false' in one_error(capsys, ['--config', _config(tmp_path, 'freeze_backbone: 1\n')])


@pytest.mark.parametrize('text, words', [('[1, 2]\n', 'must hold a mapping'), ('lr: [\n', 'not valid YAML')])
def test_bad_config_files_are_one_line(tmp_path, capsys, text, words):
    assert words in one_error(capsys, ['--config', _config(tmp_path, text)])
    assert 'no such file' in one_error(capsys, ['--config', str(tmp_path / 'missing.yaml')])


def test_the_run_records_resolved_values_not_the_file(small_data, tmp_path):
    config = _config(tmp_path, 'lr: 0.01\nmin-lr: 1.0e-5\nnum_epoch: 5\n')
    assert main(['--stage', 'backbone', *FAST_FLAGS, '--config', config, '--lr', '0.002',
                 '--output-dir', str(tmp_path)]) == 0
    last = tmp_path / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'last.pth'
    recorded = torch.load(last, map_location='cpu', weights_only=True)['args']
    assert (recorded['lr'], recorded['min_lr'], recorded['num_epoch']) == (0.002, 1e-5, 1)  # FAST_FLAGS' 1 epoch


def test_shipped_recipes_are_valid_dynn_flags():
    for recipe in sorted((REPO / 'recipes').glob('*.yaml')):
        args, given = _parsed(['--config', str(recipe)])
        assert given and args.stage == 'dynn', recipe
        check_flags_apply(FlagFacts(get_args_parser()), 'dynn', given, args)  # every key acts in stages 1-2
