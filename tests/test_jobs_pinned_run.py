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
    'backbone': 'f4ec5d416e0f1da2cde9c413dbaf4b0e281b0fd34d8dae9fb8270e5dd924f6a3',
    'dynn': '2f6518fbc2da7c758036de8a7ceab5081c72008d460246d4ae854aac36d52c9b',
    'results': '8f0605e537811f8e5b7e06f0732373903a0e8c909aefb5867ca0f6ac9fc2a556',
    'per_exit_accuracy': [66.66666666666666, 33.33333333333333, 33.33333333333333],
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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # float sums split over threads round differently: the pins hold for one thread
    try:
        best = train_calibrated_dynn(out)
        results_path = out / 'results.json'
        assert main([*TINY_FLAGS, '--barely_train', '--eval', '--checkpoint-path', str(best),
                     '--results-json', str(results_path)]) == 0
    finally:
        torch.set_num_threads(threads)
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
    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]  # tests/, the repository
    import dataset_config
    from conftest import tiny_entry, write_learnable_folder
    with tempfile.TemporaryDirectory() as tmp:
        root = write_learnable_folder(Path(tmp) / 'data', train_per_class=4, val_per_class=2, size=16)
        dataset_config.DATASET_CONFIG['TINY'] = tiny_entry(root)
        for name, value in pinned_run(Path(tmp) / 'run').items():
            print(f'    {name!r}: {value!r},')
