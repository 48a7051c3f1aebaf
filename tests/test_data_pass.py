"""The data pass pinned on a tiny folder: which images each of training, validation and calibration holds, in
which order and with which label, for a stratified, a random and a train/val-folders layout."""
from pathlib import Path

import pytest
from PIL import Image

import dataset_config
from data_loader_help import SplitRequest, build_datasets, dataset_entry
from data_pipeline.data_pass import DataRequest, make_data_sets

CLASS_SIZES = {'a': 6, 'b': 5, 'c': 4}  # uneven, so per-class rounding and the random split both show


def _write(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new('RGB', (8, 8), (i * 20, 0, 0)).save(folder / f'{i:02d}.png')


@pytest.fixture
def folders(tmp_path, monkeypatch) -> Path:
    """tmp_path/flat/<class>/ and tmp_path/tv/{train,val}/<class>/, and the entries STRAT, RAND and TV."""
    for name, count in CLASS_SIZES.items():
        _write(tmp_path / 'flat' / name, count)
        _write(tmp_path / 'tv' / 'train' / name, count)
        _write(tmp_path / 'tv' / 'val' / name, 2)
    entry = {'num_classes': 3, 'default_input_size': 8, 'train_folder': '', 'val_folder': '',
             'use_random_split': False, 'default_data_path': None}
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'STRAT', entry)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'RAND', {**entry, 'use_random_split': True})
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'TV', {**entry, 'train_folder': 'train', 'val_folder': 'val'})
    return tmp_path


def _items(dataset, root: Path) -> list[tuple[str, int]] | None:
    """(path relative to root, label) of every image the data set yields, in its order."""
    if dataset is None:
        return None
    samples = (dataset.samples if hasattr(dataset, 'samples')
               else [dataset.dataset.samples[i] for i in dataset.indices])
    return [(Path(path).relative_to(root).as_posix(), label) for path, label in samples]


def _pass(folders: Path, data_set: str, where: str, split: SplitRequest) -> dict:
    data = build_datasets(data_set, folders / where, 8, split=split)
    parts = {part: _items(getattr(data, part), folders / where) for part in ('train', 'val', 'calib')}
    return {**parts, 'hashes': [data.split.get(key) for key in ('hash', 'val_hash', 'calib_hash')]}


STRATIFIED = SplitRequest(train_ratio=0.6, seed=3, calib_ratio=0.34)
STRATIFIED_PARTS = {  # per class round(0.6 n) to train, then round(0.66 of those) kept from calibration
    'train': [('a/01.png', 0), ('a/03.png', 0), ('a/04.png', 0), ('b/03.png', 1), ('b/04.png', 1), ('c/00.png', 2)],
    'val': [('a/00.png', 0), ('a/02.png', 0), ('b/00.png', 1), ('b/01.png', 1), ('c/01.png', 2), ('c/03.png', 2)],
    'calib': [('a/05.png', 0), ('b/02.png', 1), ('c/02.png', 2)]}


def test_a_stratified_split_with_calibration_holds_these_images_in_this_order(folders):
    got = _pass(folders, 'STRAT', 'flat', STRATIFIED)
    assert {part: got[part] for part in STRATIFIED_PARTS} == STRATIFIED_PARTS
    assert got['hashes'] == ['3477f420be74e2cd', '557bcf9ae79b0531', '6c8a45a897688180']


def test_the_random_split_keeps_its_permutation_order_through_the_calibration_hold_out(folders):
    got = _pass(folders, 'RAND', 'flat', SplitRequest(train_ratio=0.7, seed=5, calib_ratio=0.4))
    assert got['train'] == [('c/00.png', 2), ('c/02.png', 2), ('a/05.png', 0), ('b/01.png', 1), ('b/02.png', 1),
                            ('a/01.png', 0)]
    assert got['val'] == [('c/03.png', 2), ('b/03.png', 1), ('b/04.png', 1), ('a/02.png', 0), ('a/04.png', 0)]
    assert got['calib'] == [('a/00.png', 0), ('c/01.png', 2), ('a/03.png', 0), ('b/00.png', 1)]
    assert got['hashes'] == ['9ef9287f0857dec8', '82121538e89c5e1b', '3707fefa5329f6b3']


def test_train_and_val_folders_hold_out_calibration_from_train_only(folders):
    got = _pass(folders, 'TV', 'tv', SplitRequest(seed=7, calib_ratio=0.5))
    assert got['train'] == [('train/a/01.png', 0), ('train/a/02.png', 0), ('train/a/03.png', 0),
                            ('train/b/00.png', 1), ('train/b/04.png', 1), ('train/c/00.png', 2),
                            ('train/c/01.png', 2)]
    assert got['calib'] == [('train/a/00.png', 0), ('train/a/04.png', 0), ('train/a/05.png', 0),
                            ('train/b/01.png', 1), ('train/b/02.png', 1), ('train/b/03.png', 1),
                            ('train/c/02.png', 2), ('train/c/03.png', 2)]
    val = [(f'val/{name}/{i:02d}.png', label) for label, name in enumerate(CLASS_SIZES) for i in range(2)]
    assert got['val'] == val
    assert got['hashes'] == ['be00828325f11cef', '4a4bc9cac5d84474', 'b1a270455e8b7a8a']


def test_train_and_val_folders_without_calibration_are_read_whole_in_folder_order(folders):
    got = _pass(folders, 'TV', 'tv', SplitRequest())
    assert got['train'] == [(f'train/{name}/{i:02d}.png', label) for label, (name, count)
                            in enumerate(CLASS_SIZES.items()) for i in range(count)]
    assert got['val'] == [(f'val/{name}/{i:02d}.png', label) for label, name in enumerate(CLASS_SIZES)
                          for i in range(2)]
    assert got['calib'] is None
    assert got['hashes'] == ['be00828325f11cef', '4a4bc9cac5d84474', None]


def test_the_pass_reads_the_entry_it_is_handed_not_the_registry(folders, monkeypatch):
    entry = dataset_entry('STRAT')
    monkeypatch.delitem(dataset_config.DATASET_CONFIG, 'STRAT')
    data = make_data_sets(DataRequest('STRAT', entry, folders / 'flat', 8, STRATIFIED))
    assert {part: _items(getattr(data, part), folders / 'flat') for part in STRATIFIED_PARTS} == STRATIFIED_PARTS
