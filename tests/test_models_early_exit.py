"""Real early exit: the engine's exits, predictions and logits equal the exit rule applied to a full forward."""
import pytest
import timm
import torch
from torch.testing import assert_close

import models  # noqa: F401  (registers the GFNet variants with timm)
from conftest import halve_at_each_exit
from models.early_exit import EarlyExitEngine

BATCH = 16
THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 1.01]


def _expected(logits: torch.Tensor, gate_logits: torch.Tensor, threshold: float):
    """The rule, sample by sample: first exit k with sigmoid(gate_k) >= threshold, else the final head."""
    num_gates, batch = gate_logits.shape
    exits = []
    for b in range(batch):
        chosen = num_gates
        for k in range(num_gates):
            if torch.sigmoid(gate_logits[k, b]) >= threshold:
                chosen = k
                break
        exits.append(chosen)
    exits = torch.tensor(exits)
    chosen_logits = logits[exits, torch.arange(batch)]  # (B, C)
    return exits, chosen_logits.argmax(dim=-1), chosen_logits


@pytest.fixture(scope='module')
def model_and_images():
    """Tiny GFNet-Dynn (depth 4, exits after blocks 0 1 2) whose gates send about half of the samples still
    inside out at each exit when the threshold is 0.5: gate k = 50 * (max prob_k - median among those left)."""
    torch.manual_seed(0)
    model = timm.create_model('gfnet_ti_dynn', num_classes=5, img_size=32, patch_size=8, depth=4, embed_dim=32,
                              exit_positions=(0, 1, 2)).eval()
    images = torch.randn(BATCH, 3, 32, 32)
    halve_at_each_exit(model, images)
    return model, images


@pytest.fixture(scope='module')
def full_forward(model_and_images):
    model, images = model_and_images
    with torch.no_grad():
        return model.forward_exits(images)


def test_fixture_gates_are_far_from_every_threshold_and_split_the_batch(full_forward):
    # guards the comparisons below: no sample's gate probability sits at an inner threshold within float
    # noise (0.0 and 1.01 cannot be crossed by a sigmoid)
    probs = torch.sigmoid(full_forward.gate_logits)
    for threshold in (0.3, 0.5, 0.7):
        assert (probs - threshold).abs().min() > 1e-4
    exits, _, _ = _expected(full_forward.logits, full_forward.gate_logits, 0.5)
    assert torch.bincount(exits, minlength=4).tolist() == [8, 4, 2, 2]


@pytest.mark.parametrize('threshold', THRESHOLDS)
def test_engine_matches_exit_rule_on_full_forward_at_batch_16(model_and_images, full_forward, threshold):
    model, images = model_and_images
    exits, predictions, logits = _expected(full_forward.logits, full_forward.gate_logits, threshold)
    result = EarlyExitEngine(model, threshold)(images)
    assert torch.equal(result.exit_index, exits)
    assert torch.equal(result.predictions, predictions)
    assert_close(result.logits, logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('threshold', THRESHOLDS)
def test_engine_matches_exit_rule_on_full_forward_at_batch_1(model_and_images, full_forward, threshold):
    model, images = model_and_images
    exits, predictions, logits = _expected(full_forward.logits, full_forward.gate_logits, threshold)
    engine = EarlyExitEngine(model, threshold)
    for b in range(BATCH):
        result = engine(images[b:b + 1])
        assert result.exit_index.tolist() == [exits[b].item()]
        assert result.predictions.tolist() == [predictions[b].item()]
        assert_close(result.logits, logits[b:b + 1], atol=1e-5, rtol=1e-5)


def test_threshold_zero_sends_everyone_out_at_the_first_exit(model_and_images):
    model, images = model_and_images
    assert EarlyExitEngine(model, 0.0)(images).exit_index.tolist() == [0] * BATCH


def test_threshold_above_one_sends_everyone_to_the_final_head(model_and_images):
    model, images = model_and_images
    assert EarlyExitEngine(model, 1.01)(images).exit_index.tolist() == [3] * BATCH


@pytest.mark.parametrize('threshold', [0.0, 0.5, 1.01])
def test_blocks_after_an_exit_run_only_for_samples_still_inside(model_and_images, full_forward, threshold):
    model, images = model_and_images
    exits, _, _ = _expected(full_forward.logits, full_forward.gate_logits, threshold)
    seen = {i: [] for i in range(len(model.blocks))}
    hooks = [block.register_forward_hook(lambda module, args, out, i=i: seen[i].append(out.shape[0]))
             for i, block in enumerate(model.blocks)]
    try:
        EarlyExitEngine(model, threshold)(images)
    finally:
        for hook in hooks:
            hook.remove()
    # block i belongs to segment i here (exits after blocks 0, 1, 2): it runs for samples with exit >= i
    for i in range(len(model.blocks)):
        still_inside = int((exits >= i).sum())
        assert seen[i] == ([still_inside] if still_inside else [])


@pytest.fixture(scope='module')
def demo_cache(tmp_path_factory):
    """A GFNet-Dynn at the DEMO set-up (64 px, patch 8, exits 3 5 7 9) with gates that split the DEMO
    validation images, and the --eval cache of those images (one batched pass, as --eval computes it)."""
    from data_loader_help import build_datasets
    from data_pipeline.demo_data import ensure_demo_dataset
    from evaluation.exit_cache import collect_exit_outputs

    root = ensure_demo_dataset(tmp_path_factory.mktemp('demo') / 'DEMO', train_per_class=2, val_per_class=8)
    _, val_set, _, _, _ = build_datasets('DEMO', root, 64)
    images = torch.stack([val_set[i][0] for i in range(len(val_set))])  # (64, 3, 64, 64)
    labels = torch.tensor([val_set[i][1] for i in range(len(val_set))])
    torch.manual_seed(0)
    model = timm.create_model('gfnet_ti_dynn', num_classes=8, img_size=64, patch_size=8, depth=12,
                              embed_dim=64).eval()
    with torch.no_grad():
        for head in model.intermediate_heads:
            head.weight.normal_(std=0.5)
        cache = collect_exit_outputs(model, [(images, labels)], torch.device('cpu'))
        for k, gate in enumerate(model.gates):  # gate k fires for the more confident part at exit k
            max_prob = cache.logits[k].softmax(dim=-1).amax(dim=-1)
            slope = 4.0 / max_prob.std()  # gate logits spread over about -8..8
            # split in the middle of the widest gap between the 16th and 48th most confident: no gate
            # probability lands near 0.5
            ordered = max_prob.sort().values
            i = 16 + int((ordered[17:49] - ordered[16:48]).argmax())
            gate.linear.weight.copy_(torch.tensor([[slope, 0.0, 0.0, 0.0]]))
            gate.linear.bias.fill_(-slope * (ordered[i] + ordered[i + 1]) / 2)
        cache = collect_exit_outputs(model, [(images, labels)], torch.device('cpu'))
    return model, images, cache


@pytest.mark.parametrize('batch, threshold', [(1, 0.5), (64, 0.3), (64, 0.5), (64, 0.8)])
def test_engine_equals_the_eval_cache_on_demo_images(demo_cache, threshold, batch):
    from evaluation.exit_cache import gated_predictions

    model, images, cache = demo_cache
    margin = (cache.gate_probs - threshold).abs().min()
    assert margin > 1e-4  # no gate sits on the threshold, so batch-size float noise cannot flip an exit
    predictions, exits = gated_predictions(cache, threshold)
    assert 0 < (exits == 0).sum() < len(exits)  # the threshold splits the images
    engine = EarlyExitEngine(model, threshold)
    results = [engine(images[i:i + batch]) for i in range(0, len(images), batch)]
    assert torch.equal(torch.cat([r.exit_index for r in results]), exits)
    assert torch.equal(torch.cat([r.predictions for r in results]), predictions)
