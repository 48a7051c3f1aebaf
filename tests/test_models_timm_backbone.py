"""Any timm model in the backbone stage: training, --pretrained weights from a local file, a timm teacher for a
GFNet student, and the one-line errors where only a GFNet can work."""
import re

import pytest
import timm
import torch
from conftest import FAST_FLAGS, one_error
from torch.testing import assert_close

from main_dynn import main
from models.model_factory import build_backbone

CNN = 'test_resnet'  # timm's own tiny ResNet (0.4 M parameters)
FAST_CNN = ['--data-set', 'TINY', '--arch', CNN, *FAST_FLAGS[6:]]  # FAST_FLAGS without the GFNet's arch and patch


def _imagenet_weights(tmp_path, name: str, **kwargs):
    """A 1000-class state dict of `name`, saved as users save downloaded weights."""
    torch.manual_seed(0)
    path = tmp_path / f'{name}_imagenet.pth'
    state = timm.create_model(name, **kwargs).state_dict()
    torch.save(state, path)
    return path, state


def test_pretrained_file_loads_every_weight_but_the_foreign_head(tmp_path):
    path, state = _imagenet_weights(tmp_path, CNN)
    model = build_backbone(CNN, 3, 16, None, 0.0, pretrained=str(path))
    assert model.fc.out_features == 3
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items()
               if not key.startswith('fc.'))


def test_pretrained_gfnet_file_is_resized_to_the_grid(tmp_path):
    path, state = _imagenet_weights(tmp_path, 'gfnet_ti')  # 224 px: a 14 x 14 grid
    model = build_backbone('GFNet-ti-dynn', 3, 32, 16, 0.0, pretrained=str(path))  # a 2 x 2 grid
    assert model.pos_embed.shape == (1, 4, 256) and model.head.out_features == 3
    assert_close(model.blocks[0].mlp.fc1.weight, state['blocks.0.mlp.fc1.weight'])


@pytest.mark.slow
def test_timm_cnn_trains_in_stage_0_and_teaches_a_gfnet(small_data, tmp_path, capsys):
    weights, _ = _imagenet_weights(tmp_path, CNN)
    out = tmp_path / 'out'
    assert main(['--stage', 'backbone', *FAST_CNN, '--pretrained', str(weights), '--output-dir', str(out)]) == 0
    teacher = out / 'checkpoint' / f'backbone_TINY_{CNN}' / 'best.pth'
    checkpoint = torch.load(teacher, map_location='cpu', weights_only=True)
    assert checkpoint['args']['arch'] == CNN and checkpoint['args']['patch_size'] is None
    assert checkpoint['model']['fc.weight'].shape[0] == 3
    assert main(['--stage', 'backbone', *FAST_FLAGS, '--distillation-type', 'soft', '--teacher-model', CNN,
                 '--teacher-path', str(teacher), '--output-dir', str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r'backbone epoch 0 \| loss \d', printed)
    student = torch.load(out / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'best.pth', map_location='cpu',
                         weights_only=True)
    assert student['args']['teacher_model'] == CNN and 'pos_embed' in student['model']


@pytest.mark.parametrize('flags, pattern', [
    (['--stage', 'backbone', '--arch', 'resnet_nonexistent'], r'--arch resnet_nonexistent is neither a GFNet variant'),
    (['--stage', 'dynn', '--arch', 'test_byobnet'], r'--arch test_byobnet: early exits run on the GFNet variants'),
    (['--eval', '--arch', 'test_byobnet', '--checkpoint-path', 'x.pth'], r'early exits run on the GFNet variants'),
    (['--stage', 'backbone', '--arch', CNN, '--patch-size', '8'], r'--patch-size applies to GFNet archs only'),
    (['--stage', 'backbone', '--arch', CNN, '--pretrained', 'missing.pth'], r'--pretrained missing.pth does not exist'),
    (['--stage', 'dynn', '--pretrained', 'w.pth'], r'--pretrained has no effect with --stage dynn'),
    (['--stage', 'backbone', '--pretrained', 'w.pth', '--checkpoint-path', 'c.pth'], r'pass one of them'),
])
def test_timm_arch_mistakes_are_one_line(flags, pattern, small_data, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ['--data-set', 'TINY', '--num_workers', '0', '--device', 'cpu']
    assert re.search(pattern, one_error(capsys, [*base, *flags, '--output-dir', str(tmp_path)]))


def test_pretrained_file_of_another_architecture_is_one_line(small_data, tmp_path, capsys):
    path, _ = _imagenet_weights(tmp_path, 'test_efficientnet')
    line = one_error(capsys, ['--stage', 'backbone', *FAST_CNN, '--pretrained', str(path),
                              '--output-dir', str(tmp_path)])
    assert re.search(rf'--pretrained {re.escape(str(path))} (lacks|does not load)', line)


def test_freq_distillation_needs_a_gfnet_student(small_data, tmp_path, capsys):
    line = one_error(capsys, ['--stage', 'backbone', *FAST_CNN, '--distillation-type', 'freq', '--teacher-model',
                              'GFNet-ti-dynn', '--teacher-path', str(tmp_path / 't.pth'), '--output-dir',
                              str(tmp_path)])
    assert 'needs a GFNet student' in line


def test_fixed_size_timm_model_is_built_at_the_input_size():
    model = build_backbone('test_vit', 3, 32, None, 0.0).eval()  # a ViT: its position grid is fixed when built
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)


@pytest.mark.slow
def test_timm_backbone_run_resumes(small_data, tmp_path, capsys):
    assert main(['--stage', 'backbone', *FAST_CNN, '--output-dir', str(tmp_path)]) == 0
    last = tmp_path / 'checkpoint' / f'backbone_TINY_{CNN}' / 'last.pth'
    checkpoint = torch.load(last, map_location='cpu', weights_only=True)
    checkpoint['args']['num_epoch'] = 2  # as if a 2-epoch run had stopped after its first epoch
    torch.save(checkpoint, last)
    assert main(['--resume', str(last)]) == 0
    assert 'backbone epoch 1 |' in capsys.readouterr().out
    assert torch.load(last, map_location='cpu', weights_only=True)['epoch'] == 1
