"""benchmarks.exit_probe: probes learn what the features hold, the norm rescues features too small for the lr,
the cached features are what each exit's head reads, and the CLI runs on a trained checkpoint."""
import json

import pytest
import torch
from torch.testing import assert_close
from torch.utils.data import TensorDataset

from benchmarks.exit_probe import accuracy, fit_probe, main, pooled_features
from conftest import one_error, train_calibrated_dynn
from models.model_factory import build_dynn


def _separable(count_per_class: int, scale: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """4 classes around fixed random means in 32 dimensions, all multiplied by `scale`."""
    means = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4).repeat_interleave(count_per_class)
    noise = torch.randn(len(labels), 32, generator=torch.Generator().manual_seed(seed))
    return scale * (means[labels] + 0.3 * noise), labels


def test_a_norm_rescues_features_too_small_for_the_lr_and_changes_nothing_they_hold():
    train, train_labels = _separable(50, 0.01, seed=1)
    val, val_labels = _separable(25, 0.01, seed=2)
    plain = fit_probe(train, train_labels, 4, norm=False, epochs=3, lr=0.01)
    normed = fit_probe(train, train_labels, 4, norm=True, epochs=3, lr=0.01)
    assert accuracy(plain, val, val_labels) <= 50  # at 1/100 of the scale the steps are too small to learn
    assert accuracy(normed, val, val_labels) == 100
    # at unit scale the same classes are learned either way: the norm adds speed, not information
    train, val = train * 100, val * 100
    assert accuracy(fit_probe(train, train_labels, 4, norm=False, epochs=3, lr=0.01), val, val_labels) == 100


def test_pooled_features_are_what_each_exit_head_reads():
    torch.manual_seed(0)
    model = build_dynn('test_resnet', 3, 32, None, 0.0, None, 'unc').eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    features, got_labels = pooled_features(model, TensorDataset(images, labels), passes=2)
    assert len(features) == len(model.exit_positions) and torch.equal(got_labels, labels.repeat(2))
    with torch.no_grad():
        expected = model.forward_pooled(images, through_final=False)
    for k, f in enumerate(features):
        assert_close(f, torch.cat([expected[k], expected[k]]))
        assert_close(model.intermediate_heads[k](f[:6]), model.forward_exits(images).logits[k])


@pytest.mark.slow
def test_exit_probe_runs_on_a_trained_checkpoint(small_data, tmp_path, capsys):
    best = train_calibrated_dynn(tmp_path / 'run')
    path = tmp_path / 'probe.json'
    assert main(['--checkpoint', str(best), '--data-set', 'TINY', '--epochs', '2', '--json', str(path)]) == 0
    result = json.loads(path.read_text())
    assert [r['position'] for r in result['rows']] == [3, 7]
    assert all(0 <= r[key] <= 100 for r in result['rows'] for key in ('probe', 'probe_norm'))
    assert 'norm + probe %' in capsys.readouterr().out
    assert main(['--checkpoint', str(best), '--json', str(path)]) == 0  # the data set from the checkpoint
    assert json.loads(path.read_text())['rows'] == result['rows']  # augmentation and probes seeded: the same
    line = one_error(capsys, ['--checkpoint', str(best), '--data-set', 'DEMO', '--json', str(path)], main)
    assert line.endswith('was trained on other classes than those of DEMO; pass the --data-set it was trained '
                         'on (TINY)')
