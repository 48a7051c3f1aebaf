"""--exit-costs latency: exit costs from the measured batch-1 latency table, normalised to the final exit, measured
once per run and recorded so that a resumed run trains against the same vector."""
import contextlib
import io

import pytest
import timm
import torch

from conftest import FAST_FLAGS
from evaluation import latency
from evaluation.latency import cumulative_ms, latency_exit_costs
from learning_helpers import dynn_training, joint_stage
from learning_helpers.dynn_training import exit_cost_vector
from main_dynn import main
from models.flops import normalized_exit_costs


def _tiny_dynn() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('gfnet_ti_dynn', num_classes=5, img_size=32, patch_size=8, depth=4, embed_dim=32,
                             exit_positions=(0, 1, 2))


def test_latency_costs_are_monotone_and_end_at_exactly_one():
    model = _tiny_dynn().train()
    costs = latency_exit_costs(model)
    assert len(costs) == model.num_exits and costs[-1] == 1.0
    assert all(0 < earlier <= later for earlier, later in zip(costs, costs[1:]))
    assert model.training  # measured in eval mode, handed back as it came


def test_latency_costs_are_the_latency_tables_cumulative_ms_over_the_full_networks(monkeypatch):
    segments = [2.0, 3.0, 1.0, 4.0]  # ms of each segment, as --eval's latency table measures them
    monkeypatch.setattr(latency, 'segment_latency_ms', lambda model, image, device, **kwargs: segments)
    assert cumulative_ms(segments) == [2.0, 5.0, 6.0, 10.0]
    assert latency_exit_costs(_tiny_dynn()) == pytest.approx([0.2, 0.5, 0.6, 1.0], abs=1e-15)


def test_a_recorded_vector_is_used_as_it_is_and_none_is_measured(monkeypatch):
    monkeypatch.setattr(dynn_training, 'latency_exit_costs', lambda model: pytest.fail('measured again'))
    assert exit_cost_vector(_tiny_dynn(), 'latency', [0.3, 0.6, 0.8, 1.0]) == [0.3, 0.6, 0.8, 1.0]
    model = _tiny_dynn()
    assert exit_cost_vector(model, 'flops') == normalized_exit_costs(model)


@pytest.mark.slow
def test_a_latency_run_records_its_vector_and_its_resume_trains_against_it(small_data, tmp_path, monkeypatch):
    common = [*FAST_FLAGS, '--output-dir', str(tmp_path)]
    measured = [0.25, 0.5, 0.75, 1.0]
    monkeypatch.setattr(dynn_training, 'latency_exit_costs', lambda model: measured)
    seen = []
    real_joint = dynn_training.run_joint_stage

    def spying_joint(model, train_loader, val_loader, optimizer, scheduler, device, costs, *args):
        seen.append(costs.tolist())
        return real_joint(model, train_loader, val_loader, optimizer, scheduler, device, costs, *args)
    monkeypatch.setattr(dynn_training, 'run_joint_stage', spying_joint)
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(['--stage', 'backbone', *common]) == 0
        backbone = tmp_path / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'best.pth'
        dynn = [*common, '--checkpoint-path', str(backbone), '--num_epoch', '3', '--max_warmup_epoch', '1',
                '--exit-positions', '3', '5', '7', '--exit-costs', 'latency']

        def stop_at_epoch_2(seed, epoch, loader):
            if epoch == 2:
                raise KeyboardInterrupt  # a kill after joint epoch 1 was saved
        with monkeypatch.context() as patch:
            patch.setattr(joint_stage, 'seed_epoch', stop_at_epoch_2)
            assert main(dynn) == 130
        last = tmp_path / 'checkpoint' / 'checkpoint_TINY_0.75_confEE' / 'last.pth'
        assert torch.load(last, map_location='cpu', weights_only=True)['args']['exit_cost_vector'] == measured
        monkeypatch.setattr(dynn_training, 'latency_exit_costs', lambda model: pytest.fail('measured again on --resume'))
        assert main(['--resume', str(last)]) == 0
    assert seen == [pytest.approx(measured)] * 2
    assert torch.load(last, map_location='cpu', weights_only=True)['args']['exit_cost_vector'] == measured
