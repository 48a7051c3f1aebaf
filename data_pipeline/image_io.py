"""Decode any image file to 8-bit RGB, scaling 16-bit and float images instead of clipping them.

Remote-sensing scenes often come as 16-bit or float TIFF/PNG. Pillow's convert('RGB') clips such values
at 255 (a 16-bit grey image turns white, a float one black), so they are rescaled first:
  16-bit (modes I;16*, and I when its values fit 0..65535): value / 257, i.e. 65535 -> 255;
  float (mode F): [0, 1] data times 255; any other range mapped from its own min..max onto 0..255.
Images of more than 4 bands are refused: the network reads RGB. Needs only Pillow and numpy (the edge
runner uses it too).
"""
import struct
from pathlib import Path

import numpy as np
from PIL import Image

# What Pillow raises on an unreadable file; DecompressionBombError on absurd sizes.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
MAX_BANDS = 4
_TIFF_SAMPLES_PER_PIXEL = 277


class BandCountError(ValueError):
    """An image with more bands than RGB(A): the message names the count and the fix."""


def _to_uint8(values: np.ndarray, wide_integer: bool) -> np.ndarray:
    """Scale a 2-D array of 16-bit integers (wide_integer) or floats onto 0..255."""
    values = values.astype(np.float64)
    if wide_integer and values.min() >= 0 and values.max() <= 65535:
        scaled = values / 257.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if 0.0 <= low and high <= 1.0 and not wide_integer:
            scaled = values * 255.0
        else:
            scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB: grey, palette and RGBA converted, 16-bit and float scaled."""
    if img.mode.startswith('I;16') or img.mode == 'I':
        return Image.fromarray(_to_uint8(np.asarray(img), wide_integer=True), mode='L').convert('RGB')
    if img.mode == 'F':
        return Image.fromarray(_to_uint8(np.asarray(img), wide_integer=False), mode='L').convert('RGB')
    return img.convert('RGB')


def tiff_band_count(path: str | Path) -> int | None:
    """SamplesPerPixel of a TIFF's first image, read from its header (Pillow cannot open many-band TIFFs);
    None if the file is not a readable classic TIFF."""
    try:
        with open(path, 'rb') as stream:
            order = {b'II': '<', b'MM': '>'}.get(stream.read(2))
            if order is None or struct.unpack(order + 'H', stream.read(2))[0] != 42:
                return None
            stream.seek(struct.unpack(order + 'I', stream.read(4))[0])
            for _ in range(struct.unpack(order + 'H', stream.read(2))[0]):
                tag, kind, _count, value = struct.unpack(order + 'HHI4s', stream.read(12))
                if tag == _TIFF_SAMPLES_PER_PIXEL:
                    return struct.unpack(order + ('H' if kind == 3 else 'I'), value[:2 if kind == 3 else 4])[0]
    except (OSError, struct.error):
        return None
    return None


def open_rgb(path: str | Path, header_only: bool = False) -> Image.Image | None:
    """Fully decode `path` to 8-bit RGB (with header_only, only check the header and the file's structure without
    decoding, e.g. a PNG's chunk checksums, which find a truncated file, and return None). Raises BandCountError
    for more than 4 bands, and Pillow's own errors (DECODE_ERRORS) for unreadable files."""
    try:
        with Image.open(path) as img:
            bands = len(img.getbands())
            if bands > MAX_BANDS:
                raise BandCountError(_band_message(path, bands))
            if header_only:
                img.verify()
                return None
            img.load()
            return to_rgb(img)
    except Image.UnidentifiedImageError:
        bands = tiff_band_count(path)
        if bands is not None and bands > MAX_BANDS:
            raise BandCountError(_band_message(path, bands)) from None
        raise


def _band_message(path: str | Path, bands: int) -> str:
    return (f'image {path} has {bands} bands; the network reads RGB, grey or RGBA images: save 3 of its bands '
            f'(e.g. red, green, blue) as the image')
