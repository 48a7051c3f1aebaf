"""Exit gates: the four uncertainty features by hand, detachment from the exit head, the identity baseline."""
import math

import pytest
import torch
import torch.nn as nn
from torch.testing import assert_close

from models.gates import GATES, IdentityGate, UncertaintyGate, gate_features

LOGITS = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.2]]


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def _entropy(probs: list[float]) -> float:
    return -sum(p * math.log(p) for p in probs if p > 0)


def _expected_features(row: list[float]) -> list[float]:
    probs = _softmax(row)
    ranked = sorted(probs, reverse=True)
    squared = [p * p for p in probs]
    sharpened = [s / sum(squared) for s in squared]
    return [ranked[0], _entropy(probs), ranked[0] - ranked[1], _entropy(sharpened)]


def test_gate_features_equal_hand_computation():
    expected = torch.tensor([_expected_features(row) for row in LOGITS])
    assert_close(gate_features(torch.tensor(LOGITS)), expected)


def test_gate_features_of_known_values():
    # uniform over 3 classes: max 1/3, entropy ln 3, margin 0, p**2 renormalised is uniform too
    features = gate_features(torch.zeros(1, 3))
    assert_close(features, torch.tensor([[1 / 3, math.log(3), 0.0, math.log(3)]]))


@pytest.mark.parametrize('row', [[100.0, 0.0, 0.0], [1e4, 0.0, -1e4], [0.0, 0.0, 1e30]])
def test_gate_features_have_no_nan_for_one_hot_like_logits(row):
    features = gate_features(torch.tensor([row]))
    assert torch.isfinite(features).all()
    assert_close(features, torch.tensor([[1.0, 0.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def test_gates_output_finite_logits_for_one_hot_like_logits():
    logits = torch.tensor([[100.0, 0.0, 0.0], [0.0, 1e4, 0.0]])
    for gate in (UncertaintyGate(), IdentityGate()):
        assert torch.isfinite(gate(logits)).all()


def test_uncertainty_gate_is_linear_over_the_features():
    gate = UncertaintyGate()
    logits = torch.tensor(LOGITS)
    with torch.no_grad():
        gate.linear.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0]]))
        gate.linear.bias.fill_(0.5)
    expected = torch.tensor([0.5 + sum(w * f for w, f in zip([1.0, -2.0, 3.0, -4.0], _expected_features(row)))
                             for row in LOGITS])
    assert gate(logits).shape == (2,)
    assert_close(gate(logits), expected)


def test_uncertainty_gate_features_are_detached_from_the_exit_head():
    torch.manual_seed(0)
    exit_head = nn.Linear(8, 3)
    gate = UncertaintyGate()
    gate(exit_head(torch.randn(4, 8))).sum().backward()
    assert exit_head.weight.grad is None and exit_head.bias.grad is None
    assert gate.linear.weight.grad is not None and gate.linear.weight.grad.abs().sum() > 0
    assert gate.linear.bias.grad is not None
    assert_close(gate.linear.bias.grad, torch.tensor([4.0]))  # d(sum of 4 outputs)/d(bias)


def test_identity_gate_sigmoid_equals_max_softmax_probability():
    logits = torch.tensor(LOGITS)
    expected = torch.tensor([max(_softmax(row)) for row in LOGITS])
    assert_close(torch.sigmoid(IdentityGate()(logits)), expected)


def test_identity_gate_has_no_parameters():
    assert list(IdentityGate().parameters()) == []


def test_each_registered_gate_computes_its_rule_from_the_exit_logits():
    logits = torch.tensor(LOGITS)
    unc = GATES['unc'].module()
    with torch.no_grad():  # a linear map over the four uncertainty features
        unc.linear.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        unc.linear.bias.zero_()
    assert_close(unc(logits), torch.tensor([max(_softmax(row)) for row in LOGITS]))  # weight on max-prob only
    assert_close(torch.sigmoid(GATES['identity'].module()(logits)), torch.tensor([max(_softmax(row)) for row in LOGITS]))
