"""The one exit rule (models.exit_rule) and the ONNX runner's numpy twin decide alike, float32 edges included."""
import numpy as np
import pytest
import torch

from deployment.onnx_runner import fires as runner_fires
from models.exit_rule import fires, first_exit

THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 0.9, 1.0]
EDGES = [np.nextafter(np.float32(t), np.float32(d)) for t in THRESHOLDS for d in (0, 1)]
PROBS = np.array([*map(np.float32, THRESHOLDS), *EDGES, 0.7], dtype=np.float32)  # 0.7 rounds down in float32


@pytest.mark.parametrize('threshold', THRESHOLDS)
def test_torch_rule_and_numpy_twin_agree_on_the_same_float32_probabilities(threshold):
    assert fires(torch.from_numpy(PROBS), threshold).tolist() == runner_fires(PROBS, threshold).tolist()


def test_a_probability_equal_to_a_rounded_threshold_fires():
    prob = torch.tensor([0.7], dtype=torch.float32)  # 0.699999988..., below the float64 0.7
    assert fires(prob, 0.7).item() and runner_fires(prob.numpy(), 0.7).item()


def test_first_exit_is_the_first_gate_that_fires_else_the_final_head():
    probs = torch.tensor([[0.2, 0.9, 0.5, 0.1],
                          [0.8, 0.1, 0.7, 0.3],
                          [0.9, 0.0, 0.1, 0.4]])  # (G=3, N=4)
    assert first_exit(probs, 0.5).tolist() == [1, 0, 0, 3]
    assert first_exit(probs, torch.tensor([0.5, 0.95]).view(-1, 1, 1)).tolist() == [[1, 0, 0, 3], [3, 3, 3, 3]]
