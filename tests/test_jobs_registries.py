"""Each registry holds every fact about its kind: a toy gate registered by one GATES entry trains, evaluates and
exports through the command line."""
import json

import pytest
import torch
import torch.nn as nn

from conftest import FAST_FLAGS, TINY_FLAGS
from main_dynn import get_args_parser, main
from models.gates import GATES, GateEntry


class MarginGate(nn.Module):
    """Toy gate: a learnable scale and shift of the exit's top-1 minus top-2 probability margin."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        top2 = logits.detach().float().softmax(dim=-1).topk(2, dim=-1).values
        return self.linear((top2[:, :1] - top2[:, 1:]).to(self.linear.weight.dtype)).squeeze(-1)  # (B,)


TOY_GATE = GateEntry(MarginGate, lambda num_classes: 3 * num_classes, 'margin of the top two probabilities')


def test_a_gate_entry_gives_the_flag_its_choice_and_help(monkeypatch):
    monkeypatch.setitem(GATES, 'margin', TOY_GATE)
    gate = next(a for a in get_args_parser()._actions if a.dest == 'gate')
    assert 'margin' in gate.choices and 'margin: margin of the top two probabilities' in gate.help


def test_the_reference_counter_charges_a_gate_its_entry_ops(monkeypatch):
    from models.flops import reference_exit_op_counts
    from models.gfnet_dynn import GFNetDynn
    monkeypatch.setitem(GATES, 'margin', TOY_GATE)
    kwargs = dict(img_size=16, patch_size=8, embed_dim=16, depth=4, num_classes=5, exit_positions=[1, 2])
    counts = {gate: reference_exit_op_counts(GFNetDynn(gate=gate, **kwargs)) for gate in ('identity', 'margin')}
    # each exit adds 3 * 5 operations for its gate, summed over the exits passed
    assert counts['margin'][0] - counts['identity'][0] == 15
    assert counts['margin'][-1] - counts['identity'][-1] == 30


@pytest.mark.slow
def test_a_toy_gate_trains_evaluates_and_exports(small_data, tmp_path, monkeypatch):
    pytest.importorskip('onnxscript')
    monkeypatch.setitem(GATES, 'margin', TOY_GATE)
    common = [*FAST_FLAGS, '--output-dir', str(tmp_path)]
    assert main(['--stage', 'backbone', *common]) == 0
    backbone = tmp_path / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'best.pth'
    assert main([*common, '--checkpoint-path', str(backbone), '--num_epoch', '2', '--max_warmup_epoch', '1',
                 '--exit-positions', '3', '7', '--gate', 'margin']) == 0
    best = tmp_path / 'checkpoint' / 'checkpoint_TINY_0.75_confEE' / 'best.pth'
    state = torch.load(best, map_location='cpu', weights_only=True)['model']
    assert state['gates.0.linear.weight'].shape == (1, 1)
    results = tmp_path / 'results.json'
    assert main([*TINY_FLAGS, '--barely_train', '--eval', '--checkpoint-path', str(best),
                 '--results-json', str(results)]) == 0
    assert len(json.loads(results.read_text())['per_exit_accuracy']) == 3
    assert main(['--data-set', 'TINY', '--export', 'onnx', '--checkpoint-path', str(best),
                 '--out', str(tmp_path / 'onnx')]) == 0
    assert sorted(p.name for p in (tmp_path / 'onnx').glob('*.onnx')) == [f'segment_{k}.onnx' for k in range(3)]
