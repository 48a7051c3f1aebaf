"""The DEMO generator: deterministic, complete, and never leaves half a data set behind."""
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline import demo_data
from data_pipeline.demo_data import (CLASSES, GENERATORS, MARKER, ensure_demo_dataset, ensure_digits_dataset,
                                     render_scene)
from dataset_config import DATASET_CONFIG
from errors import GFNetDynnError

SMALL = {'train_per_class': 2, 'val_per_class': 1, 'image_size': 32}


def _digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob('*') if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_generation_is_byte_identical_across_runs(tmp_path):
    first = ensure_demo_dataset(tmp_path / 'a', **SMALL)
    second = ensure_demo_dataset(tmp_path / 'b', **SMALL)
    assert _digest(first) == _digest(second)


def test_seed_changes_the_images(tmp_path):
    assert _digest(ensure_demo_dataset(tmp_path / 'a', **SMALL)) != \
        _digest(ensure_demo_dataset(tmp_path / 'b', **SMALL, seed=1))


def test_every_class_is_written_with_the_requested_counts_and_size(tmp_path):
    root = ensure_demo_dataset(tmp_path / 'demo', **SMALL)
    assert len(CLASSES) == DATASET_CONFIG['DEMO']['num_classes']
    for split, count in (('train', 2), ('val', 1)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(CLASSES)
        files = sorted((root / split).glob('*/*.png'))
        assert len(files) == count * len(CLASSES)
        with Image.open(files[0]) as img:
            assert (img.size, img.mode) == ((32, 32), 'RGB')


def test_images_within_a_class_differ():
    scenes = [render_scene(0, 32, np.random.default_rng(i)) for i in range(4)]
    assert len({s.tobytes() for s in scenes}) == 4
    assert all(s.shape == (32, 32, 3) and s.dtype == np.uint8 for s in scenes)


def test_interrupted_generation_leaves_no_partial_dataset(tmp_path, monkeypatch):
    write_split = demo_data._write_split

    def fail_on_val(folder, split_id, *args):
        if split_id == 1:
            raise KeyboardInterrupt
        write_split(folder, split_id, *args)

    monkeypatch.setattr(demo_data, '_write_split', fail_on_val)
    with pytest.raises(KeyboardInterrupt):
        ensure_demo_dataset(tmp_path / 'demo', **SMALL)
    assert list(tmp_path.iterdir()) == []  # neither the root nor the hidden temporary folder


def test_root_without_marker_is_regenerated(tmp_path):
    root = ensure_demo_dataset(tmp_path / 'demo', **SMALL)
    digest = _digest(root)
    (root / MARKER).unlink()
    next((root / 'train').glob('*/*.png')).unlink()
    ensure_demo_dataset(root, **SMALL)
    assert _digest(root) == digest


def test_complete_root_is_reused_without_writing(tmp_path, monkeypatch):
    root = ensure_demo_dataset(tmp_path / 'demo', **SMALL)
    monkeypatch.setattr(demo_data, '_write_split', lambda *args: pytest.fail('regenerated a complete data set'))
    assert ensure_demo_dataset(root, **SMALL) == root


def test_changed_parameters_regenerate(tmp_path):
    root = ensure_demo_dataset(tmp_path / 'demo', **SMALL)
    ensure_demo_dataset(root, **{**SMALL, 'train_per_class': 3})
    assert len(list((root / 'train').glob('*/*.png'))) == 3 * len(CLASSES)


def test_foreign_folder_is_never_deleted(tmp_path):
    root = tmp_path / 'mine'
    root.mkdir()
    (root / 'thesis.tex').write_text('precious')
    with pytest.raises(GFNetDynnError, match='mine'):
        ensure_demo_dataset(root, **SMALL)
    assert (root / 'thesis.tex').read_text() == 'precious'


@pytest.mark.process
def test_module_entry_point_prints_where_it_wrote(tmp_path):
    done = subprocess.run([sys.executable, '-m', 'data_pipeline.demo_data', str(tmp_path / 'cli')],
                          capture_output=True, text=True, check=True, cwd=Path(demo_data.__file__).parents[1])
    assert str((tmp_path / 'cli').resolve()) in done.stdout
    assert (tmp_path / 'cli' / MARKER).is_file()


def test_digits_are_written_as_ten_class_folders_split_75_25_per_class(tmp_path):
    from sklearn.datasets import load_digits
    per_class = np.bincount(load_digits().target)  # 1797 images, about 180 a class
    root = ensure_digits_dataset(tmp_path / 'digits', image_size=16)
    assert GENERATORS['DIGITS'] is ensure_digits_dataset and DATASET_CONFIG['DIGITS']['num_classes'] == 10
    for split in ('train', 'val'):
        assert sorted(p.name for p in (root / split).iterdir()) == [str(d) for d in range(10)]
    train = [len(list((root / 'train' / str(d)).glob('*.png'))) for d in range(10)]
    val = [len(list((root / 'val' / str(d)).glob('*.png'))) for d in range(10)]
    assert train == [round(0.75 * n) for n in per_class] and [t + v for t, v in zip(train, val)] == list(per_class)
    train_names = {p.name for p in (root / 'train').glob('*/*.png')}
    assert sum(train) + sum(val) == 1797 and not train_names & {p.name for p in (root / 'val').glob('*/*.png')}
    with Image.open(next((root / 'val' / '3').glob('*.png'))) as img:
        assert (img.size, img.mode) == ((16, 16), 'RGB')
    assert _digest(ensure_digits_dataset(tmp_path / 'again', image_size=16)) == _digest(root)  # fixed split
