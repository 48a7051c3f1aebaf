"""A short run's numbers, pinned: stage 0, the dynn stage and --eval on fixed tiny data must give these exact
checkpoint tensors and results.json values, so that a change meant to move code moves no number.

A change that means to alter training (a new default, another optimizer) re-records the pins:
`.venv/bin/python tests/test_jobs_pinned_run.py` prints them.
"""
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

# sha256 of each best.pth's model tensors and of results.json without its timings and paths; the accuracies
PINNED = {
    'backbone': 'e527cfa2f3ca5ba4fc963709a823367fc5039adb804027725ac76b2f38ccf5a0',
    'dynn': '35a37b7699aec16420f38daa1b75c1508b08f9e5d0b4d7abfe0b70d885f0c49f',
    'results': 'd6a1a76bf1f759dd1e193bb05c778c45f65b5893e90270c086ba4441da2b1b16',
    'per_exit_accuracy': [100.0, 33.33333333333333, 100.0],
}
UNSTABLE = ('_ms', 'latency', 'timing', 'checkpoint', 'file')  # keys holding timings of this machine or tmp paths


def state_digest(path: Path) -> str:
    """sha256 over a checkpoint's model tensors in key order: equal digests mean bit-identical weights."""
    state = torch.load(path, map_location='cpu', weights_only=True)['model']
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def pinned_run(out: Path) -> dict:
    """Train the calibrated tiny run under `out`, evaluate it, return the values PINNED holds."""
    from conftest import TINY_FLAGS, train_calibrated_dynn
    from main_dynn import main
    best = train_calibrated_dynn(out)
    results_path = out / 'results.json'
    assert main([*TINY_FLAGS, '--barely_train', '--eval', '--checkpoint-path', str(best), '--results-json', str(results_path)]) == 0
    results = json.loads(results_path.read_text())
    backbone = out / 'checkpoint' / 'backbone_TINY_GFNet-ti-dynn' / 'best.pth'
    stable = json.dumps(without_unstable(results), sort_keys=True).encode()
    return {'backbone': state_digest(backbone), 'dynn': state_digest(best),
            'results': hashlib.sha256(stable).hexdigest(), 'per_exit_accuracy': results['per_exit_accuracy']}


def without_unstable(value):
    """results.json with every key that names a timing or a path dropped, at any depth."""
    if isinstance(value, dict):
        return {k: without_unstable(v) for k, v in value.items() if not any(word in k for word in UNSTABLE)}
    if isinstance(value, list):
        return [without_unstable(v) for v in value]
    return value


@pytest.mark.slow
def test_a_short_run_gives_the_pinned_checkpoints_and_results(small_data, tmp_path):
    assert pinned_run(tmp_path / 'run') == PINNED


if __name__ == '__main__':  # re-record: print the values of this code
    import tempfile
    import dataset_config
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import tiny_entry, write_learnable_folder
    with tempfile.TemporaryDirectory() as tmp:
        root = write_learnable_folder(Path(tmp) / 'data', train_per_class=4, val_per_class=2, size=16)
        dataset_config.DATASET_CONFIG['TINY'] = tiny_entry(root)
        for name, value in pinned_run(Path(tmp) / 'run').items():
            print(f'    {name!r}: {value!r},')
