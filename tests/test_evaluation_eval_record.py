"""The typed --eval record: it writes the same results.json as before it was typed, and docs/RESULTS_JSON.md is
what its field metadata generate."""
import json
from pathlib import Path

import pytest

from conftest import TINY_FLAGS
from evaluation.eval_record import DOC_PATH, results_json_doc
from main_dynn import main

GOLDEN = Path(__file__).parent / 'eval_results_golden.json'
# measured on the machine (wall clock) or naming this run's files: they differ run to run
VOLATILE = {'timing', 'checkpoint', 'segment', 'cumulative', 'mean_ms', 'median_ms', 'predicted_mean_ms', 'images',
            'expected_latency_ms', 'measured_latency_ms', 'file'}
# the --eval runs whose results.json the golden file recorded before it was typed: the selection rule's branches
CASES = {'default budget': [], 'crc at acc-drop=20': ['--risk-control', 'crc', '--budget', 'acc-drop=20'],
         'given thresholds': ['--exit-threshold', '0.4', '--thresholds', '0.2', '0.6']}


def stable(value):
    """`value` without the keys that are timings or paths, at any depth."""
    if isinstance(value, dict):
        return {k: stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [stable(v) for v in value]
    return value


def eval_results(checkpoint: Path, out: Path, flags: list[str]) -> dict:
    """results.json of a short --eval of `checkpoint` with `flags`."""
    assert main([*TINY_FLAGS, '--input-size', '16', '--eval', '--checkpoint-path', str(checkpoint),
                 '--results-json', str(out), *flags]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_eval_writes_the_results_json_it_wrote_before_it_was_typed(dynn_best, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    for name, flags in CASES.items():
        assert stable(eval_results(dynn_best, tmp_path / 'results.json', flags)) == golden[name], name


def test_docs_page_is_what_the_record_generates():
    assert DOC_PATH.read_text() == results_json_doc(), 'run: python -m evaluation.eval_record'


def test_docs_page_names_every_key_of_the_recorded_results_json():
    golden = json.loads(GOLDEN.read_text())['crc at acc-drop=20']
    names = [*golden, *(f'{k}.{sub}' for k, v in golden.items() if isinstance(v, dict) and k != 'split' for sub in v)]
    page = DOC_PATH.read_text()
    assert [name for name in names if f'| `{name}` |' not in page] == []
