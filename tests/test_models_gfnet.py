"""GFNet backbone and GFNet-Dynn exits: the filter's maths, shapes, state-dict names, variants, exits."""
import math

import pytest
import timm
import torch
import torch.nn as nn
from torch.testing import assert_close

import models  # noqa: F401  (registers the GFNet variants with timm)
from errors import GFNetDynnError
from models.gfnet import GlobalFilter
from models.gfnet_dynn import DynnOutput, GFNetDynn, validate_exit_positions

TINY = dict(num_classes=5, img_size=32, patch_size=8, depth=4, embed_dim=32)


def _circular_conv(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Depthwise circular convolution by explicit sums: y[m, n] = sum_{p,q} k[p, q] x[m - p, n - q] (mod a, b)."""
    a, b, _ = kernel.shape
    y = torch.zeros_like(x)
    for p in range(a):
        for q in range(b):
            y += kernel[p, q] * torch.roll(x, shifts=(p, q), dims=(0, 1))  # roll: out[m, n] = x[m - p, n - q]
    return y


@pytest.mark.parametrize('grid', [(4, 6), (3, 5)])
def test_global_filter_equals_depthwise_circular_convolution(grid):
    # rfft2 with norm='ortho' divides by sqrt(n), irfft2 with norm='ortho' divides by sqrt(n) instead of n,
    # so the product is the plain (backward-normalised) pair: y = irfft2(rfft2(x) * W) = x (*) irfft2(W),
    # i.e. the kernel is irfft2(W, norm='backward') = irfft2(W, norm='ortho') / sqrt(a * b).
    torch.manual_seed(0)
    a, b = grid
    dim = 3
    gf = GlobalFilter(dim, (a, b))
    with torch.no_grad():
        gf.complex_weight.normal_()  # O(1) weights so the check is not trivially near zero
    x = torch.randn(2, a * b, dim)

    weight = torch.view_as_complex(gf.complex_weight.detach().double())  # (a, b//2+1, D)
    kernel = torch.fft.irfft2(weight, s=(a, b), dim=(0, 1), norm='ortho') / (a * b) ** 0.5  # (a, b, D)
    expected = torch.stack([_circular_conv(sample.view(a, b, dim).double(), kernel) for sample in x])

    assert_close(gf(x), expected.reshape(2, a * b, dim).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('img_size, patch_size, grid', [(32, 8, (4, 4)), (48, 16, (3, 3)), (16, 4, (4, 4))])
def test_gfnet_output_shapes_follow_input_and_patch_size(img_size, patch_size, grid):
    model = timm.create_model('gfnet_ti', num_classes=7, img_size=img_size, patch_size=patch_size, depth=2,
                              embed_dim=16).eval()
    x = torch.randn(2, 3, img_size, img_size)
    assert model.grid_size == grid
    assert model.pos_embed.shape == (1, grid[0] * grid[1], 16)
    assert model.blocks[0].filter.complex_weight.shape == (grid[0], grid[1] // 2 + 1, 16, 2)
    assert model.forward_features(x).shape == (2, grid[0], grid[1], 16)  # NHWC, timm's output_fmt
    assert model.forward_tokens(x)[0].shape == (2, grid[0] * grid[1], 16)
    assert model(x).shape == (2, 7)


def test_state_dict_keys_match_official_gfnet_names():
    model = timm.create_model('gfnet_ti', **TINY)
    expected = {'patch_embed.proj.weight', 'patch_embed.proj.bias', 'pos_embed', 'norm.weight', 'norm.bias',
                'head.weight', 'head.bias'}
    for i in range(TINY['depth']):
        expected |= {f'blocks.{i}.{name}' for name in (
            'norm1.weight', 'norm1.bias', 'filter.complex_weight', 'norm2.weight', 'norm2.bias',
            'mlp.fc1.weight', 'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias')}
    assert set(model.state_dict()) == expected


def test_dynn_state_dict_adds_only_intermediate_heads_and_gates():
    plain = timm.create_model('gfnet_ti', **TINY)
    dynn = timm.create_model('gfnet_ti_dynn', exit_positions=(0, 2), **TINY)
    extra = set(dynn.state_dict()) - set(plain.state_dict())
    assert set(plain.state_dict()) <= set(dynn.state_dict())
    assert extra == {f'{module}.{k}.{name}' for k in range(2) for module, name in (
        ('intermediate_heads', 'weight'), ('intermediate_heads', 'bias'),
        ('gates', 'linear.weight'), ('gates', 'linear.bias'))}


@pytest.mark.parametrize('arch, width, depth', [
    ('gfnet_ti', 256, 12), ('gfnet_xs', 384, 12), ('gfnet_s', 384, 19), ('gfnet_b', 512, 19),
    ('gfnet_ti_dynn', 256, 12), ('gfnet_xs_dynn', 384, 12), ('gfnet_s_dynn', 384, 19), ('gfnet_b_dynn', 512, 19)])
def test_variant_width_depth_and_patch_size(arch, width, depth):
    model = timm.create_model(arch)  # built only, no forward: the big ones are slow on CPU
    assert model.embed_dim == width
    assert len(model.blocks) == depth
    assert model.patch_embed.proj.kernel_size == (16, 16)
    assert model.blocks[0].mlp.fc1.out_features == 4 * width  # mlp ratio 4
    assert model.blocks[0].norm1.eps == 1e-6


def test_gfnet_xs_has_about_16m_parameters():
    model = timm.create_model('gfnet_xs', num_classes=1000, img_size=224)
    num_params = sum(p.numel() for p in model.parameters())
    assert 15.5e6 <= num_params <= 16.5e6


def test_drop_path_rates_grow_linearly_from_zero():
    model = timm.create_model('gfnet_ti', drop_path_rate=0.3, **TINY)
    rates = [0.0 if isinstance(block.drop_path, nn.Identity) else block.drop_path.drop_prob
             for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_dynn_forward_returns_exit_logits_and_gate_logits():
    model = timm.create_model('gfnet_ti_dynn', exit_positions=(0, 2), **TINY).eval()
    out = model.forward_exits(torch.randn(3, 3, 32, 32))
    assert isinstance(out, DynnOutput)
    assert out.logits.shape == (3, 3, 5)  # (E, B, C), E = 2 exits + final
    assert out.gate_logits.shape == (2, 3)  # (G, B)
    assert model.num_exits == 3


def test_dynn_final_logits_equal_plain_gfnet_with_same_weights():
    torch.manual_seed(0)
    plain = timm.create_model('gfnet_ti', **TINY).eval()
    dynn = timm.create_model('gfnet_ti_dynn', exit_positions=(1, 2), **TINY).eval()
    result = dynn.load_state_dict(plain.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert all(k.startswith(('intermediate_heads.', 'gates.')) for k in result.missing_keys)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert_close(dynn.forward_exits(x).logits[-1], plain(x))
        assert_close(dynn(x), plain(x))  # timm's forward: the final head's logits


def test_dynn_intermediate_exit_reads_the_normed_pooled_tokens_of_its_block():
    torch.manual_seed(0)
    model = timm.create_model('gfnet_ti_dynn', exit_positions=(1,), **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.blocks[1](model.blocks[0](model.embed(x)))
        expected = model.intermediate_heads[0](model.norm(tokens).mean(dim=1))
        assert_close(model.forward_exits(x).logits[0], expected)


def test_forward_pooled_then_heads_and_gates_equals_forward():
    torch.manual_seed(0)
    model = timm.create_model('gfnet_ti_dynn', exit_positions=(0, 1, 2), **TINY).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        pooled = model.forward_pooled(x)
        split = model.heads_and_gates(pooled)
        whole = model.forward_exits(x)
    assert pooled.shape == (4, 3, 32)  # (E, B, D)
    assert_close(split.logits, whole.logits)
    assert_close(split.gate_logits, whole.gate_logits)


def test_dynn_segments_cover_all_blocks_once():
    model = GFNetDynn(exit_positions=(0, 2), **TINY)
    assert model.segments() == [(0, 1), (1, 3), (3, 4)]


@pytest.mark.parametrize('positions', [(2, 1), (1, 1), (-1, 2), (1, 3), (4,), ()],
                         ids=['unsorted', 'duplicate', 'negative', 'last-block', 'too-deep', 'empty'])
def test_validate_exit_positions_rejects_bad_positions(positions):
    with pytest.raises(GFNetDynnError, match='exit-positions'):
        validate_exit_positions(positions, depth=4)


def test_validate_exit_positions_accepts_sorted_positions_before_last_block():
    assert validate_exit_positions([0, 1, 2], depth=4) == (0, 1, 2)


def test_dynn_constructor_rejects_bad_exit_positions():
    with pytest.raises(GFNetDynnError):
        GFNetDynn(exit_positions=(2, 1), **TINY)



def test_exit_heads_and_gates_keep_pytorchs_default_linear_init():
    """The reference attaches exits to a finished model, so they skip GFNet's trunc-normal init: weights and
    biases uniform in +-1/sqrt(fan_in) (kaiming_uniform with a = sqrt(5)), not std 0.02 with zero bias."""
    torch.manual_seed(0)
    model = timm.create_model('gfnet_ti_dynn', num_classes=10, img_size=32, patch_size=8)
    bound = 1 / math.sqrt(256)
    for head in model.intermediate_heads:
        assert head.weight.abs().max() <= bound and head.bias.abs().max() <= bound
        assert head.weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform, not std 0.02
        assert head.bias.abs().min() > 0
    assert model.head.weight.std().item() == pytest.approx(0.02, rel=0.15) and torch.all(model.head.bias == 0)
    for gate in model.gates:
        assert gate.linear.weight.abs().max() <= 1 / math.sqrt(4) and gate.linear.bias.abs().min() > 0


def test_chained_segments_equal_the_full_forward():
    """forward_segment is the one walk over the blocks: chained over every exit it gives forward()'s outputs."""
    torch.manual_seed(0)
    model = timm.create_model('gfnet_ti_dynn', num_classes=5, img_size=32, patch_size=8, exit_positions=(2, 6)).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model.forward_exits(images)
        x, logits, gates = images, [], []
        for k in range(model.num_exits):
            x, exit_logits, gate_logits = model.forward_segment(k, x)
            logits.append(exit_logits)
            gates += [] if gate_logits is None else [gate_logits]
    assert_close(torch.stack(logits), out.logits)
    assert_close(torch.stack(gates), out.gate_logits)
    assert gate_logits is None and x.shape == (3, 16, 256)
