"""The oracle exit rule (each image at its earliest right exit) and the table lines that judge the chosen point:
the oracle's saving it captures, and whether its budget held on the validation images."""
import pytest
import torch
from torch.testing import assert_close

from evaluation.eval_report import budget_line, oracle_line, oracle_report
from evaluation.exit_cache import ExitCache, oracle_exit_choice

GFLOPS = [1.0, 2.0, 4.0]
LATENCY_MS = [1.0, 3.0, 5.0]


def _logits_for(predictions: list[list[int]], num_classes: int = 2) -> torch.Tensor:
    """(E, N) predicted classes -> (E, N, C) logits whose argmax they are."""
    return torch.nn.functional.one_hot(torch.tensor(predictions), num_classes).float()


def _hand_made_cache() -> ExitCache:
    """Five images, three exits, all of class 1. Right at: image 0 exit 0; image 1 exit 1; image 2 nowhere;
    image 3 the final exit only; image 4 exit 0 only."""
    predictions = [[1, 0, 0, 0, 1],   # exit 0
                   [0, 1, 0, 0, 0],   # exit 1
                   [1, 1, 0, 1, 0]]   # final exit
    return ExitCache(_logits_for(predictions), torch.zeros(2, 5), torch.ones(5, dtype=torch.long))


def test_oracle_takes_the_earliest_right_exit_else_the_final_one():
    assert oracle_exit_choice(_hand_made_cache()).tolist() == [0, 1, 2, 2, 0]


def test_oracle_report_on_a_hand_made_cache():
    # exits 0, 1, 2, 2, 0: shares 2/5, 1/5, 2/5; right 4 of 5; (2*1 + 2 + 2*4) / 5 = 2.4 GFLOPs, saving 0.4;
    # a chosen point at 3.2 GFLOPs saves 0.8 of the oracle's 1.6: half; latency (2*1 + 3 + 2*5) / 5 = 3 ms
    oracle = oracle_report(_hand_made_cache(), GFLOPS, LATENCY_MS, {'expected_gflops': 3.2})
    assert_close(oracle['exit_share'], [0.4, 0.2, 0.4])
    assert oracle['accuracy'] == pytest.approx(80.0)
    assert oracle['expected_gflops'] == pytest.approx(2.4)
    assert oracle['expected_latency_ms'] == pytest.approx(3.0)
    assert oracle['flops_saving'] == pytest.approx(0.4)
    assert oracle['captured_share'] == pytest.approx(0.5)


def test_oracle_with_nothing_to_save_captures_no_share():
    only_final_right = ExitCache(_logits_for([[0, 0], [0, 0], [1, 1]]), torch.zeros(2, 2),
                                 torch.ones(2, dtype=torch.long))
    oracle = oracle_report(only_final_right, GFLOPS, LATENCY_MS, {'expected_gflops': 4.0})
    assert oracle['flops_saving'] == 0 and oracle['captured_share'] is None
    assert 'nothing to capture' in oracle_line({'oracle': oracle, 'chosen': {'flops_saving': 0.0}})


def _results(budget: str, accuracy: float, **chosen) -> dict:
    return {'num_val': 320, 'full_accuracy': 90.0, 'selection': {'budget': budget},
            'chosen': {'accuracy': accuracy, 'expected_gflops': 0.3, 'expected_latency_ms': 7.0, **chosen}}


def test_budget_line_says_whether_the_accuracy_drop_held_on_the_validation_images():
    assert budget_line(_results('acc-drop=1', 89.0625)) == (
        'budget acc-drop=1 on the 320 validation images: held, the chosen point loses 0.94 points '
        '(89.06% vs 90.00% for the full network)')
    assert 'BROKEN, the chosen point loses 3.69 points' in budget_line(_results('acc-drop=1', 86.3125))


def test_budget_line_for_cost_budgets_and_none_for_a_fixed_threshold():
    assert budget_line(_results('gflops=0.25', 80.0)).endswith('BROKEN, the chosen point costs 0.3 GFLOPs per image')
    assert 'held' in budget_line(_results('latency-ms=8', 80.0))
    assert budget_line(_results('--exit-threshold 0.5', 80.0)) is None


def test_oracle_line_names_the_captured_share():
    line = oracle_line({'oracle': {'accuracy': 96.25, 'flops_saving': 0.6, 'captured_share': 0.775},
                        'chosen': {'flops_saving': 0.465}})
    assert line == ('oracle (each image at its earliest right exit): 96.25% with 60.0% fewer FLOPs; the chosen '
                    'point captures 77.5% of it (46.5% fewer)')


@pytest.mark.parametrize('gate, rule', [('identity', 'max-probability gates'), ('unc', 'learned gates')])
def test_the_table_names_the_rule_the_checkpoints_gate_makes(gate, rule):
    import timm
    from evaluation.eval_report import evaluate_early_exit, format_results_table
    torch.manual_seed(0)
    model = timm.create_model('gfnet_ti_dynn', num_classes=3, img_size=16, patch_size=8, depth=4, embed_dim=32,
                              exit_positions=(1, 2), gate=gate).eval()
    images = torch.utils.data.TensorDataset(torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2]))
    report, _ = evaluate_early_exit(model, torch.utils.data.DataLoader(images, batch_size=3), torch.device('cpu'),
                                    gflops_per_exit=GFLOPS, class_names=['a', 'b', 'c'])
    results = report.to_json()
    assert results['gate'] == gate
    verdict = next(line for line in format_results_table(results).splitlines() if ' at the same budget: ' in line)
    assert verdict.startswith(f'{rule} vs ')
    assert rule == 'learned gates' or 'learned gates' not in format_results_table(results)
