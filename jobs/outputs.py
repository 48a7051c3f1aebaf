"""Output safety: every path a command writes is checked before anything is written, so that no command can
replace a trained model or a file it did not write itself.

- A file output (results JSON, plots, benchmark JSON) may only replace an earlier output of the same kind.
- A training run owns its run folders: a new run stops where a previous run left checkpoints, unless the
  user passes --overwrite; no run writes into the folder holding a file it reads (--checkpoint-path).
- One process at a time per run folder (a file lock; the second one is told the first one's PID).
- An export folder holds an export and nothing else, and is replaced whole.
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch
from filelock import FileLock, Timeout
from PIL import Image

from deployment.exporters import EXPORTERS, Exporter
from errors import GFNetDynnError

LOCK_NAME = '.lock'
PID_NAME = '.lock.pid'
PNG_SOFTWARE = 'GFNet-Dynn'  # the PNG metadata our plots carry


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_results_json(path: Path) -> bool:
    data = _json_object(path)
    return data is not None and 'sweep' in data and 'per_exit_accuracy' in data


def _is_benchmark_json(path: Path) -> bool:
    data = _json_object(path)
    return data is not None and isinstance(data.get('benchmark'), str)


def _is_our_png(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            software = str(img.info.get('Software', ''))
            return img.format == 'PNG' and software.startswith((PNG_SOFTWARE, 'Matplotlib'))
    except (OSError, ValueError, SyntaxError):
        return False


OUTPUT_KINDS: dict[str, tuple[str, Callable[[Path], bool]]] = {
    'results': ('results JSON of --eval', _is_results_json),
    'plot': ('plot of --eval', _is_our_png),
    'benchmark': ('benchmark JSON', _is_benchmark_json),
}


def writable_location(folder: Path, flag: str, shown: Path | None = None) -> None:
    """The nearest existing folder at or above `folder` must be a writable folder; nothing is created. `shown`:
    the path the error names (default: folder)."""
    shown = shown or folder
    for parent in [folder, *folder.parents]:
        if parent.exists():
            if not parent.is_dir():
                raise GFNetDynnError(f'{flag} {shown}: {parent} is a file, not a folder; pass a path under a folder')
            try:  # a trial file, removed at once: permissions alone miss read-only mounts and /proc
                tempfile.TemporaryFile(dir=parent).close()
            except OSError as error:
                raise GFNetDynnError(f'{flag} {shown}: cannot create files under {parent} '
                                     f'({error.strerror or error}); pass a writable {flag}') from None
            return


def check_output_file(path: str | Path, kind: str, flag: str) -> Path:
    """`path` may be written as a `kind` output: not a folder, and if it exists, an earlier output of that kind."""
    path = Path(path)
    description, recognise = OUTPUT_KINDS[kind]
    if path.is_dir():
        raise GFNetDynnError(f'{flag} {path} is a folder; pass a file path, e.g. {path / "results.json"}')
    if path.exists() and not recognise(path):
        raise GFNetDynnError(f'{flag} {path} exists and is not a {description}; refusing to replace it: pass '
                             f'another path')
    writable_location(path.parent, flag, shown=path)
    return path


def _inside(path: Path, folder: Path) -> bool:
    return folder.resolve() in path.resolve().parents


def describe_run(folder: Path) -> str:
    """One phrase on the run whose checkpoints are in `folder`: stage, epoch, best accuracy."""
    for name in ('last.pth', 'best.pth'):
        try:
            checkpoint = torch.load(folder / name, map_location='cpu', weights_only=True)
        except Exception:  # unreadable or absent: try the next, else describe by file count
            continue
        if isinstance(checkpoint, dict):
            best = checkpoint.get('best_acc', checkpoint.get('acc'))
            accuracy = f', best val acc {best:.2f}%' if isinstance(best, (int, float)) else ''
            return f"stage {checkpoint.get('stage', '?')}, epoch {checkpoint.get('epoch', '?')}{accuracy}"
    return f"{len(list(folder.glob('*.pth')))} checkpoint files"


def check_new_run(run_folders: list[Path], overwrite: bool, sources: dict[str, str | None]) -> None:
    """Before a new training run writes anything: no source file lies in a folder the run writes, and no run
    folder holds an earlier run's checkpoints unless --overwrite."""
    for flag, source in sources.items():
        for folder in run_folders:
            if source and _inside(Path(source), folder):
                raise GFNetDynnError(f'{flag} {source} lies in {folder}, which this run writes; copy it elsewhere '
                                     f'first, or pass another --output-dir')
    for folder in run_folders:
        if folder.is_file():
            raise GFNetDynnError(f'{folder} is a file, where this run needs a folder; move it or pass another '
                                 f'--output-dir')
        if overwrite or not folder.is_dir() or not any(folder.glob('*.pth')):
            continue
        last = folder / 'last.pth'
        how = f'continue it with --resume {last}, ' if last.exists() else ''
        raise GFNetDynnError(f'{folder} already holds a run ({describe_run(folder)}); {how}pass another '
                             f'--output-dir, or --overwrite to replace it')


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold `folder` (created if needed) for this process; another process holding it is a one-line error."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / LOCK_NAME), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        try:
            owner = f'PID {int((folder / PID_NAME).read_text())}'
        except (OSError, ValueError):
            owner = 'another process'
        raise GFNetDynnError(f'{owner} is writing {folder}; wait for it to finish, or pass another '
                             f'--output-dir') from None
    try:
        (folder / PID_NAME).write_text(str(os.getpid()))
        yield
    finally:
        (folder / PID_NAME).unlink(missing_ok=True)
        lock.release()


def remove_previous_run(folder: Path) -> None:
    """--overwrite: delete the files an earlier run of this tool left in `folder` (checkpoints, results,
    plots, warm-up heads), nothing else."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_file() and (path.suffix == '.pth' or (path.name.startswith('results') and
                                                         path.suffix in ('.json', '.png'))):
            path.unlink()


def _is_export_folder(folder: Path) -> bool:
    """True when `folder` holds an earlier export and nothing else: an exporter's manifest, the files it leaves
    (their suffixes in its EXPORTERS entry), temp files."""
    return any(_is_export_of(folder, exporter) for exporter in EXPORTERS.values())


def _is_export_of(folder: Path, exporter: Exporter) -> bool:
    manifest = _json_object(folder / exporter.manifest)
    if manifest is None or any(key not in manifest for key in exporter.manifest_keys):
        return False
    return all(p.name in (exporter.manifest, LOCK_NAME, PID_NAME) or p.suffix in (*exporter.suffixes, '.tmp')
               for p in folder.iterdir())


def check_export_folder(folder: str | Path) -> Path:
    """--out must be a new folder, an empty one, or one holding only an earlier export (which is replaced)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GFNetDynnError(f'--out {folder} is a file; pass a folder for the export')
    if folder.is_dir() and any(folder.iterdir()) and not _is_export_folder(folder):
        raise GFNetDynnError(f'--out {folder} holds files that are not an earlier export; refusing to mix or '
                             f'replace them: pass a new or empty folder')
    writable_location(folder, '--out')
    return folder


def replace_folder(staged: Path, target: Path) -> None:
    """Put the finished folder `staged` where `target` is, removing target's earlier contents."""
    if target.exists():
        retired = target.with_name(f'.{target.name}.old-{os.getpid()}')
        os.replace(target, retired)
        os.replace(staged, target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, target)
