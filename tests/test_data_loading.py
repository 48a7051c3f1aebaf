"""Datasets and loaders from dataset_config.py: splits, transforms, messy folders and one-line errors."""
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from timm.data.auto_augment import RandAugment
from torch.utils.data import DistributedSampler, TensorDataset
from torchvision import transforms

import dataset_config
from data_pipeline import demo_data
from data_loader_help import ShardSampler, SplitRequest, build_datasets, build_loaders, resolve_data_path
from data_pipeline.data_transforms import build_transform
from errors import GFNetDynnError

CLASSES = ['cat_a', 'cat_b', 'cat_c']


def _entry(path: Path, **overrides) -> dict:
    """A tiny DATASET_CONFIG entry: 3 classes, 32 px, train/ and val/ under path."""
    return {'num_classes': 3, 'default_input_size': 32, 'train_folder': 'train', 'val_folder': 'val',
            'use_random_split': False, 'default_data_path': str(path), **overrides}


@pytest.fixture
def tiny(tmp_path, monkeypatch, make_image_folder) -> Path:
    """Register data set TINY: fixed split, 3 classes with 4 images each in train/ and val/."""
    root = make_image_folder(tmp_path / 'tiny', CLASSES, 4)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINY', _entry(root))
    return root


@pytest.fixture
def tiny_flat(tmp_path, monkeypatch, make_image_folder) -> Path:
    """Register data set TINYFLAT: random split over 3 classes with 10 images each."""
    root = make_image_folder(tmp_path / 'flat', CLASSES, 10, layout='flat')
    entry = _entry(root, train_folder='', val_folder='', use_random_split=True)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TINYFLAT', entry)
    return root


def _paths(subset) -> set[str]:
    """File paths a random-split Subset selects."""
    return {subset.dataset.samples[i][0] for i in subset.indices}


# resolve_data_path

def test_unknown_data_set_lists_the_choices():
    with pytest.raises(GFNetDynnError, match='NOPE.*UCM'):
        resolve_data_path('NOPE', None)


def test_default_path_comes_from_the_config(tiny):
    assert resolve_data_path('TINY', None) == tiny


def test_missing_data_path_is_named(tiny, tmp_path):
    with pytest.raises(GFNetDynnError, match=f'{tmp_path / "gone"} does not exist'):
        resolve_data_path('TINY', str(tmp_path / 'gone'))


def test_file_as_data_path_is_rejected(tiny, tmp_path):
    (tmp_path / 'file.txt').write_text('x')
    with pytest.raises(GFNetDynnError, match='file.txt is a file'):
        resolve_data_path('TINY', str(tmp_path / 'file.txt'))


def test_demo_is_generated_at_its_default_path_only(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(demo_data.GENERATORS, 'DEMO', lambda root: calls.append(root) or root.mkdir())
    monkeypatch.setitem(dataset_config.DATASET_CONFIG['DEMO'], 'default_data_path', str(tmp_path / 'demo'))
    assert resolve_data_path('DEMO', None) == tmp_path / 'demo'
    assert calls == [tmp_path / 'demo']
    with pytest.raises(GFNetDynnError, match=f'{tmp_path / "dmeo"} does not exist.*when --data-path is omitted'):
        resolve_data_path('DEMO', str(tmp_path / 'dmeo'))
    assert calls == [tmp_path / 'demo'] and not (tmp_path / 'dmeo').exists()


# fixed and random splits

def test_fixed_split_sizes_and_classes(tiny):
    train, val, classes, _, _ = build_datasets('TINY', tiny, 32)
    assert (len(train), len(val), classes) == (12, 12, CLASSES)
    assert train[0][0].shape == (3, 32, 32)


def test_fixed_split_uses_training_and_evaluation_transforms(tiny):
    train, val, _, _, _ = build_datasets('TINY', tiny, 32)
    assert any(isinstance(t, RandAugment) for t in train.transform.transforms)
    assert [type(t) for t in val.transform.transforms] == [
        transforms.Resize, transforms.CenterCrop, transforms.ToTensor, transforms.Normalize]


def test_random_split_sizes_are_disjoint_and_cover_the_folder(tiny_flat):
    train, val, classes, _, _ = build_datasets('TINYFLAT', tiny_flat, 32, split=SplitRequest(0.8))
    assert (len(train), len(val), classes) == (24, 6, CLASSES)
    assert not _paths(train) & _paths(val)
    assert len(_paths(train) | _paths(val)) == 30


def test_random_split_is_deterministic_by_seed(tiny_flat):
    first, _, _, _, _ = build_datasets('TINYFLAT', tiny_flat, 32, split=SplitRequest(seed=3))
    again, _, _, _, _ = build_datasets('TINYFLAT', tiny_flat, 32, split=SplitRequest(seed=3))
    other, _, _, _, _ = build_datasets('TINYFLAT', tiny_flat, 32, split=SplitRequest(seed=4))
    assert first.indices == again.indices
    assert first.indices != other.indices


def test_random_split_parts_get_their_own_transforms(tiny_flat):
    train, val, _, _, _ = build_datasets('TINYFLAT', tiny_flat, 32)
    assert train.dataset.samples is val.dataset.samples  # one scan, two views
    assert any(isinstance(t, RandAugment) for t in train.dataset.transform.transforms)
    assert isinstance(val.dataset.transform.transforms[0], transforms.Resize)
    assert val[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize('ratio', [0.0, 1.0, 1.5, -0.2])
def test_split_ratio_outside_zero_one_is_rejected(tiny_flat, ratio):
    with pytest.raises(GFNetDynnError, match=f'--train-ratio {ratio} must be between 0 and 1'):
        SplitRequest(train_ratio=ratio)


# folder mistakes

def test_missing_val_folder_is_named(tiny):
    (tiny / 'val').rename(tiny / 'validation')
    with pytest.raises(GFNetDynnError, match=f'no folder {tiny / "val"}.*train/ and val/'):
        build_datasets('TINY', tiny, 32)


def test_class_count_mismatch_names_the_config_and_the_folder(tiny, monkeypatch):
    monkeypatch.setitem(dataset_config.DATASET_CONFIG['TINY'], 'num_classes', 4)
    with pytest.raises(GFNetDynnError, match=f'TINY has 4 classes but {tiny / "train"} has 3'):
        build_datasets('TINY', tiny, 32)


def test_train_and_val_class_names_that_differ_are_named(tiny):
    (tiny / 'val' / 'cat_c').rename(tiny / 'val' / 'cat_z')
    with pytest.raises(GFNetDynnError, match='only in train: cat_c; only in val: cat_z'):
        build_datasets('TINY', tiny, 32)


def test_empty_class_folder_is_named(tiny):
    for image in (tiny / 'train' / 'cat_b').iterdir():
        image.unlink()
    with pytest.raises(GFNetDynnError, match=f'no images in {tiny / "train" / "cat_b"}'):
        build_datasets('TINY', tiny, 32)


@pytest.mark.parametrize('name, content', [('notes.txt', b'hello'), ('fake.png', b'not a png')])
def test_non_image_file_is_named_with_the_skip_hint(tiny, name, content):
    (tiny / 'train' / 'cat_a' / name).write_bytes(content)
    with pytest.raises(GFNetDynnError, match=f'{name}.*--skip-bad-images'):
        build_datasets('TINY', tiny, 32)


def _truncate(path: Path) -> None:
    """Cut an image file in half: the header still opens, decoding fails."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_truncated_png_is_found_by_the_scan_naming_the_file(tiny):
    bad = tiny / 'train' / 'cat_a' / '000.png'
    _truncate(bad)
    with pytest.raises(GFNetDynnError, match=f'{bad}.*--skip-bad-images'):
        build_datasets('TINY', tiny, 32)


def test_truncated_jpeg_fails_at_load_naming_the_file(tiny):
    """A JPEG's structure is not checked without --check-images: decoding finds it."""
    bad = tiny / 'train' / 'cat_a' / '000.jpg'
    Image.open(tiny / 'train' / 'cat_a' / '000.png').save(bad)
    (tiny / 'train' / 'cat_a' / '000.png').unlink()
    bad.write_bytes(bad.read_bytes()[:-len(bad.read_bytes()) // 4])
    train, _, _, _, _ = build_datasets('TINY', tiny, 32)
    with pytest.raises(GFNetDynnError, match=f'{bad}.*--skip-bad-images'):
        train[0]
    with pytest.raises(GFNetDynnError, match=f'{bad}.*--skip-bad-images'):
        build_datasets('TINY', tiny, 32, check_images=True)


def test_skip_bad_images_drops_a_truncated_file_with_a_warning(tiny, caplog):
    bad = tiny / 'train' / 'cat_a' / '000.png'
    _truncate(bad)
    with caplog.at_level(logging.WARNING):
        train, val, _, _, _ = build_datasets('TINY', tiny, 32, skip_bad_images=True)
    assert (len(train), len(val)) == (11, 12)
    assert str(bad) not in {path for path, _ in train.samples}
    assert str(bad) in caplog.text


def test_messy_folder_loads_as_rgb_tensors(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    variants = [('grau 1.tif', 'L', (40, 30)), ('Ähre 2.JPG', 'RGB', (64, 48)), ('c.jpeg', 'RGB', (20, 20)),
                ('rgba.png', 'RGBA', (33, 45)), ('palette.bmp', 'P', (50, 50)), ('w.webp', 'RGB', (28, 36))]
    for split in ('train', 'val'):
        for cls in ('forêt dense', 'plage'):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            (folder / '.DS_Store').write_bytes(b'\0\1')
            (folder / '.thumbs').mkdir()
            (folder / '.thumbs' / 'x.txt').write_text('ignored')
            for name, mode, (w, h) in variants:
                pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).convert(mode).save(folder / name)
    (tmp_path / '.complete').write_text('{}')
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'MESSY', _entry(tmp_path, num_classes=2))
    train, val, classes, _, _ = build_datasets('MESSY', tmp_path, 24)
    assert classes == ['forêt dense', 'plage']
    assert len(train) == len(val) == 12
    for i in range(len(val)):
        assert train[i][0].shape == val[i][0].shape == (3, 24, 24)


# transforms

def test_evaluation_transform_resizes_then_centre_crops():
    tf = build_transform(False, 32)
    assert tf.transforms[0].size == int(256 / 224 * 32)
    assert tf(Image.new('RGB', (80, 50))).shape == (3, 32, 32)


def test_training_transform_survives_the_strongest_posterize():
    tf = build_transform(True, 32)
    rand_augment = next(t for t in tf.transforms if isinstance(t, RandAugment))
    posterize = next(op for op in rand_augment.ops if op.name == 'PosterizeIncreasing')
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0  # asks timm for 0 bits
    assert posterize(Image.new('RGB', (8, 8), (200, 100, 50))).size == (8, 8)


# loaders

def _labels(n: int) -> TensorDataset:
    """n one-pixel samples labelled 0..n-1, so batches show their order."""
    return TensorDataset(torch.zeros(n, 1), torch.arange(n))


def test_loaders_drop_the_last_train_batch_and_use_1_5x_val_batches():
    train, val = build_loaders(_labels(10), _labels(10), batch_size=4, num_workers=0, seed=0)
    assert [len(y) for _, y in train] == [4, 4]
    assert [len(y) for _, y in val] == [6, 4]
    assert torch.cat([y for _, y in val]).tolist() == list(range(10))


def test_train_order_is_shuffled_and_seeded():
    def order(seed: int) -> list[int]:
        train, _ = build_loaders(_labels(32), _labels(4), batch_size=32, num_workers=0, seed=seed)
        return next(iter(train))[1].tolist()

    assert order(1) == order(1) != order(2)
    assert order(1) != list(range(32))


def test_batch_larger_than_the_training_set_is_rejected():
    with pytest.raises(GFNetDynnError, match='fewer than one batch of 16.*smaller --batch'):
        build_loaders(_labels(10), _labels(10), batch_size=16, num_workers=0, seed=0)


def test_distributed_loaders_use_distributed_samplers(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "pg"}', rank=0, world_size=1)
    try:
        train, val = build_loaders(_labels(10), _labels(10), batch_size=4, num_workers=0, seed=0, distributed=True)
    finally:
        dist.destroy_process_group()
    assert isinstance(train.sampler, DistributedSampler) and train.sampler.shuffle
    assert isinstance(val.sampler, ShardSampler) and list(val.sampler) == list(range(10))
    assert len(train) == 2 and val.batch_size == 6


def test_validation_shards_hold_every_image_once():
    shards = [list(ShardSampler(_labels(25), rank, 2)) for rank in range(2)]
    assert [len(shard) for shard in shards] == [13, 12]
    assert sorted(shards[0] + shards[1]) == list(range(25))
