"""The built-in data sets, written on first use so the pipeline runs with no download: DEMO, deterministic
synthetic remote-sensing scenes, and DIGITS, scikit-learn's handwritten digits as a small real-image check.

Each class is a texture or structure (field stripes, canopy blobs, house grids, road networks...), not
just a colour. A per-image difficulty d in [0, 1] adds noise, blur, clutter, a colour shift and a blend
with another class's scene; most images are easy and a tail is hard, which is what early exits need.
"""
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from data_pipeline.data_splits import stratified_split
from dataset_config import DATASET_CONFIG
from errors import GFNetDynnError

logger = logging.getLogger(__name__)

MARKER = '.complete'
FORMAT_VERSION = 1  # bump when the generator changes so old demo folders are rebuilt
DIGITS_VERSION = 1  # the same for the DIGITS folders

# Colours are RGB in [0, 1].
GREEN = (0.25, 0.45, 0.2)
DARK_GREEN = (0.1, 0.28, 0.12)
BROWN = (0.5, 0.38, 0.25)
SAND = (0.76, 0.64, 0.45)
GREY = (0.5, 0.5, 0.5)
BLUE = (0.12, 0.25, 0.45)


def _rgb(colour: tuple[float, float, float] | np.ndarray, shade: np.ndarray) -> np.ndarray:
    """Broadcast a colour over an (H, W) shading field to an (H, W, 3) image."""
    return shade[..., None] * np.asarray(colour, dtype=np.float32)


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1), as (y, x) arrays of shape (H, W)."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(axis, axis, indexing='ij')


def _rotated(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates rotated by angle about the image centre: (along, across)."""
    y, x = _grid(size)
    y, x = y - 0.5, x - 0.5
    c, s = np.cos(angle), np.sin(angle)
    return x * c + y * s, -x * s + y * c


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an (H, W) or (H, W, C) array with edge padding."""
    if sigma < 0.3:
        return img
    radius = int(np.ceil(2.5 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * img.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(img, pad, mode='edge')
        n = img.shape[axis]
        img = sum(w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(taps))
    return img


def _smooth_noise(rng: np.random.Generator, size: int, scale: float) -> np.ndarray:
    """Blurred white noise rescaled to [0, 1]: blobs about `scale` pixels wide."""
    field = _blur(rng.standard_normal((size, size)).astype(np.float32), scale)
    field -= field.min()
    return field / max(float(field.max()), 1e-6)


def _jitter(rng: np.random.Generator, colour: tuple[float, float, float], amount: float = 0.05) -> np.ndarray:
    """A colour nudged per channel, so a class is not one exact RGB value."""
    return np.clip(np.asarray(colour, dtype=np.float32) + rng.uniform(-amount, amount, 3), 0, 1)


def _farmland(rng: np.random.Generator, size: int) -> np.ndarray:
    """Patchwork of rectangular fields, each ploughed in stripes of its own orientation."""
    img = np.empty((size, size, 3), np.float32)
    cuts_y = np.unique(np.r_[0, np.sort(rng.integers(size // 6, size - size // 6, rng.integers(1, 3))), size])
    cuts_x = np.unique(np.r_[0, np.sort(rng.integers(size // 6, size - size // 6, rng.integers(1, 3))), size])
    palette = (GREEN, (0.55, 0.6, 0.25), BROWN, (0.7, 0.62, 0.3))
    for y0, y1 in zip(cuts_y[:-1], cuts_y[1:]):
        for x0, x1 in zip(cuts_x[:-1], cuts_x[1:]):
            along, _ = _rotated(size, rng.choice([0.0, np.pi / 2]) + rng.normal(0, 0.1))
            stripes = 0.75 + 0.25 * np.sin(2 * np.pi * rng.uniform(7, 11) * along)
            field = _rgb(_jitter(rng, palette[rng.integers(len(palette))]), stripes)
            img[y0:y1, x0:x1] = field[y0:y1, x0:x1]
    return img


def _forest(rng: np.random.Generator, size: int) -> np.ndarray:
    """Dense canopy: many small round crowns over dark ground."""
    crowns = np.zeros((size, size), np.float32)
    ys, xs = rng.integers(0, size, (2, size * size // 10))
    crowns[ys, xs] = 1.0
    crowns = _blur(crowns, 1.2)
    crowns /= crowns.max()
    return _rgb(_jitter(rng, DARK_GREEN), 0.7 + 1.0 * crowns)


def _water(rng: np.random.Generator, size: int) -> np.ndarray:
    """Open water: smooth, dark, with faint parallel ripples."""
    along, _ = _rotated(size, rng.uniform(0, np.pi))
    ripples = 0.04 * np.sin(2 * np.pi * rng.uniform(12, 18) * along)
    shade = 0.85 + 0.25 * _smooth_noise(rng, size, size / 4) + ripples
    return _rgb(_jitter(rng, BLUE), shade)


def _residential(rng: np.random.Generator, size: int) -> np.ndarray:
    """Regular grid of small houses with bright roofs on grey ground."""
    img = _rgb(_jitter(rng, GREY), 0.9 + 0.1 * _smooth_noise(rng, size, 2))
    pitch = int(rng.integers(size // 8, size // 6 + 1))
    house = max(2, int(pitch * rng.uniform(0.45, 0.65)))
    off_y, off_x = rng.integers(0, pitch, 2)
    roofs = ((0.75, 0.3, 0.25), (0.85, 0.85, 0.8), (0.6, 0.35, 0.3))
    for y0 in range(off_y - pitch, size, pitch):
        for x0 in range(off_x - pitch, size, pitch):
            img[max(y0, 0):max(y0 + house, 0), max(x0, 0):max(x0 + house, 0)] = _jitter(rng, roofs[rng.integers(3)])
    return img


def _band(size: int, angle: float, offset: float, width: float) -> np.ndarray:
    """Mask in [0, 1] of a straight band `width` pixels wide, anti-aliased at its edges."""
    _, across = _rotated(size, angle)
    return np.clip(width / 2 - np.abs(across - offset) * size + 0.5, 0, 1)


def _road(rng: np.random.Generator, size: int) -> np.ndarray:
    """Network of thin dark roads crossing textured ground."""
    img = _rgb(_jitter(rng, (0.55, 0.53, 0.42)), 0.8 + 0.3 * _smooth_noise(rng, size, 3))
    base = rng.uniform(0, np.pi)
    for k in range(int(rng.integers(3, 6))):
        angle = base + (np.pi / 2) * (k % 2) + rng.normal(0, 0.15)
        mask = _band(size, angle, rng.uniform(-0.35, 0.35), rng.uniform(2.5, 3.5))[..., None]
        img = img * (1 - mask) + mask * _jitter(rng, (0.15, 0.15, 0.17))
    return img


def _bare_land(rng: np.random.Generator, size: int) -> np.ndarray:
    """Bare soil: sandy, mottled at a medium scale, with darker patches."""
    shade = 0.75 + 0.35 * _smooth_noise(rng, size, 2.5) - 0.25 * (_smooth_noise(rng, size, 6) > 0.7)
    return _rgb(_jitter(rng, SAND), shade)


def _airport_runway(rng: np.random.Generator, size: int) -> np.ndarray:
    """One wide light runway with a dashed centre line, across grass."""
    img = _rgb(_jitter(rng, (0.4, 0.5, 0.3)), 0.85 + 0.15 * _smooth_noise(rng, size, 4))
    angle, offset = rng.uniform(0, np.pi), rng.uniform(-0.1, 0.1)
    runway = _band(size, angle, offset, rng.uniform(12, 16))[..., None]
    img = img * (1 - runway) + runway * _jitter(rng, (0.7, 0.7, 0.68))
    along, _ = _rotated(size, angle)
    dashes = _band(size, angle, offset, 1.5) * (np.sin(2 * np.pi * 8 * along) > 0)
    return np.maximum(img, dashes[..., None] * 0.97)


def _river(rng: np.random.Generator, size: int) -> np.ndarray:
    """A meandering blue river across green-brown land."""
    img = _rgb(_jitter(rng, (0.3, 0.42, 0.22)), 0.8 + 0.3 * _smooth_noise(rng, size, 3))
    along, across = _rotated(size, rng.uniform(0, np.pi))
    centre = rng.uniform(0.08, 0.15) * np.sin(2 * np.pi * rng.uniform(0.8, 1.6) * along + rng.uniform(0, 2 * np.pi))
    width = rng.uniform(8, 12)
    mask = np.clip(width / 2 - np.abs(across - centre) * size + 0.5, 0, 1)[..., None]
    return img * (1 - mask) + mask * _jitter(rng, BLUE)


CLASSES = {
    'farmland': _farmland,
    'forest': _forest,
    'water': _water,
    'residential': _residential,
    'road': _road,
    'bare_land': _bare_land,
    'airport_runway': _airport_runway,
    'river': _river,
}


def _clutter(rng: np.random.Generator, img: np.ndarray, count: int) -> np.ndarray:
    """Paste `count` random rectangles (cars, roofs, clouds) that belong to no class."""
    size = img.shape[0]
    for _ in range(count):
        h, w = rng.integers(2, size // 5, 2)
        y0, x0 = rng.integers(0, size - h), rng.integers(0, size - w)
        img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 1, 3)
    return img


def _degrade(rng: np.random.Generator, img: np.ndarray, other: np.ndarray, difficulty: float) -> np.ndarray:
    """Make a clean scene as hard as `difficulty` says: blend, clutter, colour shift, blur, noise."""
    blend = 0.45 * difficulty ** 1.5
    img = (1 - blend) * img + blend * other
    img = _clutter(rng, img, int(rng.binomial(int(10 * difficulty), 0.6)))
    img = img * (1 + rng.normal(0, 0.2 * difficulty)) + rng.normal(0, 0.1 * difficulty, 3)
    img = _blur(img, 1.4 * difficulty * rng.uniform(0.5, 1.0))
    return img + rng.normal(0, 0.01 + 0.1 * difficulty, img.shape)


def render_scene(class_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 scene of class `class_index` at a random difficulty."""
    makers = list(CLASSES.values())
    difficulty = float(rng.beta(1.2, 4.5))  # mean ~0.21: mostly easy, a tail of hard scenes
    other = (class_index + int(rng.integers(1, len(makers)))) % len(makers)
    img = _degrade(rng, makers[class_index](rng, size), makers[other](rng, size), difficulty)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _write_split(folder: Path, split_id: int, per_class: int, image_size: int, seed: int) -> None:
    """Write `per_class` PNGs for every class; each image has its own seed, so counts don't reshuffle."""
    for class_index, name in enumerate(CLASSES):
        class_dir = folder / name
        class_dir.mkdir(parents=True)
        for i in range(per_class):
            rng = np.random.default_rng([seed, split_id, class_index, i])
            Image.fromarray(render_scene(class_index, image_size, rng)).save(class_dir / f'{i:04d}.png')


def _is_complete(root: Path, params: dict) -> bool:
    """True when root holds a finished generated data set made with these parameters."""
    try:
        return json.loads((root / MARKER).read_text()) == params
    except (OSError, ValueError):
        return False


def _check_replaceable(root: Path, name: str) -> None:
    """Refuse to overwrite a root that holds anything but an old generated data set (train/, val/, marker)."""
    if root.exists() and (not root.is_dir() or any(p.name not in ('train', 'val', MARKER) for p in root.iterdir())):
        raise GFNetDynnError(f'{root} exists but is not a {name} data set; remove it or pass another --data-path')


def ensure_generated(root: str | Path, name: str, params: dict, write: Callable[[Path], None]) -> Path:
    """The one way a built-in data set reaches disk: if root's marker does not hold `params`, call
    write(folder) to fill a hidden sibling with train/ and val/, then rename it into place, so an interrupted
    run never leaves half a data set and a change of parameters rebuilds it."""
    root = Path(root)
    if _is_complete(root, params):
        return root
    _check_replaceable(root, name)
    logger.info('generating the %s data set in %s', name, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{root.name}.partial-', dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the data set is not
    try:
        write(tmp)
        (tmp / MARKER).write_text(json.dumps(params))  # last: its presence means the folder is whole
        if not _is_complete(root, params):  # another process may have finished first
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def ensure_demo_dataset(root: str | Path, *, train_per_class: int = 120, val_per_class: int = 40,
                        image_size: int = 64, seed: int = 0) -> Path:
    """Make sure root/{train,val}/<class>/NNNN.png exist; generate them atomically if not."""
    params = {'version': FORMAT_VERSION, 'train_per_class': train_per_class, 'val_per_class': val_per_class,
              'image_size': image_size, 'seed': seed}

    def write(folder: Path) -> None:
        _write_split(folder / 'train', 0, train_per_class, image_size, seed)
        _write_split(folder / 'val', 1, val_per_class, image_size, seed)

    return ensure_generated(root, 'DEMO', params, write)


def _write_digits(folder: Path, image_size: int, val_share: float, seed: int) -> None:
    """scikit-learn's 1797 8x8 digits (ink 0-16) as grey-on-black RGB PNGs upscaled bicubically to image_size,
    split per class into train/ and val/ with `seed`; file names keep the digit's index in load_digits."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise GFNetDynnError('the DIGITS data set comes from scikit-learn; pip install scikit-learn') from error
    digits = load_digits()
    train, val = stratified_split([int(t) for t in digits.target], 1 - val_share, seed)
    for split, indices in (('train', train), ('val', val)):
        for i in indices:
            class_dir = folder / split / str(int(digits.target[i]))
            class_dir.mkdir(parents=True, exist_ok=True)
            grey = Image.fromarray((digits.images[i] * (255 / 16) + 0.5).astype(np.uint8))
            grey.resize((image_size, image_size), Image.Resampling.BICUBIC).convert('RGB').save(
                class_dir / f'{i:04d}.png')


def ensure_digits_dataset(root: str | Path, *, image_size: int = 32, val_share: float = 0.25,
                          seed: int = 0) -> Path:
    """Make sure root/{train,val}/<digit>/NNNN.png exist (a fixed stratified split); generate them if not."""
    params = {'version': DIGITS_VERSION, 'image_size': image_size, 'val_share': val_share, 'seed': seed}
    return ensure_generated(root, 'DIGITS', params, lambda folder: _write_digits(folder, image_size, val_share, seed))


# --data-set names that are generated, not read from a folder the user provides: name -> ensure(root)
GENERATORS = {'DEMO': ensure_demo_dataset, 'DIGITS': ensure_digits_dataset}


if __name__ == '__main__':
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    # python -m data_pipeline.demo_data [FOLDER [DATA_SET]]: DEMO by default
    name = sys.argv[2] if len(sys.argv) > 2 else 'DEMO'
    out = GENERATORS[name](sys.argv[1] if len(sys.argv) > 1 else DATASET_CONFIG[name]['default_data_path'])
    print(f'{name} data set ready in {out.resolve()}')
