"""ImageFolders: the one listing of their files and the one decodability check.

The listing is torchvision's own ``find_classes`` / ``make_dataset`` (class index = position of the folder
name in sorted order, ImageFolder's file extensions), so every backend and the ``.beton`` converter agree
with ``torchvision.datasets.ImageFolder`` on the set of files and on every label. The decodability check
(full decode with PIL, in parallel processes, with a progress bar) is what ``fdfast-convert`` runs before
writing and what ``--check-only`` runs alone; the loaders use the same test to name or replace files they
fail to decode (``data.on_bad_image``).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .base import DataError

LAYOUT = "ROOT/<class>/<image>"


@dataclass(frozen=True)
class ImageFolderListing:
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]      # (path, label), ImageFolder's order

    def ignored_files(self) -> int:
        """Files in the class folders that are not images by extension (a second walk of the folder)."""
        n_files = sum(len(files) for c in self.classes for _, _, files in os.walk(self.root / c, followlinks=True))
        return n_files - len(self.samples)


def list_image_folder(root: str | os.PathLike, key: str) -> ImageFolderListing:
    """The ImageFolder at ``root`` exactly as ``torchvision.datasets.ImageFolder`` lists it; ``key`` names
    where the path came from (a config key, a command-line argument) in the errors."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{key}='{root}' does not exist (expected an ImageFolder: {LAYOUT})")
    if not root.is_dir():
        raise DataError(f"{key}='{root}' is not a folder (expected an ImageFolder: {LAYOUT})")
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise DataError(f"{key}='{root}' has no class sub-folders (expected an ImageFolder: {LAYOUT})") from None
    samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise DataError(f"{key}='{root}' holds no images ({', '.join(IMG_EXTENSIONS)}) in its {len(classes)} "
                        "class folders")
    return ImageFolderListing(root, classes, samples)


def why_undecodable(path: str, error: Exception) -> str:
    """A short reason for the failure to decode ``path`` (PIL's own messages repeat the path)."""
    if isinstance(error, UnidentifiedImageError):
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == 0:
                return "empty file"
        return "not an image file PIL can identify"
    return f"{type(error).__name__}: {error}".strip()


def decode_fully(path: str) -> tuple[int, int]:
    """``(w, h)`` of ``path`` after checking its structure and decoding every pixel; raises PIL's error."""
    with Image.open(path) as im:
        im.verify()                         # structure / checksums (PNG CRCs, ...)
    with Image.open(path) as im:            # verify() leaves the image unusable: reopen
        im.load()                           # full decode: catches truncated data
        return im.size


def check_image(path: str) -> tuple[str, str | None, tuple[int, int]]:
    """``(path, None, (w, h))`` if ``path`` decodes fully, else ``(path, reason, (0, 0))``."""
    try:
        return path, None, decode_fully(path)
    except Exception as e:  # noqa: BLE001 - any failure means "unusable", with the reason
        return path, why_undecodable(path, e), (0, 0)


def find_undecodable(paths: Sequence[str]) -> list[tuple[str, str]]:
    """``[(path, reason)]`` of the files among ``paths`` that do not decode (in this process: a few files)."""
    return [(p, why) for p, why, _ in map(check_image, paths) if why is not None]


def next_readable(samples: Sequence[tuple[str, int]], index: int, decode: Callable[[str], Any],
                  bad: list[tuple[str, str]]) -> tuple[int, Any]:
    """``(j, decode(path_j))`` for the first sample ``j`` from ``index`` on, in folder order and wrapping
    around, that ``decode`` accepts; every file it rejects is appended to ``bad`` as ``(path, reason)``."""
    for k in range(len(samples)):
        j = (index + k) % len(samples)
        try:
            return j, decode(samples[j][0])
        except Exception as e:  # noqa: BLE001 - any failure: try the next file
            bad.append((samples[j][0], why_undecodable(samples[j][0], e)))
    raise DataError(f"none of the {len(samples)} images can be decoded (first: '{bad[0][0]}': {bad[0][1]}); "
                    "`fdfast-convert --check-only` lists every undecodable file of a folder")


def ignore_signals() -> None:
    """Worker initialiser: Ctrl-C reaches the whole process group, but only the parent decides how the
    workers stop (``terminate()``, i.e. SIGTERM with its default action)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class ProgressBars:
    """rich progress bars redrawn from the caller's loop (at most 10x a second) instead of by rich's
    refresh thread: the converter forks worker processes while the bars are live, and forking a process
    that runs other threads can deadlock the children on locks those threads held."""

    def __init__(self, console):
        self.bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=console, auto_refresh=False)
        self._last = 0.0

    def __enter__(self) -> ProgressBars:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bars.refresh()
        self.bars.__exit__(*exc)

    def add_task(self, description: str, total: int):
        task = self.bars.add_task(description, total=total)
        self.bars.refresh()
        return task

    def update(self, task, *, advance: int = 0, completed: int | None = None) -> None:
        self.bars.update(task, advance=advance, completed=completed)
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self.bars.refresh()


def check_images(paths: Sequence[str], *, workers: int, progress: ProgressBars, label: str
                 ) -> Iterator[tuple[str, str | None, tuple[int, int]]]:
    """:func:`check_image` of every path in ``workers`` processes, yielded as they finish, with a bar.
    Leaving the loop early (an exception, a stop request) terminates the workers."""
    task = progress.add_task(label, total=len(paths))
    chunk = max(1, min(64, len(paths) // (4 * workers)))
    with mp.Pool(workers, initializer=ignore_signals) as pool:
        try:
            for result in pool.imap_unordered(check_image, paths, chunksize=chunk):
                progress.update(task, advance=1)
                yield result
        finally:
            pool.terminate()
