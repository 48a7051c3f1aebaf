"""Real early exit on an edge runtime: chain the ONNX segments written by `deployment/onnx_export.py`.

Needs only onnxruntime, numpy and Pillow: `python -m deployment.onnx_runner DIR IMAGE_OR_FOLDER ...` (from the
repository) or `python PATH/TO/deployment/onnx_runner.py DIR IMAGE_OR_FOLDER ...` (from any directory) imports no
torch and no training code (importing the `models` package registers nothing until a model is asked for).
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

import numpy as np
import onnxruntime as ort
from PIL import Image

if not __package__:  # run as a file from any directory: its own modules are found from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_pipeline.image_io import DECODE_ERRORS, BandCountError, open_rgb
from deployment.onnx_manifest import MANIFEST_FORMAT, MANIFEST_KEYS, MANIFEST_NAME
from errors import GFNetDynnError, OneLineParser, exit_code

PRECISIONS = {'float': 'segments', 'int8': 'int8_segments'}  # --precision -> the manifest's list of graphs
# What a folder argument contributes: the image types Pillow reads (torchvision's list, without torch).
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
JUNK_NAMES = ('thumbs.db', 'desktop.ini')
JSONL_KEYS = ('file', 'class', 'exit', 'latency_ms')


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
        **{key: _segment_list(manifest[key]) for key in PRECISIONS.values() if key in manifest},
        'batch': manifest.get('batch') is None or (isinstance(manifest['batch'], int) and manifest['batch'] > 0),
    }
    for key, ok in checks.items():
        if not ok:
            raise GFNetDynnError(f'{path}: {key} is {manifest[key]!r}, not a value the runner can use; export the '
                                 f'model again')
    for key in (key for key in PRECISIONS.values() if key in manifest):
        found, needed = len(manifest[key]), len(positions) + 1
        if found != needed:
            raise GFNetDynnError(f"{path}: {key} lists {found} graph{'s' * (found != 1)}, but exit_positions "
                                 f'{positions} need {needed} (one per exit, then the final one); copy the whole '
                                 f'export folder or export again')


def _segment_list(names) -> bool:
    return isinstance(names, list) and all(isinstance(name, str) and '/' not in name for name in names)


def fires(gate_prob: np.ndarray, threshold: float) -> np.ndarray:
    """Which gate probabilities reach the threshold, compared in their own dtype (float32): the numpy twin of
    `models.exit_rule.fires`, which the runner cannot import without torch."""
    return gate_prob >= np.asarray(threshold, dtype=gate_prob.dtype)


class OnnxEarlyExit:
    """`EarlyExitEngine` on onnxruntime: a sample leaves at the first exit whose gate probability is
    >= threshold, else at the final head; each segment runs only for the samples still inside."""

    def __init__(self, directory: str | Path, threshold: float | None = None, num_threads: int = 0,
                 precision: str = 'float'):
        self.manifest = read_manifest(directory)
        self.threshold = self.manifest['threshold'] if threshold is None else threshold
        self.input_size = int(self.manifest['input_size'])
        self.class_names = list(self.manifest['class_names'])
        self.batch = self.manifest.get('batch')  # None: the graphs take any batch size
        if precision not in PRECISIONS:
            raise GFNetDynnError(f'precision {precision!r}: choose one of {", ".join(PRECISIONS)}')
        if PRECISIONS[precision] not in self.manifest:
            raise GFNetDynnError(f'{directory} holds no {precision} segments; export with --quantize {precision}')
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads  # 0: onnxruntime's default (one per core)
        options.inter_op_num_threads = 1  # the graphs are chains: no parallel branches to run
        self.sessions = []
        for name in self.manifest[PRECISIONS[precision]]:
            path = Path(directory) / name
            if not path.is_file():
                raise GFNetDynnError(f'{path} is missing; copy the whole export folder or export again')
            try:
                self.sessions.append(ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider']))
            except Exception as error:  # onnxruntime raises its own types for a damaged graph
                reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                raise GFNetDynnError(f'{path} is not a usable ONNX graph ({reason}); copy the export folder '
                                     f'again or export again') from None
        self.input_names = [session.get_inputs()[0].name for session in self.sessions]
        self._check_graph_shapes(Path(directory) / MANIFEST_NAME)

    def _check_graph_shapes(self, manifest_path: Path) -> None:
        """The manifest agrees with the graphs (the first takes input_size images, every head predicts one score per
        class name) before any image is read; a symbolic dimension is not checked."""
        image_shape = self.sessions[0].get_inputs()[0].shape
        if len(image_shape) == 4 and any(isinstance(d, int) and d != self.input_size for d in image_shape[2:]):
            raise GFNetDynnError(f'{manifest_path}: input_size {self.input_size}, but the first graph takes '
                                 f'{image_shape[2]}x{image_shape[3]} images; export the model again')
        for k, session in enumerate(self.sessions):
            logits = session.get_outputs()[0 if k == self.num_exits - 1 else 1].shape
            if logits and isinstance(logits[-1], int) and logits[-1] != len(self.class_names):
                raise GFNetDynnError(f'{manifest_path}: {len(self.class_names)} class_names, but the heads predict '
                                     f'{logits[-1]} classes; export the model again')

    @property
    def num_exits(self) -> int:
        return len(self.sessions)

    def run_segment(self, k: int, x: np.ndarray) -> list[np.ndarray]:
        """Segment k on x (images for k = 0, else the tokens or feature maps segment k-1 returned): [what it
        passes on, logits, gate probability] for an intermediate exit, [logits] for the final head."""
        return self.sessions[k].run(None, {self.input_names[k]: x})

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Images (B, 3, H, W) float32, normalised -> predicted class (B,) and exit index (B,), 0..E-1."""
        size = self.input_size
        if images.ndim != 4 or images.shape[1:] != (3, size, size):
            raise GFNetDynnError(f'images of shape {images.shape}; the model takes (B, 3, {size}, {size})')
        if self.batch is not None and images.shape[0] != self.batch:
            if self.batch != 1:
                raise GFNetDynnError(f'these graphs take batches of exactly {self.batch}, not {images.shape[0]}')
            # Graphs fixed to batch 1: one image at a time.
            results = [self.predict(images[i:i + 1]) for i in range(images.shape[0])]
            return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results])
        batch = images.shape[0]
        predictions = np.zeros(batch, dtype=np.int64)
        exit_index = np.zeros(batch, dtype=np.int64)
        remaining = np.arange(batch)  # original indices of the samples still inside
        x = np.ascontiguousarray(images, dtype=np.float32)
        final = self.num_exits - 1
        for k in range(self.num_exits):
            if remaining.size == 0:
                break
            outputs = self.run_segment(k, x)
            if k == final:
                logits, leaving = outputs[0], np.ones(remaining.size, dtype=bool)
            else:
                x, logits, gate_prob = outputs  # x: tokens or feature maps for the next segment
                leaving = fires(gate_prob, self.threshold)
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


def _is_junk(name: str) -> bool:
    """Hidden entries (.DS_Store, ._*), Windows' Thumbs.db and desktop.ini."""
    return name.startswith('.') or name.lower() in JUNK_NAMES


def image_files(arguments: list[str]) -> Iterator[str]:
    """The images to classify: each file argument as given, and the image files under each folder argument
    (recursively, sorted; hidden entries and other file types skipped)."""
    for argument in arguments:
        if not os.path.isdir(argument):
            yield argument  # a missing or unreadable file is reported when it is read
            continue
        for root, folders, files in os.walk(argument, followlinks=False):
            folders[:] = sorted(f for f in folders if not _is_junk(f))
            for name in sorted(files):
                if not _is_junk(name) and name.lower().endswith(IMAGE_EXTENSIONS):
                    yield os.path.join(root, name)


def _is_our_jsonl(path: Path) -> bool:
    """True when every line of path is a JSON object with the runner's keys: an earlier --jsonl output."""
    try:
        lines = path.read_text().splitlines()
        return all(isinstance(row := json.loads(line), dict) and set(JSONL_KEYS) <= set(row) for line in lines)
    except (OSError, UnicodeDecodeError, ValueError):
        return False


def check_jsonl_path(path: Path) -> Path:
    """--jsonl may name a new file or an earlier --jsonl output, under a writable folder; nothing else is replaced."""
    if path.is_dir():
        raise GFNetDynnError(f'--jsonl {path} is a folder; pass a file path, e.g. {path / "predictions.jsonl"}')
    if path.exists() and not _is_our_jsonl(path):
        raise GFNetDynnError(f'--jsonl {path} exists and is not an earlier --jsonl output; refusing to replace it: '
                             f'pass another path')
    parent = next(p for p in [path.parent, *path.parent.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise GFNetDynnError(f'--jsonl {path}: cannot write under {parent}; pass a path in a writable folder')
    return path


def get_args_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        'python -m deployment.onnx_runner',
        description='Classify images with an exported GFNet-Dynn, leaving at the first confident exit. Prints '
                    'one line per image: path, class name, exit k of 0..E-1 (counted from 0; E-1 is the final '
                    'head), or with --jsonl one JSON object per image.')
    parser.add_argument('directory', type=str, help='folder written by the export (holds manifest.json)')
    parser.add_argument('images', type=str, nargs='*',
                        help='image files, or folders searched recursively for image files')
    parser.add_argument('--threshold', type=float, default=None,
                        help="gate probability at which a sample leaves (default: the manifest's)")
    parser.add_argument('--precision', type=str, default='float', choices=sorted(PRECISIONS),
                        help='which graphs to run: float, or int8 (exported with --quantize int8)')
    parser.add_argument('--threads', type=int, default=0, help='onnxruntime intra-op threads (0: one per core)')
    parser.add_argument('--batch-size', type=int, default=1,
                        help='images per onnxruntime call (latency_ms is the call time divided by its images)')
    parser.add_argument('--jsonl', type=str, default=None,
                        help="write JSON lines (file, class, exit, latency_ms) to this file; '-': to stdout")
    return parser


def _write_rows(rows: Iterator[dict], out: TextIO, as_json: bool, num_exits: int) -> int:
    count = 0
    for row in rows:
        if as_json:
            out.write(json.dumps(row) + '\n')
        else:
            out.write(f"{row['file']}\t{row['class']}\texit {row['exit']} of 0..{num_exits - 1}\n")
        out.flush()
        count += 1
    return count


def readable(paths: Iterator[str], runner: OnnxEarlyExit, skipped: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    """(path, preprocessed image) of each readable image; an unreadable one is named in one line on stderr, added
    to `skipped`, and the others go on."""
    manifest = runner.manifest
    for path in paths:
        try:
            yield path, preprocess(path, runner.input_size, manifest['mean'], manifest['std'])
        except GFNetDynnError as error:
            print(f'skipped: {error}', file=sys.stderr, flush=True)
            skipped.append(path)


def classify(runner: OnnxEarlyExit, paths: Iterator[str], batch_size: int,
             skipped: list[str] | None = None) -> Iterator[dict]:
    """One row per readable image: file, class name, exit index (from 0) and the model's ms per image (decoding
    and preprocessing excluded); unreadable images are skipped (named on stderr, listed in `skipped`)."""
    pending: list[tuple[str, np.ndarray]] = []

    def flush() -> Iterator[dict]:
        images = np.stack([image for _, image in pending])
        started = time.perf_counter()
        predictions, exit_index = runner.predict(images)
        latency_ms = (time.perf_counter() - started) * 1e3 / len(pending)
        for (path, _), label, k in zip(pending, predictions, exit_index):
            yield {'file': path, 'class': runner.class_names[label], 'exit': int(k),
                   'latency_ms': round(latency_ms, 3)}
        pending.clear()

    for item in readable(paths, runner, [] if skipped is None else skipped):
        pending.append(item)
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()


def run(args: argparse.Namespace) -> None:
    if not args.images:
        raise GFNetDynnError('no images given: pass the export folder, then image files or folders')
    if args.batch_size < 1:
        raise GFNetDynnError(f'--batch-size {args.batch_size} must be at least 1')
    if args.threads < 0:
        raise GFNetDynnError(f'--threads {args.threads} must be >= 0 (0: one per core)')
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise GFNetDynnError(f'--threshold {args.threshold} must lie in [0, 1]')
    jsonl = check_jsonl_path(Path(args.jsonl)) if args.jsonl not in (None, '-') else None
    read_manifest(args.directory)  # the export folder first: it is the first argument
    for argument in args.images:
        if not os.path.exists(argument):
            raise GFNetDynnError(f'{argument} does not exist; pass image files or folders of images')
    paths = list(image_files(args.images))
    if not paths:
        raise GFNetDynnError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}) in {", ".join(args.images)}')
    runner = OnnxEarlyExit(args.directory, threshold=args.threshold, num_threads=args.threads,
                           precision=args.precision)
    skipped: list[str] = []
    rows = classify(runner, iter(paths), args.batch_size, skipped)
    if jsonl is None:
        _write_rows(rows, sys.stdout, args.jsonl == '-', runner.num_exits)
        _check_some_read(skipped, paths)
    else:
        tmp = jsonl.with_name(jsonl.name + '.tmp')
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, 'w') as out:
                count = _write_rows(rows, out, True, runner.num_exits)
            _check_some_read(skipped, paths)  # before the rename: an earlier output is not replaced by nothing
            os.replace(tmp, jsonl)
        finally:
            tmp.unlink(missing_ok=True)
        print(f'{count} images classified: {jsonl}', file=sys.stderr)


def _check_some_read(skipped: list[str], paths: list[str]) -> None:
    if skipped and len(skipped) == len(paths):
        raise GFNetDynnError(f'none of the {len(paths)} images could be read (each is named above); pass image files')


def main(argv: list[str] | None = None) -> int:
    """Entry point: user mistakes print one line on stderr and exit 2."""
    return exit_code(lambda: run(get_args_parser().parse_intermixed_args(argv)))


if __name__ == '__main__':
    sys.exit(main())
