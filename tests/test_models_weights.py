"""Checkpoint loading: exact round trips, official GFNet checkpoints at another size, clear errors, no code run."""
import argparse

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import models  # noqa: F401  (registers the GFNet variants with timm)
from errors import GFNetDynnError
from jobs.trained_run import RunArgs
from models.gfnet import _resize_complex_weight, _resize_pos_embed
from models.weights import load_checkpoint, load_state, read_checkpoint

TINY = dict(num_classes=5, img_size=32, patch_size=8, depth=4, embed_dim=32, exit_positions=(0, 2))


def _randomised(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every tensor random, so equality checks cannot pass on shared default inits (ones, zeros)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return model


def _assert_state_equal(actual: dict, expected: dict) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        assert_close(actual[key], expected[key], rtol=0, atol=0, msg=key)


@pytest.fixture
def tiny_dynn():
    return _randomised(timm.create_model('gfnet_ti_dynn', **TINY))


def test_checkpoint_round_trip_is_exact(tmp_path, tiny_dynn):
    path = tmp_path / 'best.pth'
    torch.save({'model': tiny_dynn.state_dict(), 'epoch': 3}, path)
    fresh = timm.create_model('gfnet_ti_dynn', **TINY)
    report = load_checkpoint(fresh, path)
    _assert_state_equal(fresh.state_dict(), tiny_dynn.state_dict())
    assert report.fresh == [] and report.ignored == []


def test_bare_state_dict_loads(tmp_path, tiny_dynn):
    path = tmp_path / 'bare.pth'
    torch.save(tiny_dynn.state_dict(), path)
    fresh = timm.create_model('gfnet_ti_dynn', **TINY)
    load_checkpoint(fresh, path)
    _assert_state_equal(fresh.state_dict(), tiny_dynn.state_dict())


def test_module_prefixes_are_stripped(tmp_path, tiny_dynn):
    path = tmp_path / 'ddp.pth'
    torch.save({'model': {f'module.{k}': v for k, v in tiny_dynn.state_dict().items()}}, path)
    fresh = timm.create_model('gfnet_ti_dynn', **TINY)
    load_checkpoint(fresh, path)
    _assert_state_equal(fresh.state_dict(), tiny_dynn.state_dict())


def test_backbone_checkpoint_leaves_exits_and_gates_fresh(tiny_dynn):
    plain = _randomised(timm.create_model('gfnet_ti', **{k: v for k, v in TINY.items() if k != 'exit_positions'}))
    before = {k: v.clone() for k, v in tiny_dynn.state_dict().items()}
    report = load_state(tiny_dynn, {'model': plain.state_dict()})
    after = tiny_dynn.state_dict()
    assert sorted(report.fresh) == sorted(k for k in after if k.startswith(('intermediate_heads.', 'gates.')))
    for key in after:
        assert_close(after[key], before[key] if key in report.fresh else plain.state_dict()[key], rtol=0, atol=0)


def test_official_xs_checkpoint_loads_into_dynn_at_another_size_and_class_count(tmp_path):
    source = _randomised(timm.create_model('gfnet_xs', img_size=224, num_classes=1000))
    path = tmp_path / 'gfnet-xs.pth'
    torch.save({'model': source.state_dict()}, path)
    src = source.state_dict()
    del source

    torch.manual_seed(1)
    target = timm.create_model('gfnet_xs_dynn', img_size=256, num_classes=21)
    before = {k: v.clone() for k, v in target.state_dict().items()
              if k.startswith(('head.', 'intermediate_heads.', 'gates.'))}
    report = load_checkpoint(target, path)
    loaded = target.state_dict()

    assert loaded['pos_embed'].shape == (1, 256, 384)  # 16 x 16 tokens
    for i in range(12):
        assert loaded[f'blocks.{i}.filter.complex_weight'].shape == (16, 9, 384, 2)
        for name in ('norm1.weight', 'norm1.bias', 'norm2.weight', 'norm2.bias', 'mlp.fc1.weight',
                     'mlp.fc1.bias', 'mlp.fc2.weight', 'mlp.fc2.bias'):
            key = f'blocks.{i}.{name}'
            assert_close(loaded[key], src[key], rtol=0, atol=0, msg=key)
    for key in ('patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias'):
        assert_close(loaded[key], src[key], rtol=0, atol=0, msg=key)
    # head of 1000 classes skipped; exits and gates (absent from the checkpoint) keep their init
    assert set(report.fresh) == set(before)
    for key, value in before.items():
        assert_close(loaded[key], value, rtol=0, atol=0, msg=key)
    assert loaded['head.weight'].shape == (21, 384)
    # the official GFNet fine-tuning code: positions bicubic with align_corners=False, filters with True
    official_pos = F.interpolate(src['pos_embed'].reshape(1, 14, 14, 384).permute(0, 3, 1, 2), size=(16, 16),
                                 mode='bicubic', align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    assert_close(loaded['pos_embed'], official_pos)
    weight = src['blocks.0.filter.complex_weight']  # (14, 8, 384, 2)
    official_filter = F.interpolate(weight.reshape(1, 14, 8, 768).permute(0, 3, 1, 2), size=(16, 9),
                                     mode='bicubic', align_corners=True).permute(0, 2, 3, 1).reshape(16, 9, 384, 2)
    assert_close(loaded['blocks.0.filter.complex_weight'], official_filter)
    assert_close(official_filter[0, 0], weight[0, 0])  # align_corners keeps the corners


def test_resize_to_the_same_grid_is_the_identity():
    torch.manual_seed(0)
    pos_embed = torch.randn(1, 16, 8)
    weight = torch.randn(4, 3, 8, 2)
    assert_close(_resize_pos_embed(pos_embed, (4, 4)), pos_embed)
    assert_close(_resize_complex_weight(weight, (4, 3)), weight)


def test_resize_complex_weight_keeps_real_and_imaginary_parts_apart():
    weight = torch.zeros(4, 3, 2, 2)
    weight[..., 0] = 1.0  # real part 1, imaginary part 0 everywhere
    resized = _resize_complex_weight(weight, (6, 4))
    assert_close(resized[..., 0], torch.ones(6, 4, 2))
    assert_close(resized[..., 1], torch.zeros(6, 4, 2))


def test_checkpoint_of_another_width_names_the_keys(tmp_path):
    ti = timm.create_model('gfnet_ti', img_size=32, patch_size=16, depth=2, num_classes=5)
    path = tmp_path / 'ti.pth'
    torch.save({'model': ti.state_dict()}, path)
    xs = timm.create_model('gfnet_xs', img_size=32, patch_size=16, depth=2, num_classes=5)
    with pytest.raises(GFNetDynnError, match=r'shape mismatch: .*patch_embed\.proj\.weight'):
        load_checkpoint(xs, path)


def test_checkpoint_missing_backbone_keys_is_an_error(tiny_dynn):
    state = {k: v for k, v in tiny_dynn.state_dict().items() if not k.startswith('blocks.3.')}
    fresh = timm.create_model('gfnet_ti_dynn', **TINY)
    with pytest.raises(GFNetDynnError, match=r'missing: .*blocks\.3\.'):
        load_state(fresh, {'model': state})


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(GFNetDynnError, match='does not exist'):
        read_checkpoint(tmp_path / 'nope.pth')


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    path = tmp_path / 'noise.pth'
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(GFNetDynnError, match='not a readable PyTorch checkpoint'):
        read_checkpoint(path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / 'notes.pth'
    path.write_text('epoch 3: accuracy 91.2\n')
    with pytest.raises(GFNetDynnError, match='not a readable PyTorch checkpoint'):
        read_checkpoint(path)


def test_checkpoint_holding_a_non_dict_is_refused(tmp_path):
    path = tmp_path / 'tensor.pth'
    torch.save(torch.zeros(3), path)
    with pytest.raises(GFNetDynnError, match='not a state dict'):
        read_checkpoint(path)


def test_checkpoint_holding_a_namespace_and_numpy_scalars_is_read_as_data(tmp_path, tiny_dynn):
    path = tmp_path / 'with-args.pth'  # as GFNet's and DeiT's main.py save them
    torch.save({'model': tiny_dynn.state_dict(), 'args': argparse.Namespace(lr=np.float64(0.1), seed=np.int64(0)),
                'max_accuracy': np.float32(81.5)}, path)
    checkpoint = read_checkpoint(path)
    assert checkpoint['args'].lr == 0.1 and checkpoint['max_accuracy'] == np.float32(81.5)
    assert RunArgs.of(checkpoint) == RunArgs()  # a foreign Namespace is not taken for our run's arguments


class _WritesFileOnUnpickle:
    """Unpickling this calls open(path, 'w'): the file appears only if loading ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


def test_loading_does_not_run_code_from_the_checkpoint(tmp_path):
    marker = tmp_path / 'pwned.txt'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {}, 'payload': _WritesFileOnUnpickle(marker)}, path)
    assert not marker.exists()
    with pytest.raises(GFNetDynnError):
        read_checkpoint(path)
    assert not marker.exists()
