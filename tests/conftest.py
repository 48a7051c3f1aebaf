"""Shared pytest fixtures: tiny image folders written under tmp_path."""
import contextlib
import io
import os

# One CPU thread for the tests and the processes they start (unless OMP_NUM_THREADS says otherwise): their
# tensors are tiny, and on a loaded machine a second thread made the in-process tier 2.5x slower.
os.environ.setdefault('OMP_NUM_THREADS', '1')
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.common import SMALL_DATA_BACKBONE


def _write_images(folder: Path, count: int, size: tuple[int, int], rng: np.random.Generator) -> None:
    """Write `count` random RGB PNGs (width, height = size) into folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f'{i:03d}.png')


@pytest.fixture
def make_image_folder() -> Callable[..., Path]:
    """Factory: make_image_folder(root, classes, per_class, size=(32, 32), layout='split' | 'flat') -> root.

    'split' writes root/train/<cls>/ and root/val/<cls>/ (per_class images in each); 'flat' writes root/<cls>/.
    """
    def make(root: Path, classes: list[str], per_class: int, size: tuple[int, int] = (32, 32),
             layout: str = 'split') -> Path:
        rng = np.random.default_rng(0)
        parents = {'split': [root / 'train', root / 'val'], 'flat': [root]}[layout]
        for parent in parents:
            for name in classes:
                _write_images(parent / name, per_class, size, rng)
        return root

    return make


# Learnable tiny data and a shared tiny backbone, for the end-to-end tests of the training stages.

LEARNABLE_COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]


def write_learnable_folder(root: Path, num_classes: int = 3, train_per_class: int = 8, val_per_class: int = 4,
                           size: int = 32, noise: float = 12.0, seed: int = 0) -> Path:
    """root/train/class{c}/ and root/val/class{c}/: class c is a solid colour plus a little noise, so a
    tiny GFNet learns it in a few epochs."""
    rng = np.random.default_rng(seed)
    for split, count in (('train', train_per_class), ('val', val_per_class)):
        for c in range(num_classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array(LEARNABLE_COLOURS[c], dtype=np.float64)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f'{i:03d}.png')
    return root


@pytest.fixture
def make_learnable_folder() -> Callable[..., Path]:
    """Factory: make_learnable_folder(root, num_classes=3, train_per_class=8, val_per_class=4) -> root."""
    return write_learnable_folder


def tiny_entry(root: Path, num_classes: int = 3) -> dict:
    """The DATASET_CONFIG entry of the learnable data set at root."""
    return {'num_classes': num_classes, 'default_input_size': 32, 'train_folder': 'train', 'val_folder': 'val',
            'use_random_split': False, 'default_data_path': str(root)}


# The CLI flags every end-to-end test shares: the smallest GFNet at 32 px, one process, batch 8.
TINY_FLAGS = ['--data-set', 'TINY', '--arch', 'GFNet-ti-dynn', '--patch-size', '8', '--num_workers', '0',
              '--batch', '8', '--device', 'cpu']


@pytest.fixture(scope='session')
def tiny_backbone(tmp_path_factory) -> SimpleNamespace:
    """Learnable 3-class data (8 train + 4 val images per class) and a GFNet-ti backbone trained on it for
    4 epochs by `main_dynn.main`, once per session. Fields: data, output_dir, checkpoint, rc, stdout."""
    import dataset_config
    from main_dynn import main

    data = write_learnable_folder(tmp_path_factory.mktemp('learnable') / 'tiny')
    output_dir = tmp_path_factory.mktemp('backbone_run')
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        patch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(data))
        rc = main(['--stage', 'backbone', *TINY_FLAGS, '--num_epoch', '4', *SMALL_DATA_BACKBONE, '--warmup-epochs', '0',
                   '--output-dir', str(output_dir)])
    checkpoint = output_dir / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'best.pth'
    return SimpleNamespace(data=data, output_dir=output_dir, checkpoint=checkpoint, rc=rc, stdout=stdout.getvalue())


@pytest.fixture
def tiny_data(tiny_backbone, monkeypatch) -> Path:
    """Register data set TINY (the learnable data of `tiny_backbone`) for this test."""
    import dataset_config
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(tiny_backbone.data))
    return tiny_backbone.data


# The smallest CLI runs (16 px, one epoch of a few batches) and the user-mistake contract they are checked with.
FAST_FLAGS = [*TINY_FLAGS, '--input-size', '16', '--num_epoch', '1', '--barely_train']


@pytest.fixture
def small_data(tmp_path, monkeypatch) -> Path:
    """A fresh learnable TINY data set per test (3 classes, 4 train + 2 val images each, 16 px): tests may
    break it."""
    import dataset_config
    root = write_learnable_folder(tmp_path / 'data', train_per_class=4, val_per_class=2, size=16)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', tiny_entry(root))
    return root


def train_calibrated_dynn(out: Path) -> Path:
    """Stage 0 with a quarter of the training images held out for calibration, then a 2-epoch dynn stage (exits
    after blocks 3 and 7), both on the TINY data of `small_data`, under `out`; the dynn best.pth."""
    from main_dynn import main
    common = [*FAST_FLAGS, '--output-dir', str(out)]
    assert main(['--stage', 'backbone', *common, '--calib-ratio', '0.25']) == 0
    backbone = out / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'best.pth'
    assert main([*common, '--checkpoint-path', str(backbone), '--num_epoch', '2', '--max_warmup_epoch', '1',
                 '--exit-positions', '3', '7']) == 0
    return out / 'checkpoint' / 'checkpoint_TINY_0.75_confEE' / 'best.pth'


def resume_one_epoch_longer(last: Path, capsys) -> tuple[dict, dict]:
    """Make a finished 2-epoch dynn run's last.pth look like a 3-epoch run stopped after its second epoch, resume
    it, and check the resumed run trains joint epoch 2 only: (the checkpoint before, the one the resume wrote)."""
    from main_dynn import main
    saved = torch.load(last, map_location='cpu', weights_only=True)
    saved['args']['num_epoch'] = 3
    torch.save(saved, last)
    capsys.readouterr()
    assert main(['--resume', str(last)]) == 0
    assert 'joint epoch 2 |' in capsys.readouterr().out
    resumed = torch.load(last, map_location='cpu', weights_only=True)
    assert resumed['epoch'] == 2
    return saved, resumed


def one_error(capsys, argv: list[str], entry_point: Callable[[list[str]], int] | None = None) -> str:
    """entry_point(argv) (main_dynn.main by default) must fail as a user mistake: exit 2 and exactly one
    `error:` line, no traceback. Returns that line."""
    if entry_point is None:
        from main_dynn import main as entry_point
    rc = entry_point(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and 'Traceback' not in err, err
    return errors[0]


def folder_checksums(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (hidden ones included): compare before and after a
    command to see that it created, changed or removed nothing."""
    import hashlib
    return {path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob('*')) if path.is_file()}


@torch.no_grad()
def halve_at_each_exit(model, images: torch.Tensor):
    """Confident, varied exit heads, and gates that send half of the samples still inside out at each exit at
    threshold 0.5: gate k = 50 * (max prob_k - median among those left), so no sample sits on the threshold
    (an even batch: the median is a midpoint). Logits are computed in eval mode; the model's mode is kept."""
    was_training = model.training
    for head in model.intermediate_heads:
        head.weight.normal_()
    logits = model.eval().forward_exits(images).logits
    inside = torch.ones(images.shape[0], dtype=torch.bool)
    for k, gate in enumerate(model.gates):
        max_prob = logits[k].softmax(dim=-1).amax(dim=-1)
        median = torch.quantile(max_prob[inside], 0.5)
        gate.linear.weight.copy_(torch.tensor([[50.0, 0.0, 0.0, 0.0]]))
        gate.linear.bias.fill_(-50.0 * median)
        inside &= max_prob < median
    return model.train(was_training)


@pytest.fixture
def dynn_best(small_data, tmp_path) -> Path:
    """An untrained 3-class GFNet-Dynn (16 px, patch 8, exits 3 7) saved as the dynn stage saves best.pth."""
    from learning_helpers.checkpoint import save_checkpoint
    from models.model_factory import build_dynn
    torch.manual_seed(0)
    model = build_dynn('GFNet-ti-dynn', 3, 16, 8, 0.0, [3, 7], 'unc')
    args = {'arch': 'GFNet-ti-dynn', 'patch_size': 8, 'input_size': 16, 'exit_positions': [3, 7], 'gate': 'unc',
            'data_set': 'TINY', 'ce_ic_tradeoff': 0.75, 'num_epoch': 2, 'batch': 8,
            'class_names': ['class0', 'class1', 'class2']}
    return save_checkpoint(tmp_path / 'run' / 'best.pth', {'model': model.state_dict(), 'stage': 'joint',
                                                           'epoch': 1, 'acc': 50.0, 'best_acc': 50.0, 'args': args})
