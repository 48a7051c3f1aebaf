"""Each flag declares its jobs and range where it is defined; a value out of range is one error line, exit 2,
before any file is written."""
import pytest

from deployment.exporters import EXPORTERS
from jobs.flags import FlagFacts
from main_dynn import get_args_parser, main


@pytest.mark.parametrize('flags, message', [
    (['--ce_ic_tradeoff', 'nan'], '--ce_ic_tradeoff must be >= 0, got nan'),
    (['--ce_ic_tradeoff', 'inf'], '--ce_ic_tradeoff must be finite, got inf'),
    (['--ce_ic_tradeoff', '-1'], '--ce_ic_tradeoff must be >= 0, got -1.0'),
    (['--transfer-ratio', 'inf'], '--transfer-ratio must lie in [0, 1], got inf'),
    (['--transfer-ratio', '-0.1'], '--transfer-ratio must lie in [0, 1], got -0.1'),
    (['--max-nan-skips', '-1'], '--max-nan-skips must be >= 0, got -1'),
    (['--max_warmup_epoch', '-1'], '--max_warmup_epoch must be >= 0, got -1'),
    (['--drop-path', '1'], '--drop-path must lie in [0, 1), got 1.0'),
    (['--lr', 'inf'], '--lr must lie in (0, 10], got inf'),
    (['--min-lr', 'nan'], '--min-lr must lie in [0, 10], got nan'),
    (['--eval', '--thresholds', '0.5', '1.2'], '--thresholds must lie in [0, 1], got 1.2'),
    (['--exit-threshold', '-0.1'], '--exit-threshold must lie in [0, 1], got -0.1'),
])
def test_a_value_out_of_its_flags_range_is_one_error_line_before_any_file(flags, message, tmp_path, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*flags, '--output-dir', str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f'error: {message}'
    assert list(tmp_path.iterdir()) == []


def test_every_numeric_flag_declares_a_range():
    numeric = [a.option_strings[0] for a in get_args_parser()._actions if a.type in (int, float)]
    assert numeric and all(a.flag.check for a in get_args_parser()._actions if a.type in (int, float))


def test_a_flag_knows_its_jobs_where_it_is_defined():
    flags = FlagFacts(get_args_parser())
    assert flags['lr'].jobs == {'backbone', 'dynn'} and flags['ce_ic_tradeoff'].jobs == {'dynn'}
    assert flags['quantize'].jobs == {'export'} and flags['data_set'].jobs is None  # None: every job


def test_export_choices_come_from_the_exporter_registry():
    export = next(a for a in get_args_parser()._actions if a.dest == 'export')
    assert export.choices == sorted(EXPORTERS)


def test_every_flag_that_does_not_apply_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    """A script reusing its training flags for --eval learns every flag to drop at once, not one per run."""
    monkeypatch.chdir(tmp_path)
    assert main(['--eval', '--checkpoint-path', 'c.pth', '--num_epoch', '8', '--lr', '0.01',
                 '--max_warmup_epoch', '4']) == 2
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith('error: --lr, --max_warmup_epoch, --num_epoch have no effect '
                                                   'with --eval')
    assert '--max_warmup_epoch to --stage dynn' in err and err.endswith('drop them')
    assert list(tmp_path.iterdir()) == []


def test_a_flag_given_at_its_default_value_is_accepted(tmp_path, monkeypatch, capsys):
    """--eval with the training run's own --ce_ic_tradeoff 0.75 (the default) changes nothing, so it is not an
    error: the job goes on to its next check (here, the missing checkpoint)."""
    monkeypatch.chdir(tmp_path)
    assert main(['--eval', '--checkpoint-path', 'missing.pth', '--ce_ic_tradeoff', '0.75', '--num_epoch', '100']) == 2
    err = capsys.readouterr().err
    assert 'no effect' not in err and 'missing.pth' in err
