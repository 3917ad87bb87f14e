"""ImageFolders: the one listing of their files, the one pixel limit and the one decodability check.

The listing follows torchvision's ``find_classes`` / ``make_dataset`` (class index = position of the folder
name in sorted order, ImageFolder's file extensions, its order), so every backend and the ``.beton``
converter agree with ``torchvision.datasets.ImageFolder`` on the set of files and on every label, with two
differences that keep a damaged folder from hanging a run: only regular files are images (a FIFO, socket
or device named like an image would block whoever opens it; it is listed as a bad file, like an
undecodable one, and nothing opens it), and a folder reached twice through symbolic links (a loop) is
listed once, with a warning. Every image is held to one pixel limit (:data:`PIXEL_LIMIT`, one message):
PIL-based readers through :func:`open_image`, and for decoders of their own (DALI, nvJPEG) the listing
reads each header first (``check_pixels``). The decodability check (full decode with PIL, in parallel
processes, with a progress bar) is what ``fdfast-convert`` runs before writing and what ``--check-only``
runs alone; the loaders use the same test to name or replace files they fail to decode
(``data.on_bad_image``).
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import re
import signal
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension

from fdfast.logging import log

from .base import DataError

LAYOUT = "ROOT/<class>/<image>"


@dataclass(frozen=True)
class ImageFolderListing:
    root: Path
    classes: list[str]
    samples: list[tuple[str, int]]      # (path, label), ImageFolder's order, regular files only
    bad: list[tuple[str, str]] = field(default_factory=list)   # (path, reason): image names that are no images
    ignored: int = 0                    # files in the class folders that are not images by extension


def _not_regular(path: str) -> str:
    """Why ``path``, named like an image, is not a regular file (a FIFO would block whoever opens it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        return f"not a regular file: {'a broken link' if os.path.islink(path) else e.strerror}"
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return f"not a regular file: {what}"
    return "not a regular file"


def _walk(top: str, visited: set[tuple[int, int]]) -> Iterator[tuple[str, list[os.DirEntry]]]:
    """``(folder, its non-folder entries)`` under ``top``, following links to folders as torchvision's
    ``os.walk(followlinks=True)`` does, but entering each folder once: a link back up the tree (a loop) or a
    second link to the same folder is skipped with a warning instead of listing its images again."""
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            info = os.stat(folder)
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            log(f"warning: cannot list '{folder}' ({e.strerror}); its images are left out")
            continue
        if (info.st_dev, info.st_ino) in visited:
            log(f"warning: '{folder}' is a folder already listed (a symbolic link loop or a second link to it); "
                "its images are listed once")
            continue
        visited.add((info.st_dev, info.st_ino))
        yield folder, [e for e in entries if not e.is_dir()]
        stack.extend(os.path.join(folder, e.name) for e in reversed(entries) if e.is_dir())


def list_image_folder(root: str | os.PathLike, key: str, *, check_pixels: bool = False) -> ImageFolderListing:
    """The ImageFolder at ``root`` as ``torchvision.datasets.ImageFolder`` lists it (its classes, extensions
    and order), except that only regular files are images (a FIFO, socket or device named ``x.jpg`` goes to
    ``bad``) and a folder reached twice through links is listed once. ``check_pixels`` also reads every
    image's header (PIL reads no pixels) and lists those over :data:`PIXEL_LIMIT` as bad, for the backends
    whose decoders do not apply the limit themselves (DALI, nvJPEG). ``key`` names where the path came from
    (a config key, a command-line argument) in the errors."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"{key}='{root}' does not exist (expected an ImageFolder: {LAYOUT})")
    if not root.is_dir():
        raise DataError(f"{key}='{root}' is not a folder (expected an ImageFolder: {LAYOUT})")
    try:
        classes, class_to_idx = find_classes(root)
    except FileNotFoundError:
        raise DataError(f"{key}='{root}' has no class sub-folders (expected an ImageFolder: {LAYOUT})") from None
    samples, bad, ignored, visited = [], [], 0, set()
    directory = os.path.expanduser(str(root))
    for name in sorted(class_to_idx):
        # torchvision sorts the (folder, files) pairs of its walk, then each folder's file names
        for folder, entries in sorted(_walk(os.path.join(directory, name), visited), key=lambda w: w[0]):
            for entry in entries:
                path = os.path.join(folder, entry.name)
                if not has_file_allowed_extension(entry.name, IMG_EXTENSIONS):
                    ignored += 1
                elif entry.is_file():          # S_ISREG after following links
                    samples.append((path, class_to_idx[name]))
                else:
                    bad.append((path, _not_regular(path)))
    if check_pixels:
        samples, bad = _over_the_pixel_limit(samples, bad)
    if not samples:
        listed = f" ({len(bad)} not readable, e.g. '{bad[0][0]}': {bad[0][1]})" if bad else ""
        raise DataError(f"{key}='{root}' holds no images ({', '.join(IMG_EXTENSIONS)}) in its {len(classes)} "
                        f"class folders{listed}")
    return ImageFolderListing(root, classes, samples, bad, ignored)


# ----------------------------------------------------------------------------------------------
# One pixel limit for every backend and the converter
# ----------------------------------------------------------------------------------------------
PIXEL_LIMIT = Image.MAX_IMAGE_PIXELS
"""Images with more pixels are refused (a decompression bomb decodes a small file into gigabytes): PIL's
default ``MAX_IMAGE_PIXELS`` (89,478,485, e.g. 9459 x 9459), read once at import."""


class ImageTooLarge(ValueError):
    """An image over :data:`PIXEL_LIMIT`."""


def too_many_pixels(size: str) -> str:
    """The one message for an image over the limit; ``size`` is ``W x H = N pixels`` or ``N pixels``."""
    return (f"{size} is over the limit of {PIXEL_LIMIT:,} pixels (a decompression bomb?); downscale the image "
            "or remove it")


def open_image(path: str) -> Image.Image:
    """PIL's lazy ``Image.open`` (it reads the header only) with :data:`PIXEL_LIMIT` applied."""
    try:
        im = Image.open(path)   # between PIL's limit and twice it PIL only warns: refused below
    except Image.DecompressionBombError as e:   # PIL's own refusal, at twice its limit
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageTooLarge(too_many_pixels(f"{int(found.group(1)):,} pixels" if found else "the image")) from None
    w, h = im.size
    if w * h > PIXEL_LIMIT:
        im.close()
        raise ImageTooLarge(too_many_pixels(f"{w} x {h} = {w * h:,} pixels"))
    return im


def load_rgb(path: str) -> Image.Image:
    """The image at ``path`` as RGB, as ``torchvision.datasets.folder.pil_loader`` reads it, within the limit."""
    with open_image(path) as im:
        return im.convert("RGB")


def _pixel_problem(path: str) -> str | None:
    try:
        open_image(path).close()
    except ImageTooLarge as e:
        return str(e)
    except Exception:  # noqa: BLE001 - not an image PIL knows: the decoder reports it as undecodable
        pass
    return None


def _over_the_pixel_limit(samples: list[tuple[str, int]], bad: list[tuple[str, str]]):
    """(samples within the limit, bad + those over it), reading the headers in threads (I/O bound)."""
    with ThreadPoolExecutor(max_workers=min(32, max(4, os.cpu_count() or 1))) as pool:
        problems = list(pool.map(_pixel_problem, [p for p, _ in samples], chunksize=64))
    over = [(p, why) for (p, _), why in zip(samples, problems) if why is not None]
    return [s for s, why in zip(samples, problems) if why is None], bad + over


def why_undecodable(path: str, error: Exception) -> str:
    """A short reason for the failure to decode ``path`` (PIL's own messages repeat the path)."""
    if isinstance(error, UnidentifiedImageError):
        with contextlib.suppress(OSError):
            if os.path.getsize(path) == 0:
                return "empty file"
        return "not an image file PIL can identify"
    return f"{type(error).__name__}: {error}".strip()


def decode_fully(path: str) -> tuple[int, int]:
    """``(w, h)`` of ``path`` after checking its structure and decoding every pixel; raises PIL's error (or
    :class:`ImageTooLarge` before decoding anything)."""
    with open_image(path) as im:
        im.verify()                         # structure / checksums (PNG CRCs, ...)
    with open_image(path) as im:            # verify() leaves the image unusable: reopen
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


def check_images(paths: Sequence[str], *, workers: int, progress: ProgressBars, label: str,
                 poll: Callable[[], None] = lambda: None) -> Iterator[tuple[str, str | None, tuple[int, int]]]:
    """:func:`check_image` of every path in ``workers`` processes, yielded as they finish, with a bar.
    ``poll`` runs at least every 0.1 s, also while no worker finishes (one stuck on a slow or hung file),
    so a stop request raised from it is acted on. Leaving the loop early terminates the workers."""
    task = progress.add_task(label, total=len(paths))
    size = max(1, min(64, len(paths) // (4 * workers)))
    chunks = [list(paths[i:i + size]) for i in range(0, len(paths), size)]
    with mp.Pool(workers, initializer=ignore_signals) as pool:
        try:
            # chunks by hand: imap_unordered's own chunksize returns a generator, whose next() cannot time out
            results = pool.imap_unordered(_check_chunk, chunks)
            while True:
                poll()
                try:
                    done = results.next(timeout=0.1)
                except mp.TimeoutError:
                    continue
                except StopIteration:
                    return
                progress.update(task, advance=len(done))
                yield from done
        finally:
            pool.terminate()


def _check_chunk(paths: list[str]) -> list[tuple[str, str | None, tuple[int, int]]]:
    return [check_image(p) for p in paths]
