"""FLOP counting: the FFT global filter against its analytic count, whole models against hand sums."""
import math

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import models  # noqa: F401  (registers the GFNet variants with timm)
from models.flops import (count_flops, exit_gflops, flop_counter, lambda_factor, normalized_exit_costs,
                          reference_exit_op_counts, reference_normalized_exit_costs)
from models.gfnet import GlobalFilter


def _filter_flops(a: int, b: int, dim: int) -> float:
    """rfft2 + complex multiply + irfft2 over an a x b grid with `dim` channels (flops.py's convention)."""
    n = a * b
    rfft2 = 2.5 * n * math.log2(n) * dim
    multiply = 6 * a * (b // 2 + 1) * dim  # 4 multiplies + 2 adds per complex product
    irfft2 = 2.5 * n * math.log2(n) * dim
    return rfft2 + multiply + irfft2


def _gfnet_flops(img_size: int, patch: int, dim: int, depth: int, classes: int) -> float:
    """Hand count of one image through a plain GFNet: patch conv, per block two linears + filter, head."""
    side = img_size // patch
    tokens = side * side
    patch_conv = 2 * patch * patch * 3 * dim * tokens
    mlp = 2 * (2 * tokens * dim * 4 * dim)  # fc1 (D -> 4D) and fc2 (4D -> D)
    head = 2 * dim * classes
    return patch_conv + depth * (mlp + _filter_flops(side, side, dim)) + head


def test_global_filter_flops_equal_analytic_count_on_power_of_two_grid():
    a, b, dim = 4, 4, 3
    gf = GlobalFilter(dim, (a, b))
    # n = 16: 2.5 * 16 * 4 * 3 = 480 per transform, 6 * 4 * 3 * 3 = 216 for the multiply
    assert count_flops(gf, torch.randn(1, a * b, dim)) == 480 + 216 + 480 == _filter_flops(a, b, dim)


def test_global_filter_flops_equal_analytic_count_on_non_power_of_two_grid():
    a, b, dim = 4, 6, 3
    gf = GlobalFilter(dim, (a, b))
    # n = 24 gives a fractional n log2 n; the counter rounds each transform down to whole FLOPs
    assert count_flops(gf, torch.randn(1, a * b, dim)) == pytest.approx(_filter_flops(a, b, dim), abs=2)


def test_counter_sees_global_filter_as_rfft_multiply_irfft():
    a, b, dim = 4, 4, 3
    gf = GlobalFilter(dim, (a, b))
    with flop_counter() as counter, torch.no_grad():
        gf(torch.randn(1, a * b, dim))
    ops = {str(op): flops for op, flops in counter.get_flop_counts()['Global'].items()}
    assert ops == {'aten._fft_r2c': 480, 'aten.mul': 216, 'aten._fft_c2r': 480}


def test_global_filter_flops_scale_with_batch():
    gf = GlobalFilter(3, (4, 4))
    assert count_flops(gf, torch.randn(5, 16, 3)) == 5 * count_flops(gf, torch.randn(1, 16, 3))


@pytest.mark.parametrize('img_size, patch', [(32, 8), (32, 16)])
def test_tiny_gfnet_flops_equal_hand_sum(img_size, patch):
    model = timm.create_model('gfnet_ti', num_classes=5, img_size=img_size, patch_size=patch, depth=4,
                              embed_dim=32).eval()
    counted = count_flops(model, torch.zeros(1, 3, img_size, img_size))
    assert counted == _gfnet_flops(img_size, patch, dim=32, depth=4, classes=5)


def test_stock_counter_misses_exactly_the_fft_filter():
    model = timm.create_model('gfnet_ti', num_classes=5, img_size=32, patch_size=8, depth=4, embed_dim=32).eval()
    x = torch.zeros(1, 3, 32, 32)
    with FlopCounterMode(display=False) as stock, torch.no_grad():
        model(x)
    ours = count_flops(model, x)
    assert stock.get_total_flops() < ours
    assert ours - stock.get_total_flops() == 4 * _filter_flops(4, 4, 32)


def _tiny_dynn(img_size: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('gfnet_ti_dynn', num_classes=5, img_size=img_size, patch_size=8, depth=4,
                             embed_dim=32, exit_positions=(0, 1, 2)).eval()


def test_exit_gflops_increase_and_end_at_full_forward():
    model = _tiny_dynn()
    gflops = exit_gflops(model)
    assert len(gflops) == 4
    assert all(earlier < later for earlier, later in zip(gflops, gflops[1:]))
    assert gflops[-1] == count_flops(model.forward_exits, torch.zeros(1, 3, 32, 32)) / 1e9


def test_exit_gflops_first_exit_equals_hand_count():
    model = _tiny_dynn()
    # patch conv + one block + exit head (D -> C) + uncertainty gate Linear(4, 1)
    side, dim, tokens = 4, 32, 16
    expected = (2 * 8 * 8 * 3 * dim * tokens + 2 * (2 * tokens * dim * 4 * dim) + _filter_flops(side, side, dim)
                + 2 * dim * 5 + 2 * 4 * 1)
    assert exit_gflops(model)[0] * 1e9 == pytest.approx(expected, rel=1e-12)


def test_exit_gflops_keeps_training_mode():
    model = _tiny_dynn().train()
    exit_gflops(model)
    assert model.training


def test_normalized_exit_costs_end_at_exactly_one():
    costs = normalized_exit_costs(_tiny_dynn())
    assert costs[-1] == 1.0
    assert all(0 < c < 1 for c in costs[:-1])
    assert costs == sorted(costs)


def test_flops_follow_the_model_input_size():
    # the reference counted every model on a fixed 224 px grid; a 64 px and a 128 px model must differ
    small = timm.create_model('gfnet_ti', num_classes=5, img_size=64, patch_size=16, depth=2, embed_dim=16)
    large = timm.create_model('gfnet_ti', num_classes=5, img_size=128, patch_size=16, depth=2, embed_dim=16)
    small_flops = count_flops(small.eval(), torch.zeros(1, 3, 64, 64))
    large_flops = count_flops(large.eval(), torch.zeros(1, 3, 128, 128))
    assert small_flops == _gfnet_flops(64, 16, dim=16, depth=2, classes=5)
    assert large_flops == _gfnet_flops(128, 16, dim=16, depth=2, classes=5)
    assert large_flops > 3 * small_flops


def test_exit_gflops_follow_the_model_input_size():
    assert exit_gflops(_tiny_dynn(64))[-1] > exit_gflops(_tiny_dynn(32))[-1]


# The reference's counter, for --exit-costs reference. Expected values: printed by the reference repository's own
# dynn/op_counter.py (measure_model_and_assign_cost_per_exit on its GFNet_xs_dynn with exits 3/5/7/9).
REFERENCE_COUNTS = {
    # (embed_dim, patch, img_size, classes): cumulative ops at each exit
    (384, 16, 256, 21): [192132697.13434386, 212709745.7015158, 233286794.26868773, 253863842.83585966,
                         274686456.4030316],
    (384, 16, 600, 30): [986332540.5660806, 1075775955.8491209, 1165219371.1321614, 1254662786.415202,
                         1345420165.6982424],
    (256, 8, 64, 8): [17119862.28358595, 22536156.425378926, 27952450.5671719, 33368744.708964877,
                      38825920.85075786],
}


@pytest.mark.parametrize('dim, patch, img_size, classes', sorted(REFERENCE_COUNTS))
def test_reference_op_counts_equal_what_the_reference_counter_printed(dim, patch, img_size, classes):
    name = 'gfnet_xs_dynn' if dim == 384 else 'gfnet_ti_dynn'
    model = timm.create_model(name, num_classes=classes, img_size=img_size, patch_size=patch)
    assert reference_exit_op_counts(model) == pytest.approx(REFERENCE_COUNTS[dim, patch, img_size, classes],
                                                            rel=1e-12)


def test_reference_costs_are_flatter_than_true_flops():
    model = timm.create_model('gfnet_xs_dynn', num_classes=21, img_size=256)
    reference = reference_normalized_exit_costs(model)
    assert reference == pytest.approx([0.699462, 0.774373, 0.849284, 0.924195, 1.0], abs=1e-6)
    true = normalized_exit_costs(model)
    assert true[-1] == reference[-1] == 1.0
    assert all(t < r for t, r in zip(true[:-1], reference[:-1]))
    assert true[0] == pytest.approx(0.35, abs=0.02)


def test_lambda_factor_is_the_ratio_of_what_each_exit_saves():
    model = timm.create_model('gfnet_xs_dynn', num_classes=21, img_size=256)
    factor = lambda_factor(model)
    true, reference = normalized_exit_costs(model), reference_normalized_exit_costs(model)
    expected = [(1 - t) / (1 - r) for t, r in zip(true[:4], reference[:4])]
    assert factor['per_exit'] == pytest.approx(expected, rel=1e-12)
    assert factor['mean'] == pytest.approx(sum(expected) / 4, rel=1e-12)
    # a gate target prefers exit k while CE_k - CE_final < lambda (1 - cost_k): lambda under true FLOPs and
    # lambda * factor_k under the reference's vector draw that line at the same place
    assert 0.75 * (1 - true[0]) == pytest.approx(0.75 * factor['per_exit'][0] * (1 - reference[0]), rel=1e-12)
    assert factor['mean'] == pytest.approx(2.2, abs=0.1)  # the known gap at 256 px


def test_reference_costs_of_identity_gates_leave_out_the_gate_ops():
    unc = timm.create_model('gfnet_ti_dynn', num_classes=10, img_size=64, patch_size=8)
    identity = timm.create_model('gfnet_ti_dynn', num_classes=10, img_size=64, patch_size=8, gate='identity')
    gate_ops = 9 * 10 + 6
    differences = [u - i for u, i in zip(reference_exit_op_counts(unc), reference_exit_op_counts(identity))]
    assert differences == pytest.approx([gate_ops, 2 * gate_ops, 3 * gate_ops, 4 * gate_ops, 4 * gate_ops])
