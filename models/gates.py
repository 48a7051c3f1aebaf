"""Exit gates: they read an exit's softmax and say whether the sample may leave there (JEI-DNN).

To add a gate: its module and one `GATES` entry; `--gate`, its help and the FLOP counts read the entry."""
from typing import Callable, NamedTuple

import torch
import torch.nn as nn


def gate_features(logits: torch.Tensor) -> torch.Tensor:
    """(B, C) logits -> (B, 4): max probability, entropy, top-1 minus top-2 margin, entropy of p**2 renormed."""
    probs = logits.float().softmax(dim=-1)
    top2 = probs.topk(2, dim=-1).values
    sharpened = probs.square()
    sharpened = sharpened / sharpened.sum(dim=-1, keepdim=True)
    return torch.stack([
        top2[:, 0],
        torch.special.entr(probs).sum(dim=-1),  # entr(0) = 0, no log(0) NaN
        top2[:, 0] - top2[:, 1],
        torch.special.entr(sharpened).sum(dim=-1),
    ], dim=-1)


class UncertaintyGate(nn.Module):
    """Learnable gate: Linear(4, 1) over the exit's uncertainty features; sigmoid(output) = P(exit)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        # detached: the gate reads the exit's confidence, it must not move the exit head
        features = gate_features(logits.detach()).to(self.linear.weight.dtype)
        return self.linear(features).squeeze(-1)  # (B,)


class IdentityGate(nn.Module):
    """Baseline gate with no parameters: sigmoid(output) is the exit's max softmax probability."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        max_prob = logits.detach().float().softmax(dim=-1).amax(dim=-1)
        return torch.logit(max_prob, eps=1e-6)  # (B,)


class GateEntry(NamedTuple):
    """Every fact about a gate type: its module, what the reference's op counter charges one of its gates for
    (a function of the class count: `--exit-costs reference`), its `--gate` help line, and what the --eval report
    calls the exit rule its gates make."""
    module: Callable[[], nn.Module]
    reference_ops: Callable[[int], float]
    help: str
    rule: str


# reference_ops: the reference's counter charges the uncertainty gate 9 operations per class plus 6, and the
# identity gate nothing
GATES = {
    'unc': GateEntry(UncertaintyGate, lambda num_classes: 9 * num_classes + 6, 'learnable uncertainty gate',
                     'learned gates'),
    'identity': GateEntry(IdentityGate, lambda num_classes: 0, 'max probability, nothing to learn',
                          'max-probability gates'),
}


def gates_help() -> str:
    """`--gate`'s help line, from the entries."""
    return 'exit gate: ' + '; '.join(f'{name}: {entry.help}' for name, entry in GATES.items())
