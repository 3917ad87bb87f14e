"""ImageFolder -> FFCV ``.beton``: the converter behind ``fdfast-convert``.

Layout and labels are ``torchvision.datasets.ImageFolder``'s (:mod:`pipelines.folder`), so a model trained
from the ``.beton`` and one trained from the folder agree on labels.

Defaults reproduce ffcv-imagenet's ImageNet recipe (``write_imagenet.sh 500 0.50 90``:
``write_mode='proportion'``, ``max_resolution=500``, ``compress_probability=0.5``,
``jpeg_quality=90``): half of the images are stored as raw pixels (no decode cost), half re-encoded
as JPEG, all with the longer side capped at 500 px.

Why the extra care around ``ffcv.writer.DatasetWriter``:

* FFCV allocates one metadata slot per sample before writing, and a worker that raises on a sample
  dies while the parent polls its progress counter forever. So every file is decoded once up front
  (:func:`pipelines.folder.check_images`); unreadable, truncated, non-image files and images over the
  pixel limit are skipped and listed (``strict``: the run stops and names the file, and removes the output
  folders it created) before anything is written. Names that are no regular files (a FIFO) come from the
  listing and are never opened.
* A stop request is acted on at least every 0.1 s while checking, even when a worker hangs on a file.
* The written file is read back through :func:`pipelines.beton.check_beton` before it gets its name.
* The writer's collection loop is replaced (:func:`_writer_class`, which names the upstream defects).
* The file is written under a temporary name by :func:`fdfast.files.atomic_write` and renamed only
  once complete and readable, so a ``.beton`` that exists is a whole one; on errors, Ctrl-C or SIGTERM the
  temporary file is removed, and one left by a killed run is removed by the next run.
* ``write_mode='proportion'`` draws from numpy's global RNG inside the workers; we seed it per image
  from ``(seed, index)`` so the same input gives the same file whatever the number of workers.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing import Process, Queue, Value
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape

from fdfast.files import atomic_write, make_folder, missing_folders, remove_empty_folders

from .base import DataError
from .beton import check_beton
from .folder import ProgressBars, check_images, ignore_signals, list_image_folder, load_rgb

SPLITS = ("train", "val")
WRITE_MODES = ("raw", "jpg", "smart", "proportion")
# ffcv-imagenet's recipe (write_imagenet.sh 500 0.50 90, write_mode=proportion)
DEFAULT_WRITE_MODE = "proportion"
DEFAULT_MAX_RESOLUTION = 500
DEFAULT_COMPRESS_PROBABILITY = 0.5
DEFAULT_JPEG_QUALITY = 90
INSTALL_HINT = "install it with: bash scripts/install_optional_deps.sh .venv/bin/python (or pip install 'fdfast[ffcv]')"


class BadImageError(DataError):
    """A file that cannot be decoded, under ``strict``."""


class Interrupted(KeyboardInterrupt):
    """A stop request (SIGTERM, Ctrl-C), acted on at one of the converter's check points."""


# A KeyboardInterrupt raised by a signal handler lands wherever the main thread is. When that is code
# run by exec() of a string (multiprocessing.sharedctypes builds Value's properties that way), CPython
# marks the interrupt "unhandled" even though it is caught, and at exit kills the process with SIGINT
# (status -2) instead of returning 130. So under stop_on_signals() the handlers only set this flag, and
# check_stop() raises at points of our own: between images, every 0.1 s of writing, before the rename.
_STOP = threading.Event()


def check_stop() -> None:
    if _STOP.is_set():
        raise Interrupted


@contextlib.contextmanager
def stop_on_signals():
    """SIGTERM and Ctrl-C request a clean stop (see ``_STOP``); a second one interrupts at once, for a
    phase without check points (listing a huge folder)."""
    if threading.current_thread() is not threading.main_thread():   # handlers can only be set there
        yield
        return

    def request_stop(signum, frame):
        if _STOP.is_set():
            raise KeyboardInterrupt
        _STOP.set()

    _STOP.clear()
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _STOP.clear()


@dataclass
class ConvertResult:
    out: Path
    images: int
    classes: int
    bytes: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    ignored: int = 0                                                # files without an image extension


def spread_subset(samples: list[tuple[str, int]], max_images: int) -> list[tuple[str, int]]:
    """Deterministic subset of ``max_images`` samples taken round-robin over the classes (first file
    of every class, then the second, ...), returned in the original (class, path) order."""
    if max_images >= len(samples):
        return samples
    by_class: dict[int, list[int]] = {}
    for i, (_, label) in enumerate(samples):
        by_class.setdefault(label, []).append(i)
    picked: list[int] = []
    rank = 0
    while len(picked) < max_images:
        for label in sorted(by_class):
            if rank < len(by_class[label]):
                picked.append(by_class[label][rank])
                if len(picked) == max_images:
                    break
        rank += 1
    return [samples[i] for i in sorted(picked)]


class FolderSamples:
    """Indexable ``(PIL RGB image, label)`` source for ``DatasetWriter.from_indexed_dataset``."""

    def __init__(self, samples: Sequence[tuple[str, int]], seed: int):
        self.samples = list(samples)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        # RGBImageField(write_mode='proportion') flips a coin with np.random right after this call
        np.random.seed([self.seed, index])
        path, label = self.samples[index]
        return load_rgb(path), label        # grayscale / RGBA / palette -> RGB, as ImageFolder does


def _run_writer_worker(work_fn: Callable, *args) -> None:
    ignore_signals()
    work_fn(*args)


def _writer_class():
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    class _Writer(DatasetWriter):
        """``DatasetWriter`` with its private ``_write_common`` replaced, for these defects of upstream's
        (ffcv 1.0.2): (1) its loop polls the shared done-counter until it reaches the sample count, so a
        worker that dies (an exception on a sample, a crash) hangs the parent forever; (2) on any error its
        ``metadata_sm`` shared-memory block is never unlinked and stays in /dev/shm; (3) it fills the work
        queue before forking the workers, and the first ``put()`` starts the queue's feeder thread, so the
        workers are forked from a threaded process (which can deadlock them); (4) its tqdm bar cannot
        be drawn with ours nor report to a caller. Here the loop reports through ``on_progress``, raises
        when a worker died, always unlinks the shared memory, and forks before the first ``put()``."""

        on_progress: Callable[[int], None] = staticmethod(lambda done: None)

        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()                  # header + field descriptors; creates self.metadata_sm
            processes: list = []
            try:
                work_queue: Queue = Queue()
                allocations_queue: Queue = Queue()
                done_number = Value(ctypes.c_uint64, 0)
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                args = (work_queue, self.metadata_sm, self.metadata_type, self.fields, allocator,
                        done_number, allocations_queue, *extra_worker_args)
                processes = [Process(target=_run_writer_worker, args=(work_fn, *args), daemon=True)
                             for _ in range(self.num_workers)]
                for p in processes:
                    p.start()
                for todo in queue_content:
                    work_queue.put(todo)
                for _ in range(self.num_workers):
                    work_queue.put(None)
                allocations: list = []
                finished = 0
                # Each worker sends its allocation table once, after flushing its last page.
                while finished < len(processes):
                    try:
                        allocations.extend(allocations_queue.get(timeout=0.1))
                        finished += 1
                    except queue.Empty:
                        dead = [p for p in processes if p.exitcode not in (None, 0)]
                        if dead:
                            raise RuntimeError(f"an FFCV writer worker died (exit code {dead[0].exitcode}); "
                                               "its error is printed above")
                    self.on_progress(int(done_number.value))
                for p in processes:
                    p.join()
                self.finalize(allocations)
            finally:
                for p in processes:
                    if p.is_alive():
                        p.terminate()
                        p.join(5)
                        if p.is_alive():
                            p.kill()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return _Writer


def _page_size(sizes: Sequence[tuple[int, int]], max_resolution: int | None) -> int:
    """FFCV's default 8 MiB page (ffcv-imagenet), 2 MiB for sets under 64 MiB of pixels (each worker
    pads its last page, so small trial files would be mostly padding), and always a power of two that
    holds the largest image stored raw."""
    from ffcv.writer import MIN_PAGE_SIZE

    largest = total = 0
    for w, h in sizes:
        s = 1.0 if not max_resolution else min(1.0, max_resolution / max(w, h))
        nbytes = int(w * s + 1) * int(h * s + 1) * 3
        largest, total = max(largest, nbytes), total + nbytes
    page = MIN_PAGE_SIZE if total < 64 * 2**20 else 4 * MIN_PAGE_SIZE
    while page < largest + 4096:
        page *= 2
    return page


def _remove_stale_temps(out: Path) -> None:
    """Delete the temporary files of ``out`` left by killed runs: ``atomic_write`` names them
    ``.<name>.<pid>.<token>.tmp``, and a run whose pid is gone will not finish its file."""
    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        try:
            os.kill(int(tmp.name[len(out.name) + 2:].split(".")[0]), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


def _workers(num_workers: int | None, n: int) -> int:
    return max(1, min(num_workers or os.cpu_count() or 1, n))


def _select(src: Path, max_images: int | None):
    listing = list_image_folder(src, "SRC")
    samples = listing.samples
    if max_images is not None:
        if max_images < 1:
            raise DataError(f"--max-images must be >= 1, got {max_images}")
        samples = spread_subset(samples, max_images)
    return listing, samples


def _refuse(path: str, reason: str) -> BadImageError:
    return BadImageError(f"cannot read image '{path}' ({reason}); remove or replace it, or drop --strict to skip "
                         "unreadable files")


def _check(paths: list[str], listed_bad: list[tuple[str, str]], *, workers: int, strict: bool,
           progress: ProgressBars, label: str) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str]]]:
    """``({path: (w, h)} of the decodable files, sorted [(path, reason)] of the others)``; ``listed_bad``:
    what the listing already found (files that are no regular files), never opened."""
    if strict and listed_bad:
        raise _refuse(*listed_bad[0])
    sizes: dict[str, tuple[int, int]] = {}
    bad: list[tuple[str, str]] = list(listed_bad)
    # closing(): leaving early must stop the worker pool now, not when the traceback lets go of the generator
    with contextlib.closing(check_images(paths, workers=workers, progress=progress, label=label,
                                         poll=check_stop)) as results:
        for path, reason, size in results:
            if reason is None:
                sizes[path] = size
            elif strict:
                raise _refuse(path, reason)
            else:
                bad.append((path, reason))
    return sizes, sorted(bad)


def _report_bad(console, bad: list[tuple[str, str]], verb: str) -> None:
    for path, reason in bad:
        console.print(f"[yellow]{verb}[/] {escape(path)}: {escape(reason)}", highlight=False, soft_wrap=True)


def check_folder(src: str | os.PathLike, *, console: Console | None = None, num_workers: int | None = None,
                 max_images: int | None = None) -> ConvertResult:
    """Only decode every image of ``src`` and list the unreadable ones (``--check-only``; no FFCV needed):
    the check for folders read directly by the torchvision, nvJPEG and DALI backends."""
    src, console = Path(src), console or Console(stderr=True)
    t0 = time.perf_counter()
    listing, samples = _select(src, max_images)
    with ProgressBars(console) as progress:
        sizes, bad = _check([p for p, _ in samples], listing.bad, workers=_workers(num_workers, len(samples)),
                            strict=False, progress=progress, label=f"check {src.name}")
    _report_bad(console, bad, "unreadable")
    return ConvertResult(out=src, images=len(sizes), classes=len(listing.classes), bytes=0,
                         seconds=time.perf_counter() - t0, skipped=bad, ignored=listing.ignored)


def convert_folder(src: str | os.PathLike, out: str | os.PathLike, *, console: Console | None = None,
                   max_resolution: int | None = DEFAULT_MAX_RESOLUTION, write_mode: str = DEFAULT_WRITE_MODE,
                   compress_probability: float = DEFAULT_COMPRESS_PROBABILITY, jpeg_quality: int = DEFAULT_JPEG_QUALITY,
                   num_workers: int | None = None, chunk_size: int = 100, max_images: int | None = None,
                   strict: bool = False, overwrite: bool = False, seed: int = 0) -> ConvertResult:
    """Write the ImageFolder ``src`` to the FFCV file ``out``; see the module docstring."""
    try:
        from ffcv.fields import IntField, RGBImageField
    except (ImportError, OSError) as e:
        raise DataError(f"FFCV is not installed ({e}); {INSTALL_HINT}") from None

    src, out, console = Path(src), Path(out), console or Console(stderr=True)
    t0 = time.perf_counter()
    if out.exists() and not overwrite:
        raise DataError(f"'{out}' already exists; pass --overwrite to replace it")
    if write_mode not in WRITE_MODES:
        raise DataError(f"--write-mode {write_mode!r} is not one of {', '.join(WRITE_MODES)}")
    listing, samples = _select(src, max_images)
    created = missing_folders(out.parent)
    make_folder(out.parent)  # before decoding every image, not after
    workers = _workers(num_workers, len(samples))
    try:
        with ProgressBars(console) as progress:
            sizes, skipped = _check([p for p, _ in samples], listing.bad, workers=workers, strict=strict,
                                    progress=progress, label=f"check {src.name}")
            good = [(p, y) for p, y in samples if p in sizes]
            if not good:
                raise DataError(f"none of the {len(samples)} images in '{src}' could be read "
                                f"(first error: {skipped[0][0]}: {skipped[0][1]})")
            _report_bad(console, skipped, "skipped")
            image_field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                        jpeg_quality=jpeg_quality, compress_probability=compress_probability)
            task = progress.add_task(f"write {out.name}", total=len(good))

            def on_progress(done: int) -> None:
                progress.update(task, completed=done)
                check_stop()

            def write(tmp: Path) -> None:
                writer = _writer_class()(str(tmp), {"image": image_field, "label": IntField()},
                                         page_size=_page_size(list(sizes.values()), max_resolution),
                                         num_workers=workers)
                writer.on_progress = on_progress
                writer.from_indexed_dataset(FolderSamples(good, seed),
                                            chunksize=max(1, min(chunk_size, math.ceil(len(good) / (4 * workers)))))
                n = len(check_beton(tmp, "OUT"))    # a file that does not read back must not get the final name
                if n != len(good):
                    raise RuntimeError(f"{tmp} holds {n} samples, expected {len(good)}")
                check_stop()

            _remove_stale_temps(out)
            atomic_write(out, write)
            progress.update(task, completed=len(good))
    except BaseException:
        remove_empty_folders(created)  # a refused or stopped conversion leaves no empty output folder behind
        raise
    return ConvertResult(out=out, images=len(good), classes=len(listing.classes), bytes=out.stat().st_size,
                         seconds=time.perf_counter() - t0, skipped=skipped, ignored=listing.ignored)


def plan_jobs(src: Path, out: Path | None, splits: Sequence[str] | None) -> list[tuple[Path, Path | None]]:
    """``[(split folder, .beton path)]``: ``SRC/{train,val}`` into ``OUT/{split}.beton`` when SRC
    holds split folders, else SRC itself into OUT (a ``.beton`` path, or a folder for ``<name>.beton``).
    ``out=None`` (``--check-only``) plans the folders alone."""
    if not src.exists():
        raise DataError(f"source folder '{src}' does not exist")
    present = [s for s in SPLITS if (src / s).is_dir()]
    if present:
        if out is not None and out.suffix == ".beton":
            raise DataError(f"'{src}' holds split folders ({', '.join(present)}); OUT must be a folder "
                            f"to receive {', '.join(s + '.beton' for s in present)}, not '{out}'")
        wanted = list(splits) if splits else present
        missing = [s for s in wanted if s not in present]
        if missing:
            raise DataError(f"split folder '{src / missing[0]}' does not exist (found: {', '.join(present)})")
        return [(src / s, None if out is None else out / f"{s}.beton") for s in wanted]
    if splits:
        raise DataError(f"--splits given but '{src}' has no {' or '.join(SPLITS)} sub-folder")
    if out is None:
        return [(src, None)]
    return [(src, out if out.suffix == ".beton" else out / f"{src.resolve().name}.beton")]
