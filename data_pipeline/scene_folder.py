"""A folder of class folders as a dataset: every image found once, with one-line errors for what is wrong.

Symbolic links are followed, but a link back to a folder above it (a loop) is an error naming it, and a file
or folder reached twice through links counts once. What downloads carry besides images (Thumbs.db,
desktop.ini, .DS_Store, ._* AppleDouble files, hidden folders) is skipped with one warning that counts it.
Images decode to 8-bit RGB through `image_io` (16-bit and float images scaled, more than 4 bands refused).
"""
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from data_pipeline.image_io import DECODE_ERRORS, BandCountError, open_rgb
from errors import GFNetDynnError

logger = logging.getLogger(__name__)

SKIP_HINT = 'fix or remove it, or pass --skip-bad-images'
BAD_IMAGES_SHOWN = 3  # bad files a scan names; the others are counted


class BadImages(GFNetDynnError):
    """Every bad file a scan found, in one line: a user fixes them in one go, not one per run."""

    def __init__(self, problems: list[str], where: str | Path):
        self.problems, self.where = problems, where
        shown = '; '.join(problems[:BAD_IMAGES_SHOWN])
        more = f' and {len(problems) - BAD_IMAGES_SHOWN} more' if len(problems) > BAD_IMAGES_SHOWN else ''
        super().__init__(f'{problems[0]}; {SKIP_HINT}' if len(problems) == 1 else
                         f'{len(problems)} bad images under {where}: {shown}{more}; fix or remove them, or pass '
                         f'--skip-bad-images')


def load_rgb(path: str) -> Image.Image:
    """The dataset loader: an RGB image, or an error naming the file that failed to decode."""
    try:
        return open_rgb(path)
    except BandCountError as err:
        raise GFNetDynnError(str(err)) from None
    except DECODE_ERRORS as err:
        raise GFNetDynnError(f'cannot read image {path} ({err}); {SKIP_HINT}') from err


def image_problem(path: str, full_decode: bool) -> str | None:
    """Why path is not a usable image, or None; checks the header only unless full_decode."""
    if not path.lower().endswith(IMG_EXTENSIONS):
        return f'{path} is not an image file (expected {", ".join(IMG_EXTENSIONS)})'
    try:
        open_rgb(path, header_only=not full_decode)
    except BandCountError as err:
        return str(err)
    except DECODE_ERRORS as err:
        return f'cannot read image {path} ({err})'
    return None


JUNK_NAMES = ('thumbs.db', 'desktop.ini')  # what Windows leaves in image folders


def _is_junk(name: str) -> bool:
    """Hidden entries (.DS_Store, .git, ...), AppleDouble ._* files and Windows' Thumbs.db / desktop.ini."""
    return name.startswith('.') or name.lower() in JUNK_NAMES


def _walk_files(folder: Path, above: frozenset, seen_folders: set, skipped: list[str]) -> Iterator[str]:
    """Paths of the files under `folder`, sorted, following links. `above`: the (device, inode) of the folders
    on the way down, to recognise a loop; `seen_folders`: every folder entered so far; `skipped`: junk found."""
    info = folder.stat()
    key = (info.st_dev, info.st_ino)
    if key in above:
        raise GFNetDynnError(f'symbolic link loop: {folder} leads back to {folder.resolve()}, a folder above it; '
                             f'remove the link')
    if key in seen_folders:  # a second link to a folder already read: its files count once
        return
    seen_folders.add(key)
    entries = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if _is_junk(entry.name):
            skipped.append(entry.path)
        else:
            entries.append(entry)
    for entry in entries:
        if entry.is_file():
            yield entry.path
    for entry in entries:
        if entry.is_dir():
            yield from _walk_files(Path(entry.path), above | {key}, seen_folders, skipped)


class SceneFolder(ImageFolder):
    """ImageFolder that follows links safely, skips hidden entries, decodes to RGB and names the folder or file
    behind each error. Every non-hidden file must be a readable image: scanning checks each header and file
    structure (cheap), or with check_images or skip_bad_images fully decodes each file; every bad file is
    reported at once, or with skip_bad_images dropped with a warning."""

    def __init__(self, root: str | Path, transform: Callable | None = None, skip_bad_images: bool = False,
                 check_images: bool = False):
        self.skip_bad_images = skip_bad_images  # read by make_dataset, which ImageFolder calls while scanning
        self.full_decode = skip_bad_images or check_images
        super().__init__(str(root), transform=transform, loader=load_rgb, allow_empty=True)
        empty = sorted(set(self.classes) - {self.classes[t] for t in self.targets})
        if empty:
            skipped = any(any(Path(root, n).rglob('[!.]*.*')) for n in empty)  # files there, all unreadable
            raise GFNetDynnError(f'no {"readable " if skipped else ""}images in '
                                 f'{", ".join(str(Path(root) / n) for n in empty)}; ' +
                                 ('every file there was skipped as unreadable: replace them or delete the class '
                                  'folder' if skipped else 'add images or delete the empty class folder'))

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        """Class names are the non-hidden sub-folders of directory, sorted."""
        classes = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not _is_junk(e.name))
        if not classes:
            raise GFNetDynnError(f'no class folders in {directory}; it must hold one sub-folder per class')
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory: str, class_to_idx: dict[str, int], extensions=None, is_valid_file=None,
                     allow_empty: bool = False) -> list[tuple[str, int]]:
        """(path, class index) of every readable image, each real file once."""
        samples, seen_files, seen_folders, skipped, problems = [], set(), set(), [], []
        for name in sorted(class_to_idx):
            for path in _walk_files(Path(directory) / name, frozenset(), seen_folders, skipped):
                info = os.stat(path)
                if (info.st_dev, info.st_ino) in seen_files:
                    continue
                seen_files.add((info.st_dev, info.st_ino))
                problem = image_problem(path, full_decode=self.full_decode)
                if problem is None:
                    samples.append((path, class_to_idx[name]))
                elif self.skip_bad_images:
                    logger.warning('skipping bad image: %s', problem)
                else:
                    problems.append(problem)
        if skipped:
            logger.warning('skipped %d entries under %s that are not images (Thumbs.db, desktop.ini, .DS_Store, '
                           '._* files, hidden folders), e.g. %s', len(skipped), directory, skipped[0])
        if problems:
            raise BadImages(problems, directory)
        return samples


def real_files(dataset) -> set[tuple[int, int]]:
    """(device, inode) of every file a SceneFolder (or a Subset of one) reads."""
    samples = dataset.samples if hasattr(dataset, 'samples') else [dataset.dataset.samples[i] for i in dataset.indices]
    keys = set()
    for path, _ in samples:
        info = os.stat(path)
        keys.add((info.st_dev, info.st_ino))
    return keys
