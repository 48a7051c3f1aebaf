"""Every benchmark answers as main_dynn.py does: its numeric flags are declared with a range, and a value outside
it (or a missing required flag) is one `error:` line, exit code 2, before anything is read, trained or written."""
import argparse
import importlib
import json
import pkgutil
from pathlib import Path

import pytest

import benchmarks
from conftest import folder_checksums, one_error

MODULES = sorted(info.name for info in pkgutil.iter_modules(benchmarks.__path__)
                 if importlib.import_module(f'benchmarks.{info.name}').__dict__.get('get_args_parser'))
BAD = {int: '-1000000', float: 'nan'}


def required_args(parser: argparse.ArgumentParser) -> list[str]:
    """Placeholder values for the flags and positionals a parser requires, so that only the bad value is wrong."""
    argv = []
    for action in parser._actions:
        if action.required and action.option_strings:
            argv += [action.option_strings[0], 'placeholder']
        elif not action.option_strings and action.dest != 'help':
            argv.append('placeholder')
    return argv


def numeric_flags() -> list[tuple[str, str, type, object]]:
    return [(name, action.option_strings[0], action.type, action.nargs)
            for name in MODULES for action in importlib.import_module(f'benchmarks.{name}').get_args_parser()._actions
            if action.option_strings and action.type in BAD]


def test_every_benchmark_is_walked():
    assert {'throughput', 'lambda_factor', 'protocol', 'risk', 'pareto', 'exit_probe'} <= set(MODULES)
    assert len(numeric_flags()) >= 25


@pytest.mark.parametrize('name, flag, kind, nargs', numeric_flags(), ids=lambda v: str(v))
def test_a_bad_value_of_every_numeric_flag_is_one_error_line(name, flag, kind, nargs, tmp_path, monkeypatch,
                                                             capsys):
    module = importlib.import_module(f'benchmarks.{name}')
    monkeypatch.chdir(tmp_path)
    (tmp_path / 'keep.json').write_text('{"benchmark": "throughput"}')
    before = folder_checksums(tmp_path)
    values = [BAD[kind]] * (nargs if isinstance(nargs, int) else 1)
    line = one_error(capsys, [*required_args(module.get_args_parser()), flag, *values], module.main)
    assert flag in line
    assert folder_checksums(tmp_path) == before


@pytest.mark.parametrize('name', MODULES)
def test_a_missing_required_flag_is_one_error_line(name, tmp_path, monkeypatch, capsys):
    module = importlib.import_module(f'benchmarks.{name}')
    if not required_args(module.get_args_parser()):
        pytest.skip('nothing required')
    monkeypatch.chdir(tmp_path)
    line = one_error(capsys, [], module.main)
    assert 'required' in line
    assert not list(tmp_path.iterdir())


def test_throughput_with_negative_seconds_keeps_an_earlier_json(tmp_path, capsys):
    from benchmarks.throughput import main
    earlier = tmp_path / 'throughput.json'
    earlier.write_text(json.dumps({'benchmark': 'throughput', 'results': [{'train_images_per_s': 12.5}]}))
    before = folder_checksums(tmp_path)
    assert '--seconds must be positive, got -5.0' in one_error(capsys, ['--seconds', '-5', '--json', str(earlier)],
                                                                main)
    assert folder_checksums(tmp_path) == before


def test_a_result_that_measured_nothing_never_replaces_a_json(tmp_path):
    from benchmarks.common import write_json
    from errors import GFNetDynnError
    path = Path(tmp_path / 'early_exit.json')
    write_json({'latency_ms': {'full': 2.0}}, path, 'early_exit')
    before = path.read_bytes()
    with pytest.raises(GFNetDynnError, match=r'measured nothing usable \(latency_ms\.full not finite\)'):
        write_json({'latency_ms': {'full': float('inf')}}, path, 'early_exit')
    assert path.read_bytes() == before


def test_an_unknown_device_is_one_error_line(tmp_path, monkeypatch, capsys):
    from benchmarks.throughput import main
    monkeypatch.chdir(tmp_path)
    assert '--device gpu0 is not a device' in one_error(capsys, ['--device', 'gpu0'], main)
    assert not list(tmp_path.iterdir())


def test_a_patch_larger_than_a_data_set_image_is_one_error_line(tmp_path, monkeypatch, capsys):
    from benchmarks.lambda_factor import main
    monkeypatch.chdir(tmp_path)
    assert 'is larger than the smallest data set input' in one_error(capsys, ['--patch-size', '1000'], main)
    assert not list(tmp_path.iterdir())
