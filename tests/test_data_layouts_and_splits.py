"""Data sets as users download them: the layouts found, stratified and recorded splits reused by every stage,
published split files, junk files, augmentation settings, and --eval reading only validation images."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import RandAugment
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms

import dataset_config
from conftest import one_error
from data_loader_help import SplitRequest, build_datasets
from data_pipeline.data_splits import stratified_split
from data_pipeline.data_transforms import REFERENCE_AUGMENT
from errors import GFNetDynnError
from main_dynn import main

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def write_class_folders(root: Path, per_class: int = 10, sizes=(32,), seed: int = 0) -> Path:
    """root/class{c}/NNN.png, learnable colours with noise; image sides cycle through `sizes`."""
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(COLOURS):
        folder = root / f'class{c}'
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            side = sizes[i % len(sizes)]
            pixels = np.clip(np.array(colour) + rng.normal(0, 12, (side, side, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f'{i:03d}.png')
    return root


def raw_entry(root: Path, **overrides) -> dict:
    """A fixed-split entry (train/ and val/ named) whose data is a raw one-folder download."""
    return {'num_classes': 3, 'default_input_size': 32, 'train_folder': 'train', 'val_folder': 'val',
            'use_random_split': False, 'default_data_path': str(root), **overrides}


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    root = write_class_folders(tmp_path / 'RAW', per_class=10)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'RAW', raw_entry(root))
    return root


def _names(subset) -> set[str]:
    return {Path(subset.dataset.samples[i][0]).relative_to(subset.dataset.root).as_posix() for i in subset.indices}


# --- layouts -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('wrapper', ['', 'UCMerced_LandUse/Images', 'NWPU-RESISC45', 'PatternNet/images',
                                     'my_download/extracted'])
def test_a_download_root_is_found_whatever_its_wrapper_folders(wrapper, tmp_path, monkeypatch, caplog):
    root = tmp_path / 'download'
    write_class_folders(root / wrapper if wrapper else root)
    (root / 'UCMerced_LandUse.zip').write_bytes(b'the archive torchgeo leaves beside its folder')
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'RAW', raw_entry(root))
    with caplog.at_level(logging.INFO):
        train, val, classes, split, _ = build_datasets('RAW', root, 32)
    assert classes == ['class0', 'class1', 'class2'] and len(train) + len(val) == 30
    assert split['method'] == 'stratified' and 'data layout: one folder of class folders' in caplog.text


def test_train_and_val_folders_are_used_as_they_are(tmp_path, monkeypatch, caplog):
    root = tmp_path / 'split'
    write_class_folders(root / 'train', per_class=6)
    write_class_folders(root / 'val', per_class=2, seed=1)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'RAW', raw_entry(root))
    with caplog.at_level(logging.INFO):
        train, val, _, split, _ = build_datasets('RAW', root, 32)
    assert (len(train), len(val), split['method']) == (18, 6, 'folders')
    assert 'data layout: train/val folders' in caplog.text


# --- stratified splits ---------------------------------------------------------------------------------------------

def test_stratified_split_takes_the_ratio_of_every_class():
    targets = [0] * 10 + [1] * 5 + [2] * 20
    train, val = stratified_split(targets, 0.2, seed=42)
    counts = [sum(targets[i] == c for i in train) for c in range(3)]
    assert counts == [2, 1, 4]  # round(0.2 x 10), 0.2 x 5 (at least one), 0.2 x 20
    assert sorted(train + val) == list(range(35)) and not set(train) & set(val)
    assert stratified_split(targets, 0.2, seed=42) == (train, val)
    assert stratified_split(targets, 0.2, seed=43)[0] != train


def test_the_reference_random_split_is_torchs_random_split_with_int_of_ratio_times_n():
    from data_pipeline.data_splits import reference_random_split
    expected = torch.utils.data.random_split(range(37), [int(0.8 * 37), 37 - int(0.8 * 37)],
                                             generator=torch.Generator().manual_seed(42))
    train, val = reference_random_split(37, 0.8, 42)
    assert (train, val) == (list(expected[0]), list(expected[1]))


def test_a_split_file_of_torchgeo_names_the_images(raw, tmp_path):
    names = sorted(p.name for p in raw.rglob('*.png'))
    assert len(set(names)) < len(names)  # 000.png in every class: bare names are not unique here
    (tmp_path / 'raw-train.txt').write_text('\n'.join(f'class{c}/{i:03d}.png' for c in range(3) for i in range(7)))
    (tmp_path / 'raw-test.txt').write_text('\n'.join(f'class{c}/{i:03d}.png' for c in range(3) for i in range(7, 10)))
    train, val, _, split, _ = build_datasets('RAW', raw, 32, split=SplitRequest(file=str(tmp_path / 'raw-train.txt')))
    assert (len(train), len(val), split['method']) == (21, 9, 'file')
    assert 'class1/008.png' in _names(val)


def test_a_split_file_naming_missing_images_is_one_clear_error(raw, tmp_path):
    (tmp_path / 'raw-train.txt').write_text('class0/999.png\n')
    (tmp_path / 'raw-val.txt').write_text('class0/000.png\n')
    with pytest.raises(GFNetDynnError, match=r'names 1 image\(s\) not found .* e\.g\. class0/999\.png'):
        build_datasets('RAW', raw, 32, split=SplitRequest(file=str(tmp_path / 'raw-train.txt')))


def _write_split(folder: Path, train: list[str], val: list[str]) -> Path:
    (folder / 'raw-train.txt').write_text('\n'.join(train))
    (folder / 'raw-val.txt').write_text('\n'.join(val))
    return folder / 'raw-train.txt'


ALL_TRAIN = [f'class{c}/{i:03d}.png' for c in range(3) for i in range(7)]
ALL_VAL = [f'class{c}/{i:03d}.png' for c in range(3) for i in range(7, 10)]


@pytest.mark.parametrize('train, val, message', [
    ([n for n in ALL_TRAIN if not n.startswith('class1')], ALL_VAL,
     r'gives class class1 no training images; every class needs training and validation images'),
    (ALL_TRAIN, [n for n in ALL_VAL if not n.startswith('class2')], r'gives class class2 no validation images'),
    (ALL_TRAIN + ['class0/003.png'], ALL_VAL, r'names class0/003\.png twice in its training part'),
    (ALL_TRAIN, ALL_VAL + ['class2/001.png'], r'puts 1 image\(s\) in both training and validation, e\.g\. '
                                              r'class2/001\.png'),
])
def test_a_split_file_with_a_class_missing_or_an_image_twice_names_the_first_offender(raw, tmp_path, train, val,
                                                                                     message):
    with pytest.raises(GFNetDynnError, match=message):
        build_datasets('RAW', raw, 32, split=SplitRequest(file=str(_write_split(tmp_path, train, val))))


def test_a_bad_split_file_is_refused_by_the_cli_and_nothing_written(raw, tmp_path, capsys):
    from conftest import folder_checksums
    split = _write_split(tmp_path, ALL_TRAIN + ['class0/003.png'], ALL_VAL)
    before = folder_checksums(tmp_path)
    line = one_error(capsys, ['--stage', 'backbone', *RUN_FLAGS, '--num_epoch', '1', '--split-file', str(split),
                              '--output-dir', str(tmp_path / 'out')])
    assert 'names class0/003.png twice' in line
    assert folder_checksums(tmp_path) == before


def test_a_split_file_with_no_validation_images_names_the_file_not_the_ratio(raw, tmp_path):
    with pytest.raises(GFNetDynnError, match=r'^--split-file .*raw-train\.txt gives class class0 no validation images '
                                             r'\(3 classes lack them\)'):
        build_datasets('RAW', raw, 32, split=SplitRequest(file=str(_write_split(tmp_path, ALL_TRAIN, []))))


# --- the split belongs to the run --------------------------------------------------------------------------------

RUN_FLAGS = ['--data-set', 'RAW', '--arch', 'GFNet-ti-dynn', '--patch-size', '8', '--num_workers', '0',
             '--batch', '6', '--device', 'cpu']


@pytest.mark.slow
def test_three_stages_on_a_one_folder_download_never_validate_on_training_images(raw, tmp_path, capsys):
    """Backbone with --train-ratio 0.7 and --split-seed 5; exits and --eval given no split flag reuse that
    split through the checkpoints; a conflicting --split-seed later is refused."""
    out = tmp_path / 'out'
    assert main(['--stage', 'backbone', *RUN_FLAGS, '--num_epoch', '1', '--train-ratio', '0.7', '--split-seed', '5',
                 '--output-dir', str(out)]) == 0
    backbone = out / 'checkpoint' / 'backbone_RAW_GFNet-ti-dynn' / 'best.pth'
    recorded = torch.load(backbone, weights_only=True)['args']['split']
    split_file = json.loads(Path(recorded['file']).read_text())
    assert (recorded['train_ratio'], recorded['seed'], recorded['method']) == (0.7, 5, 'stratified')
    assert Path(recorded['file']) == (out / 'splits' / 'RAW_r0.7_s5.json').resolve()
    assert len(split_file['train']) == 21 and not set(split_file['train']) & set(split_file['val'])

    assert main([*RUN_FLAGS, '--checkpoint-path', str(backbone), '--num_epoch', '2', '--max_warmup_epoch', '1',
                 '--exit-positions', '3', '7', '--output-dir', str(out)]) == 0
    best = out / 'checkpoint' / 'checkpoint_RAW_0.75_confEE' / 'best.pth'
    assert torch.load(best, weights_only=True)['args']['split']['hash'] == recorded['hash']

    results_json = tmp_path / 'results.json'
    assert main([*RUN_FLAGS, '--eval', '--checkpoint-path', str(best), '--results-json', str(results_json)]) == 0
    evaluated = json.loads(results_json.read_text())
    assert evaluated['split']['hash'] == recorded['hash'] and evaluated['num_val'] == len(split_file['val'])
    capsys.readouterr()
    line = one_error(capsys, [*RUN_FLAGS, '--eval', '--checkpoint-path', str(best), '--split-seed', '6',
                              '--results-json', str(tmp_path / 'other.json')])
    assert '--split-seed 6 differs from the split the checkpoint was trained on (--split-seed 5)' in line


def test_split_flags_on_train_val_folders_are_refused(tmp_path, monkeypatch, capsys):
    root = tmp_path / 'split'
    write_class_folders(root / 'train', per_class=6)
    write_class_folders(root / 'val', per_class=2, seed=1)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'RAW', raw_entry(root))
    line = one_error(capsys, ['--stage', 'backbone', *RUN_FLAGS, '--train-ratio', '0.5', '--barely_train',
                              '--output-dir', str(tmp_path / 'o')])
    assert '--train-ratio has no effect' in line and 'train/ and val/ folders' in line


@pytest.mark.slow
def test_eval_reads_only_the_validation_folder(tmp_path, monkeypatch, capsys):
    """A released checkpoint evaluated where only val/ exists: no training folder, no training loader."""
    root = tmp_path / 'split'
    write_class_folders(root / 'train', per_class=6)
    write_class_folders(root / 'val', per_class=2, seed=1)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'RAW', raw_entry(root))
    out = tmp_path / 'out'
    assert main([*RUN_FLAGS, '--num_epoch', '2', '--max_warmup_epoch', '1', '--exit-positions', '3', '7',
                 '--output-dir', str(out)]) == 0
    for image in (root / 'train').rglob('*.png'):
        image.unlink()
    (root / 'train').rename(tmp_path / 'gone')
    best = out / 'checkpoint' / 'checkpoint_RAW_0.75_confEE' / 'best.pth'
    assert main([*RUN_FLAGS, '--batch', '64', '--eval', '--checkpoint-path', str(best), '--results-json',
                 str(tmp_path / 'r.json')]) == 0
    assert json.loads((tmp_path / 'r.json').read_text())['num_val'] == 6


# --- what real downloads carry -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mixed_sizes_and_junk_files_train(tmp_path, monkeypatch, capsys):
    root = write_class_folders(tmp_path / 'RAW', per_class=8, sizes=(247, 256, 251))
    for junk in ('Thumbs.db', 'desktop.ini', '.DS_Store', '._000.png'):
        (root / 'class0' / junk).write_bytes(b'not an image')
    (root / 'class1' / '.thumbnails').mkdir()
    (root / 'class1' / '.thumbnails' / 'x.png').write_bytes(b'hidden')
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'RAW', raw_entry(root, default_input_size=64))
    rc = main(['--stage', 'backbone', *RUN_FLAGS, '--input-size', '64', '--num_epoch', '1',
               '--output-dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if 'that are not images' in line]
    assert len(warnings) == 1 and 'skipped 5 entries' in warnings[0]  # one warning, counting all of them


# --- augmentation settings -----------------------------------------------------------------------------------------

def _train_transform(tmp_path, monkeypatch, argv_extra: list[str], train_augment: dict | None):
    """The training transform a run with these flags and this entry would build (its first training sample's)."""
    from jobs import run_setup
    root = write_class_folders(tmp_path / 'AUG', per_class=4)
    entry = raw_entry(root, **({'train_augment': train_augment} if train_augment else {}))
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'RAW', entry)
    from main_dynn import get_args_parser
    args = get_args_parser().parse_args(['--data-set', 'RAW', '--batch', '4', '--num_workers', '0', *argv_extra])
    data = run_setup.build_data(args, 32, distributed=False)
    return data.train_loader.dataset.dataset.dataset.transform  # SeededAugmentation -> Subset -> SceneFolder


def _settings(transform) -> dict:
    steps = transform.transforms
    crop = next(t for t in steps if isinstance(t, RandomResizedCropAndInterpolation))
    flips = {type(t).__name__: t.p for t in steps if isinstance(t, (transforms.RandomHorizontalFlip,
                                                                   transforms.RandomVerticalFlip))}
    return {'scale': tuple(round(v, 4) for v in crop.scale), 'hflip': flips.get('RandomHorizontalFlip', 0.0),
            'vflip': flips.get('RandomVerticalFlip', 0.0), 'aa': any(isinstance(t, RandAugment) for t in steps)}


def test_the_reference_recipe_is_the_default_augmentation(tmp_path, monkeypatch):
    settings = _settings(_train_transform(tmp_path, monkeypatch, [], None))
    assert settings == {'scale': REFERENCE_AUGMENT['scale'], 'hflip': 0.5, 'vflip': 0.0, 'aa': True}


def test_an_entrys_train_augment_sets_the_defaults(tmp_path, monkeypatch):
    entry = {'hflip': 0.0, 'vflip': 0.5, 'scale': [0.5, 1.0], 'aa': 'none'}
    settings = _settings(_train_transform(tmp_path, monkeypatch, [], entry))
    assert settings == {'scale': (0.5, 1.0), 'hflip': 0.0, 'vflip': 0.5, 'aa': False}


def test_flags_win_over_the_entry(tmp_path, monkeypatch):
    entry = {'hflip': 0.0, 'vflip': 0.5, 'scale': [0.5, 1.0], 'aa': 'none'}
    flags = ['--hflip', '0.25', '--vflip', '0', '--scale', '0.3', '0.9', '--aa', 'rand-m5-mstd0.5-inc1']
    settings = _settings(_train_transform(tmp_path, monkeypatch, flags, entry))
    assert settings == {'scale': (0.3, 0.9), 'hflip': 0.25, 'vflip': 0.0, 'aa': True}


def test_no_aug_trains_on_the_evaluation_crop(tmp_path, monkeypatch):
    steps = _train_transform(tmp_path, monkeypatch, ['--no-aug'], None).transforms
    assert not any(isinstance(t, (RandAugment, RandomResizedCropAndInterpolation, transforms.RandomHorizontalFlip))
                   for t in steps)


def test_a_bad_train_augment_entry_is_named(tmp_path, monkeypatch, capsys):
    root = write_class_folders(tmp_path / 'AUG', per_class=4)
    monkeypatch.setitem(dataset_config.DATASET_CONFIG, 'RAW', raw_entry(root, train_augment={'vflip': 2}))
    line = one_error(capsys, ['--stage', 'backbone', *RUN_FLAGS, '--barely_train', '--output-dir', str(tmp_path)])
    assert "entry 'RAW': train_augment: vflip is 2; it must be a probability in [0, 1]" in line


# --- multi-seed protocol runs --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_protocol_runs_every_seed_and_reports_mean_and_std(raw, tmp_path, capsys):
    from benchmarks.protocol import main as protocol
    out = tmp_path / 'protocol'
    argv = ['--data-set', 'RAW', '--seeds', '0', '1', '--train-ratio', '0.7', '--arch', 'GFNet-ti-dynn',
            '--backbone-flags', '--num_epoch 1',
            '--dynn-flags', '--num_epoch 2 --max_warmup_epoch 1 --exit-positions 3 7',
            '--output-dir', str(out), '--patch-size', '8', '--batch', '6', '--num_workers', '0', '--device', 'cpu']
    assert protocol(argv) == 0, capsys.readouterr().err
    report = json.loads((out / 'protocol_RAW_r0.7.json').read_text())
    runs = report['runs']
    assert [run['seed'] for run in runs] == [0, 1] and runs[0]['split_hash'] != runs[1]['split_hash']
    accuracies = [run['full_accuracy'] for run in runs]
    assert report['summary']['full_accuracy']['mean'] == pytest.approx(sum(accuracies) / 2)
    assert report['summary']['full_accuracy']['std'] == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2 ** 0.5)
    table = (out / 'protocol_RAW_r0.7.md').read_text()
    assert 'mean ± std' in table and 'FLOPs saved (%)' in table
    capsys.readouterr()
    assert protocol(argv) == 0  # run again: every stage is reused, the table is the same
    assert capsys.readouterr().out.count('already trained') == 4
    assert json.loads((out / 'protocol_RAW_r0.7.json').read_text())['summary'] == report['summary']
