"""The contract timm's own model tests check, for gfnet_* and gfnet_*_dynn: default cfgs, forward and backward
at the cfg's size, head_hidden_size, reset_classifier, forward_features/forward_head, forward_intermediates,
features_only, device/dtype, TorchScript and FX."""
import pytest
import timm
import torch
from timm.models import create_feature_extractor, get_graph_node_names
from torch.testing import assert_close

import models  # noqa: F401  (registers the GFNet variants with timm)

NAMES = timm.list_models('gfnet_*')
SMALL = dict(num_classes=5, img_size=32, patch_size=8, depth=4, embed_dim=32)  # a 4 x 4 token grid


def small(name: str, **kwargs) -> torch.nn.Module:
    """A 4-block variant at 32 px; the early-exit one with exits after blocks 0 and 2."""
    exits = {'exit_positions': (0, 2)} if name.endswith('_dynn') else {}
    return timm.create_model(name, **{**SMALL, **exits, **kwargs})


def test_every_variant_is_registered_with_and_without_exits():
    assert NAMES == ['gfnet_b', 'gfnet_b_dynn', 'gfnet_s', 'gfnet_s_dynn', 'gfnet_ti', 'gfnet_ti_dynn', 'gfnet_xs',
                     'gfnet_xs_dynn']


@pytest.mark.parametrize('name', NAMES)
def test_default_cfg_is_fixed_size_and_names_real_modules(name):
    model = timm.create_model(name)
    cfg = model.pretrained_cfg
    assert cfg['fixed_input_size'] is True  # the filters are sized to the token grid
    assert cfg['input_size'] == (3, 224, 224) and cfg['pool_size'] == (14, 14)
    assert model.num_classes == cfg['num_classes'] == 1000 and model.in_chans == 3
    state = model.state_dict()
    assert f"{cfg['first_conv']}.weight" in state and f"{cfg['classifier']}.weight" in state
    assert model.head_hidden_size == model.num_features == model.embed_dim


@pytest.mark.parametrize('name', ['gfnet_ti', 'gfnet_ti_dynn'])
def test_forward_and_backward_at_the_cfg_size(name):
    model = timm.create_model(name, num_classes=42).train()
    out = model(torch.randn(2, *model.pretrained_cfg['input_size']))
    assert out.shape == (2, 42)
    out.mean().backward()
    backbone = [n for n, p in model.named_parameters() if not n.startswith(('intermediate_heads.', 'gates.'))]
    assert all(dict(model.named_parameters())[n].grad is not None for n in backbone)


@pytest.mark.parametrize('name', ['gfnet_ti', 'gfnet_ti_dynn'])
def test_features_head_and_pre_logits_agree_with_forward(name):
    torch.manual_seed(0)
    model = small(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 4, 4, 32)  # (B, H, W, D), output_fmt NHWC
        assert_close(model.forward_head(features), model(x))
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        assert_close(model(x), pre_logits)  # no classifier: the pooled features
        model.reset_classifier(0, global_pool='')
        assert model(x).shape == (2, 4, 4, 32)  # no pooling either: the unpooled features


@pytest.mark.parametrize('name', NAMES)
def test_features_sit_where_the_model_says_for_timms_non_standard_check(name):
    model = small(name).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[model.feature_dim] == model.num_features  # channels-last, not dim 1
        pooled = model.forward_head(features, pre_logits=True)
        model.reset_classifier(0)
        assert model(x).shape == pooled.shape == (1, model.head_hidden_size)
        assert small(name, num_classes=0).eval()(x).shape[model.feature_dim] == model.num_features


def test_dynn_forward_is_the_final_exit_and_reset_classifier_resizes_every_exit():
    torch.manual_seed(0)
    model = small('gfnet_ti_dynn').eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert_close(model(x), model.forward_exits(x).logits[-1])
        model.reset_classifier(7)
        out = model.forward_exits(x)
    assert model(x).shape == (3, 7) and out.logits.shape == (3, 3, 7) and out.gate_logits.shape == (2, 3)


def test_reset_classifier_keeps_device_dtype_and_mode():
    model = small('gfnet_ti_dynn', dtype=torch.float64).eval()
    model.reset_classifier(9)
    assert model.head.weight.dtype == torch.float64 and not model.head.training
    assert all(head.weight.dtype == torch.float64 and not head.training for head in model.intermediate_heads)


@pytest.mark.parametrize('name', ['gfnet_ti', 'gfnet_ti_dynn'])
def test_create_model_builds_in_the_requested_dtype_and_device(name):
    model = small(name, dtype=torch.bfloat16, device='meta')
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {'meta'}


def test_bfloat16_model_runs_its_filters_in_float32():
    model = small('gfnet_ti_dynn', dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize('name', ['gfnet_ti', 'gfnet_ti_dynn'])
def test_forward_intermediates_give_block_outputs_and_the_final_features(name):
    torch.manual_seed(0)
    model = small(name).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, indices=[1, 3])
        tokens, collected = model.forward_tokens(x, collect=[1, 3])
        assert_close(final, model.forward_features(x))
        assert [y.shape for y in intermediates] == [(2, 32, 4, 4)] * 2  # NCHW
        assert_close(intermediates[0], collected[0].reshape(2, 4, 4, 32).permute(0, 3, 1, 2))
        last = model.forward_intermediates(x, indices=1, output_fmt='NLC', intermediates_only=True)
        assert_close(last[0], collected[1])


def test_features_only_returns_the_feature_info_blocks():
    model = small('gfnet_ti', features_only=True).eval()
    outputs = model(torch.randn(1, 3, 32, 32))
    assert [o.shape[1] for o in outputs] == model.feature_info.channels()
    assert all(o.shape[-2:] == (4, 4) for o in outputs)


@pytest.mark.parametrize('name', ['gfnet_ti', 'gfnet_ti_dynn'])
def test_torchscript_matches_eager(name):
    torch.manual_seed(0)
    model = small(name).eval()
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(scripted(x), model(x))


@pytest.mark.parametrize('name', ['gfnet_ti', 'gfnet_ti_dynn'])
def test_fx_feature_extractor_matches_eager(name):
    torch.manual_seed(0)
    model = small(name).eval()
    _, eval_nodes = get_graph_node_names(model)
    fx_model = create_feature_extractor(model, return_nodes=[eval_nodes[-1]])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_close(next(iter(fx_model(x).values())), model(x))


def test_state_dict_keys_stay_the_official_names_plus_exits_and_gates():
    keys = set(small('gfnet_ti_dynn').state_dict())
    assert {'pos_embed', 'patch_embed.proj.weight', 'blocks.0.filter.complex_weight', 'blocks.3.mlp.fc2.bias',
            'norm.weight', 'head.weight', 'intermediate_heads.0.weight', 'gates.0.linear.weight'} <= keys
    assert all(k.split('.')[0] in {'pos_embed', 'patch_embed', 'blocks', 'norm', 'head', 'intermediate_heads',
                                   'gates'} for k in keys)
