"""Real early exit on an edge runtime: chain the ONNX segments written by `models/onnx_export.py`.

Needs only onnxruntime, numpy and Pillow (no torch), so on a board it runs as a script from the repository
root: `PYTHONPATH=. python models/onnx_runner.py DIR IMAGE ...` (`python -m models.onnx_runner` imports the
`models` package, and with it torch).
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from errors import GFNetDynnError, OneLineParser, exit_code
from image_io import DECODE_ERRORS, BandCountError, open_rgb

MANIFEST_NAME = 'manifest.json'
MANIFEST_FORMAT = 1
MANIFEST_KEYS = ('input_size', 'mean', 'std', 'threshold', 'exit_positions', 'class_names', 'segments')


def read_manifest(directory: str | Path) -> dict:
    """The export's manifest.json, checked for the keys the runner needs."""
    path = Path(directory) / MANIFEST_NAME
    if not Path(directory).is_dir():
        raise GFNetDynnError(f'{directory} is not a folder; pass the folder that export wrote (it holds '
                             f'{MANIFEST_NAME})')
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise GFNetDynnError(f'no {MANIFEST_NAME} in {directory}; pass the folder that export wrote') from None
    except (OSError, ValueError) as err:
        raise GFNetDynnError(f'cannot read {path} ({err}); export the model again') from None
    if not isinstance(manifest, dict) or manifest.get('format') != MANIFEST_FORMAT:
        raise GFNetDynnError(f'{path} is not a format-{MANIFEST_FORMAT} GFNet-Dynn manifest; export the model '
                             f'again with this version')
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise GFNetDynnError(f'{path} lacks {", ".join(missing)}; export the model again')
    _check_manifest_values(manifest, path)
    return manifest


def _check_manifest_values(manifest: dict, path: Path) -> None:
    """Every value the runner reads has the type and range it needs; the first that does not is named."""
    def numbers(value, count: int) -> bool:
        return (isinstance(value, list) and len(value) == count
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))

    positions = manifest['exit_positions']
    checks = {
        'input_size': isinstance(manifest['input_size'], int) and manifest['input_size'] > 0,
        'mean': numbers(manifest['mean'], 3),
        'std': numbers(manifest['std'], 3) and all(v > 0 for v in manifest['std']),
        'threshold': isinstance(manifest['threshold'], (int, float)) and 0 <= manifest['threshold'] <= 1,
        'exit_positions': isinstance(positions, list) and all(isinstance(p, int) for p in positions),
        'class_names': isinstance(manifest['class_names'], list) and len(manifest['class_names']) > 0
                       and all(isinstance(c, str) for c in manifest['class_names']),
        'segments': isinstance(manifest['segments'], list) and isinstance(positions, list)
                    and len(manifest['segments']) == len(positions) + 1
                    and all(isinstance(name, str) and '/' not in name for name in manifest['segments']),
    }
    for key, ok in checks.items():
        if not ok:
            raise GFNetDynnError(f'{path}: {key} is {manifest[key]!r}, not a value the runner can use; export the '
                                 f'model again')


class OnnxEarlyExit:
    """`EarlyExitEngine` on onnxruntime: a sample leaves at the first exit whose gate probability is
    >= threshold, else at the final head; each segment runs only for the samples still inside."""

    def __init__(self, directory: str | Path, threshold: float | None = None, num_threads: int = 0):
        self.manifest = read_manifest(directory)
        self.threshold = self.manifest['threshold'] if threshold is None else threshold
        self.input_size = int(self.manifest['input_size'])
        self.class_names = list(self.manifest['class_names'])
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads  # 0: onnxruntime's default (one per core)
        self.sessions = []
        for name in self.manifest['segments']:
            path = Path(directory) / name
            if not path.is_file():
                raise GFNetDynnError(f'{path} is missing; copy the whole export folder or export again')
            try:
                self.sessions.append(ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider']))
            except Exception as error:  # onnxruntime raises its own types for a damaged graph
                reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                raise GFNetDynnError(f'{path} is not a usable ONNX graph ({reason}); copy the export folder '
                                     f'again or export again') from None

    @property
    def num_exits(self) -> int:
        return len(self.sessions)

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, H, W) float32, normalised -> predicted class (B,) and exit index (B,), 0..E-1."""
        size = self.input_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise GFNetDynnError(f'images of shape {images.shape}; the model takes (B, 3, {size}, {size})')
        batch = images.shape[0]
        predictions = np.zeros(batch, dtype=np.int64)
        exit_index = np.zeros(batch, dtype=np.int64)
        remaining = np.arange(batch)  # original indices of the samples still inside
        x = np.ascontiguousarray(images, dtype=np.float32)
        final = self.num_exits - 1
        for k, session in enumerate(self.sessions):
            if remaining.size == 0:
                break
            outputs = session.run(None, {session.get_inputs()[0].name: x})
            if k == final:
                logits, leaving = outputs[0], np.ones(remaining.size, dtype=bool)
            else:
                x, logits, gate_prob = outputs  # x: (b, N, D) tokens for the next segment
                leaving = gate_prob >= self.threshold
            left = remaining[leaving]
            predictions[left] = logits[leaving].argmax(axis=-1)
            exit_index[left] = k
            if leaving.any():
                x, remaining = x[~leaving], remaining[~leaving]
        return predictions, exit_index


def preprocess(path: str | Path, input_size: int, mean: list[float], std: list[float]) -> np.ndarray:
    """The evaluation transform in numpy: RGB (16-bit and float images scaled as in training), bicubic resize
    of the short side to int(256/224 * size), centre crop, scale to [0, 1], normalise -> (3, size, size)
    float32. Matches torchvision's Resize, CenterCrop, ToTensor and Normalize on a PIL image."""
    try:
        img = open_rgb(path)
    except BandCountError as err:
        raise GFNetDynnError(str(err)) from None
    except DECODE_ERRORS as err:
        raise GFNetDynnError(f'cannot read image {path} ({err}); pass an image file') from None
    short_size = int(256 / 224 * input_size)
    width, height = img.size
    if width <= height:
        size = (short_size, int(short_size * height / width))
    else:
        size = (int(short_size * width / height), short_size)
    if size != img.size:
        img = img.resize(size, Image.BICUBIC)
    width, height = img.size
    top = int(round((height - input_size) / 2.0))
    left = int(round((width - input_size) / 2.0))
    img = img.crop((left, top, left + input_size, top + input_size))
    array = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    array = (array - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        'python -m models.onnx_runner',
        description='Classify images with an exported GFNet-Dynn, leaving at the first confident exit. '
                    'Prints: path, class name, exit k (of E), k counted from 1, E = the final head.')
    parser.add_argument('directory', type=str, help='folder written by the export (holds manifest.json)')
    parser.add_argument('images', type=str, nargs='*', help='image files to classify')
    parser.add_argument('--threshold', type=float, default=None,
                        help="gate probability at which a sample leaves (default: the manifest's)")
    parser.add_argument('--threads', type=int, default=0, help='onnxruntime intra-op threads (0: one per core)')
    parser.add_argument('--batch-size', type=int, default=8, help='images per onnxruntime call')
    return parser


def run(args: argparse.Namespace) -> None:
    if not args.images:
        raise GFNetDynnError('no images given: pass the export folder, then one or more image files')
    if args.batch_size < 1:
        raise GFNetDynnError(f'--batch-size {args.batch_size} must be at least 1')
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise GFNetDynnError(f'--threshold {args.threshold} must lie in [0, 1]')
    runner = OnnxEarlyExit(args.directory, threshold=args.threshold, num_threads=args.threads)
    manifest = runner.manifest
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start:start + args.batch_size]
        images = np.stack([preprocess(p, runner.input_size, manifest['mean'], manifest['std']) for p in paths])
        predictions, exit_index = runner.predict(images)
        for path, label, k in zip(paths, predictions, exit_index):
            print(f'{path}\t{runner.class_names[label]}\texit {k + 1} (of {runner.num_exits})', flush=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one line on stderr and exit 2."""
    return exit_code(lambda: run(get_args_parser().parse_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
