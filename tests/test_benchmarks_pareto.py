"""benchmarks.pareto: the front rule and reading the --eval results (front first, else the sweep)."""
import json

import pytest

from benchmarks.pareto import main, pareto_front, read_dynn_points
from conftest import one_error


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [{'accuracy': 90, 'gflops': 1.0}, {'accuracy': 80, 'gflops': 0.5}, {'accuracy': 85, 'gflops': 1.2},
              {'accuracy': 90, 'gflops': 1.5}, {'accuracy': 70, 'gflops': 0.5}]
    assert pareto_front(points, 'gflops') == {0, 1}


@pytest.mark.parametrize('key', ['front', 'sweep'])
def test_dynn_points_come_from_the_front_else_the_sweep(key, tmp_path):
    point = {'threshold': 0.5, 'accuracy': 91.0, 'expected_gflops': 0.1}
    path = tmp_path / 'results.json'
    path.write_text(json.dumps({key: [point], **({'sweep': [{**point, 'threshold': 0.9}]} if key == 'front' else {})}))
    assert read_dynn_points(path)[1] == [point]


def test_results_without_thresholds_are_one_line(tmp_path, capsys):
    path = tmp_path / 'results.json'
    path.write_text(json.dumps({'sweep': []}))
    line = one_error(capsys, ['--dynn-results', str(path), '--json', str(tmp_path / 'p.json')], main)
    assert 'has no front or sweep' in line
