"""Each registry holds every fact about its kind: a toy gate registered by one GATES entry trains, evaluates and
exports through the command line; a toy format registered by one EXPORTERS entry exports, and output safety
knows its files."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

import dataset_config
from conftest import FAST_FLAGS, TINY_FLAGS, folder_checksums, one_error, tiny_entry, write_learnable_folder
from deployment.exporters import EXPORTERS, Exporter
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


TOY_GATE = GateEntry(MarginGate, lambda num_classes: 3 * num_classes, 'margin of the top two probabilities',
                     'learned margin gates')


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


@pytest.fixture(scope='module')
def toy_gate_run(tmp_path_factory):
    """A tiny stage 0 and a dynn run with the toy gate (exits after blocks 3 and 7) on fresh TINY data."""
    out = tmp_path_factory.mktemp('toy_gate')
    data = write_learnable_folder(out / 'data', train_per_class=4, val_per_class=2, size=16)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(data))
        patch.setitem(GATES, 'margin', TOY_GATE)
        common = [*FAST_FLAGS, '--output-dir', str(out)]
        assert main(['--stage', 'backbone', *common]) == 0
        backbone = out / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'best.pth'
        assert main([*common, '--checkpoint-path', str(backbone), '--num_epoch', '2', '--max_warmup_epoch', '1',
                     '--exit-positions', '3', '7', '--gate', 'margin']) == 0
    return data, out / 'checkpoint' / 'checkpoint_TINY_0.75_confEE' / 'best.pth'


@pytest.fixture
def toy_registered(toy_gate_run, monkeypatch):
    """The toy gate and the toy format registered, and the run's data set, for one test; the run's best.pth."""
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(toy_gate_run[0]))
    monkeypatch.setitem(GATES, 'margin', TOY_GATE)
    monkeypatch.setitem(EXPORTERS, 'npz', TOY_EXPORTER)
    return toy_gate_run[1]


@pytest.mark.slow
def test_a_toy_gate_trains_evaluates_and_exports(toy_registered, tmp_path):
    pytest.importorskip('onnxscript')
    state = torch.load(toy_registered, map_location='cpu', weights_only=True)['model']
    assert state['gates.0.linear.weight'].shape == (1, 1)
    results = tmp_path / 'results.json'
    assert main([*TINY_FLAGS, '--barely_train', '--eval', '--checkpoint-path', str(toy_registered),
                 '--results-json', str(results)]) == 0
    assert len(json.loads(results.read_text())['per_exit_accuracy']) == 3
    assert main(['--data-set', 'TINY', '--export', 'onnx', '--checkpoint-path', str(toy_registered),
                 '--out', str(tmp_path / 'onnx')]) == 0
    assert sorted(p.name for p in (tmp_path / 'onnx').glob('*.onnx')) == [f'segment_{k}.onnx' for k in range(3)]


def write_npz(model, out, *, threshold, class_names, input_size, checkpoint, threshold_source=None,
              calibration=None) -> None:
    """Toy format: the state dict as one .npz, and a manifest naming it."""
    out.mkdir(parents=True)
    np.savez(out / 'weights.npz', **{k: v.cpu().numpy() for k, v in model.state_dict().items()})
    (out / 'toy.json').write_text(json.dumps({'weights': 'weights.npz', 'threshold': threshold,
                                              'class_names': class_names}))


TOY_EXPORTER = Exporter(write_npz, 'toy.json', ('weights',), ('.npz',), 'toy_runner', ' --int8', 'weight files',
                        'the state dict as numpy arrays')


@pytest.mark.slow
def test_a_toy_format_exports_and_replaces_only_its_own_folder(toy_registered, tmp_path, capsys):
    out = tmp_path / 'npz'
    argv = ['--data-set', 'TINY', '--export', 'npz', '--checkpoint-path', str(toy_registered), '--out', str(out),
            '--exit-threshold', '0.25']
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ['toy.json', 'weights.npz']
    assert json.loads((out / 'toy.json').read_text())['threshold'] == 0.25
    assert f'python -m toy_runner {out.resolve()} IMAGE_OR_FOLDER' in capsys.readouterr().out
    assert main([*argv[:-1], '0.5']) == 0  # an earlier export of its own kind is replaced whole
    assert json.loads((out / 'toy.json').read_text())['threshold'] == 0.5
    (out / 'notes.txt').write_text('mine')  # a file no exporter leaves: the folder is no longer only an export
    before = folder_checksums(out)
    assert 'not an earlier export' in one_error(capsys, argv)
    assert folder_checksums(out) == before


def test_an_exit_cost_entry_gives_the_flag_its_choice_and_the_training_its_vector(monkeypatch):
    from learning_helpers import dynn_training
    from models.exit_costs import EXIT_COSTS, CostInputs, ExitCosts
    from models.gfnet_dynn import GFNetDynn
    ramp = ExitCosts(lambda inputs: [(k + 1) / inputs.model.num_exits for k in range(inputs.model.num_exits)],
                     'cost k+1 of E')
    monkeypatch.setitem(EXIT_COSTS, 'ramp', ramp)
    flag = next(a for a in get_args_parser()._actions if a.dest == 'exit_costs')
    assert 'ramp' in flag.choices and 'ramp: cost k+1 of E' in flag.help
    model = GFNetDynn(img_size=16, patch_size=8, embed_dim=16, depth=4, num_classes=3, exit_positions=[1, 2])
    assert EXIT_COSTS['ramp'].build(CostInputs(model, torch.device('cpu'))) == [1 / 3, 2 / 3, 1.0]
    seen = {}
    monkeypatch.setattr(dynn_training, 'run_joint_stage', lambda model, tl, vl, opt, sch, device, costs, *rest:
                        seen.setdefault('costs', costs.tolist()))
    from learning_helpers.stage_common import StartPoint
    dynn_training.train_dynn(model, None, None, None, None, torch.device('cpu'), None, None, None,
                             dynn_training.exit_cost_vector(model, 'ramp'), None, StartPoint('joint', 0, 0.0, {}))
    assert seen['costs'] == pytest.approx([1 / 3, 2 / 3, 1.0])
