"""fdfast-convert: turn an ImageFolder into FFCV ``.beton`` files.

    fdfast-convert IMAGENET_ROOT OUT_DIR            # ROOT/train, ROOT/val -> OUT_DIR/{train,val}.beton
    fdfast-convert ROOT/train out/train.beton       # one split
    fdfast-convert --check-only ROOT                # list unreadable images, write nothing

Layout and labels follow ``torchvision.datasets.ImageFolder`` exactly (its own ``find_classes`` /
``make_dataset``: class index = position of the folder name in sorted order, the same file
extensions), so a model trained from the ``.beton`` and one trained from the folder agree on labels.

Defaults reproduce ffcv-imagenet's ImageNet recipe (``write_imagenet.sh 500 0.50 90``:
``write_mode='proportion'``, ``max_resolution=500``, ``compress_probability=0.5``,
``jpeg_quality=90``): half of the images are stored as raw pixels (no decode cost), half re-encoded
as JPEG, all with the longer side capped at 500 px.

Why the extra care around ``ffcv.writer.DatasetWriter``:

* FFCV allocates one metadata slot per sample before writing, and a worker that raises on a sample
  dies while the parent polls its progress counter forever. So every file is decoded once up front
  (PIL ``verify`` + full ``load``, in parallel); unreadable, truncated or non-image files are skipped
  and listed (``--strict``: the run stops and names the file) before anything is written.
* The writer's own progress loop is replaced (see :class:`_Writer`) to draw a rich progress bar,
  to fail instead of hang when a worker dies, to release its shared memory on every exit path, and
  to fork its workers before any helper thread runs (forking a threaded process can deadlock).
* The file is written to ``<out>.tmp-<pid>`` and renamed only once complete and readable, so a
  ``.beton`` that exists is a whole one; on errors, Ctrl-C or SIGTERM the temporary file is removed.
* ``write_mode='proportion'`` draws from numpy's global RNG inside the workers; we seed it per image
  from ``(--seed, index)`` so the same input gives the same file whatever ``--num-workers`` is.
"""
from __future__ import annotations

import argparse
import ctypes
import math
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

PROG = "fdfast-convert"
SPLITS = ("train", "val")

# ffcv-imagenet's recipe (write_imagenet.sh 500 0.50 90, write_mode=proportion)
DEFAULT_WRITE_MODE = "proportion"
DEFAULT_MAX_RESOLUTION = 500
DEFAULT_COMPRESS_PROBABILITY = 0.5
DEFAULT_JPEG_QUALITY = 90
INSTALL_HINT = "install it with: bash scripts/install_optional_deps.sh .venv/bin/python (or pip install 'fdfast[ffcv]')"


_STOP = threading.Event()   # set by SIGTERM; checked between work items and before the final rename


def _check_stop() -> None:
    if _STOP.is_set():
        raise KeyboardInterrupt


class ConvertError(Exception):
    """A problem with the input or output the user has to fix; printed as one line, exit code 2."""


class BadImageError(ConvertError):
    """A file that cannot be decoded, under --strict."""


@dataclass
class ConvertResult:
    out: Path
    images: int
    classes: int
    bytes: int
    seconds: float
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (path, reason)
    ignored: int = 0                                                # files without an image extension


# ----------------------------------------------------------------------------------------------
# Input discovery (torchvision's ImageFolder rules)
# ----------------------------------------------------------------------------------------------
def list_samples(src: Path) -> tuple[list[str], list[tuple[str, int]], int]:
    """``(classes, [(path, label)], n_ignored)`` with ImageFolder's class order and extensions."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    if not src.exists():
        raise ConvertError(f"source folder '{src}' does not exist")
    if not src.is_dir():
        raise ConvertError(f"source '{src}' is not a folder (expected an ImageFolder: {src}/<class>/<image>)")
    try:
        classes, class_to_idx = find_classes(src)
    except FileNotFoundError:
        raise ConvertError(f"'{src}' has no class sub-folders (expected {src}/<class>/<image>, "
                           f"or {src}/train and {src}/val holding them)") from None
    samples = make_dataset(str(src), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise ConvertError(f"no images ({', '.join(IMG_EXTENSIONS)}) in the {len(classes)} class "
                           f"folders of '{src}'")
    n_files = sum(len(files) for c in classes for _, _, files in os.walk(src / c, followlinks=True))
    return classes, samples, n_files - len(samples)


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


# ----------------------------------------------------------------------------------------------
# Worker-side functions (top level: they run in other processes)
# ----------------------------------------------------------------------------------------------
def _ignore_sigint() -> None:
    # Ctrl-C reaches the whole process group; the parent alone decides how to stop the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def check_image(path: str) -> tuple[str, str | None, tuple[int, int]]:
    """Decode ``path`` fully; ``(path, None, (w, h))`` if usable, else ``(path, reason, (0, 0))``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()                     # structure / checksums (PNG CRCs, ...)
        with Image.open(path) as im:        # verify() leaves the image unusable: reopen
            im.load()                       # full decode: catches truncated data
            return path, None, im.size
    except Exception as e:  # noqa: BLE001 - any failure means "skip this file", with the reason
        return path, f"{type(e).__name__}: {e}".strip(), (0, 0)


class FolderSamples:
    """Indexable ``(PIL RGB image, label)`` source for ``DatasetWriter.from_indexed_dataset``."""

    def __init__(self, samples: Sequence[tuple[str, int]], seed: int):
        self.samples = list(samples)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        # RGBImageField(write_mode='proportion') flips a coin with np.random right after this call
        np.random.seed([self.seed, index])
        path, label = self.samples[index]
        with Image.open(path) as im:
            rgb = im.convert("RGB")         # grayscale / RGBA / palette -> RGB, as ImageFolder does
        return rgb, label


def _run_writer_worker(work_fn: Callable, *args) -> None:
    _ignore_sigint()
    work_fn(*args)


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------
def _writer_class():
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter
    from multiprocessing import Process, Queue, Value

    class _Writer(DatasetWriter):
        """``DatasetWriter`` whose collection loop reports progress through a callback, raises when a
        worker dies (upstream polls forever) and always unlinks its shared memory."""

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
                for p in processes:     # fork first: the first put() starts the queue's feeder thread
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
    """Delete ``<out>.tmp-<pid>`` files left by runs that were killed (their pid is gone)."""
    for tmp in out.parent.glob(out.name + ".tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            pass


class _Progress:
    """rich progress bars redrawn from the caller's loop (at most 10x a second) instead of by rich's
    refresh thread: the workers are forked while the bars are live, and forking a process that runs
    other threads can deadlock the children on locks those threads held."""

    def __init__(self, console):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TimeRemainingColumn(), console=console, auto_refresh=False)
        self._last = 0.0

    def __enter__(self) -> "_Progress":
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


def check_images(paths: Sequence[str], *, workers: int, strict: bool, progress, label: str
                 ) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str]]]:
    """Decode every file in parallel: ``({path: (w, h)} of the good ones, [(path, reason)] of the bad)``.
    With ``strict`` the first bad file raises :class:`BadImageError` naming it."""
    import multiprocessing as mp

    sizes: dict[str, tuple[int, int]] = {}
    bad: list[tuple[str, str]] = []
    task = progress.add_task(label, total=len(paths))
    chunk = max(1, min(64, len(paths) // (4 * workers)))
    with mp.Pool(workers, initializer=_ignore_sigint) as pool:
        try:
            for path, reason, size in pool.imap_unordered(check_image, paths, chunksize=chunk):
                progress.update(task, advance=1)
                _check_stop()
                if reason is None:
                    sizes[path] = size
                elif strict:
                    raise BadImageError(f"cannot read image '{path}' ({reason}); remove or replace it, "
                                        "or drop --strict to skip unreadable files")
                else:
                    bad.append((path, reason))
        finally:
            pool.terminate()
    return sizes, sorted(bad)


def _report_bad(console, bad: list[tuple[str, str]], verb: str) -> None:
    from rich.markup import escape

    for path, reason in bad:
        console.print(f"[yellow]{verb}[/] {escape(path)}: {escape(reason)}", highlight=False, soft_wrap=True)


def _select(src: Path, max_images: int | None):
    classes, samples, ignored = list_samples(src)
    if max_images is not None:
        if max_images < 1:
            raise ConvertError(f"--max-images must be >= 1, got {max_images}")
        samples = spread_subset(samples, max_images)
    return classes, samples, ignored


def _workers(num_workers: int | None, n: int) -> int:
    return max(1, min(num_workers or os.cpu_count() or 1, n))


def check_folder(src: str | os.PathLike, *, num_workers: int | None = None, max_images: int | None = None,
                 console=None) -> ConvertResult:
    """Only decode every image of ``src`` and list the unreadable ones (``--check-only``; no FFCV needed):
    a check for folders read directly by the torchvision and DALI backends."""
    from rich.console import Console

    import torchvision.datasets.folder  # noqa: F401 - imported before the clock starts

    console = console or Console(stderr=True)
    src = Path(src)
    t0 = time.perf_counter()
    classes, samples, ignored = _select(src, max_images)
    with _Progress(console) as progress:
        sizes, bad = check_images([p for p, _ in samples], workers=_workers(num_workers, len(samples)),
                                  strict=False, progress=progress, label=f"check {src.name}")
    _report_bad(console, bad, "unreadable")
    return ConvertResult(out=src, images=len(sizes), classes=len(classes), bytes=0,
                         seconds=time.perf_counter() - t0, skipped=bad, ignored=ignored)


def convert_folder(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    max_resolution: int | None = DEFAULT_MAX_RESOLUTION,
    write_mode: str = DEFAULT_WRITE_MODE,
    compress_probability: float = DEFAULT_COMPRESS_PROBABILITY,
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    num_workers: int | None = None,
    chunk_size: int = 100,
    max_images: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    console=None,
) -> ConvertResult:
    """Write the ImageFolder ``src`` to the FFCV file ``out``; see the module docstring."""
    from rich.console import Console

    try:
        from ffcv.fields import IntField, RGBImageField
        from ffcv.reader import Reader
    except (ImportError, OSError) as e:
        raise ConvertError(f"FFCV is not installed ({e}); {INSTALL_HINT}") from None
    import torchvision.datasets.folder  # noqa: F401 - imported before the clock starts

    console = console or Console(stderr=True)
    src, out = Path(src), Path(out)
    t0 = time.perf_counter()
    if out.exists() and not overwrite:
        raise ConvertError(f"'{out}' already exists; pass --overwrite to replace it")
    if write_mode not in ("raw", "jpg", "smart", "proportion"):
        raise ConvertError(f"--write-mode {write_mode!r} is not one of raw, jpg, smart, proportion")
    classes, samples, ignored = _select(src, max_images)
    workers = _workers(num_workers, len(samples))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    with _Progress(console) as progress:
        sizes, skipped = check_images([p for p, _ in samples], workers=workers, strict=strict,
                                      progress=progress, label=f"check {src.name}")
        good = [(p, y) for p, y in samples if p in sizes]
        if not good:
            raise ConvertError(f"none of the {len(samples)} images in '{src}' could be read "
                               f"(first error: {skipped[0][0]}: {skipped[0][1]})")
        _report_bad(console, skipped, "skipped")

        _remove_stale_temps(out)
        Writer = _writer_class()
        image_field = RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                    jpeg_quality=jpeg_quality, compress_probability=compress_probability)
        writer = Writer(str(tmp), {"image": image_field, "label": IntField()},
                        page_size=_page_size(list(sizes.values()), max_resolution), num_workers=workers)
        task = progress.add_task(f"write {out.name}", total=len(good))
        def on_progress(done: int) -> None:
            progress.update(task, completed=done)
            _check_stop()

        writer.on_progress = on_progress
        chunk = max(1, min(chunk_size, math.ceil(len(good) / (4 * workers))))
        try:
            writer.from_indexed_dataset(FolderSamples(good, seed), chunksize=chunk)
            reader = Reader(str(tmp))      # a file we cannot read back must not get the final name
            if int(reader.num_samples) != len(good):
                raise RuntimeError(f"{tmp} holds {reader.num_samples} samples, expected {len(good)}")
            _check_stop()
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        progress.update(task, completed=len(good))
    return ConvertResult(out=out, images=len(good), classes=len(classes), bytes=out.stat().st_size,
                         seconds=time.perf_counter() - t0, skipped=skipped, ignored=ignored)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def plan_jobs(src: Path, out: Path | None, splits: Sequence[str] | None) -> list[tuple[Path, Path | None]]:
    """``[(split folder, .beton path)]``: ``SRC/{train,val}`` into ``OUT/{split}.beton`` when SRC
    holds split folders, else SRC itself into OUT (a ``.beton`` path, or a folder for ``<name>.beton``).
    ``out=None`` (``--check-only``) plans the folders alone."""
    if not src.exists():
        raise ConvertError(f"source folder '{src}' does not exist")
    present = [s for s in SPLITS if (src / s).is_dir()]
    if present:
        if out is not None and out.suffix == ".beton":
            raise ConvertError(f"'{src}' holds split folders ({', '.join(present)}); OUT must be a folder "
                               f"to receive {', '.join(s + '.beton' for s in present)}, not '{out}'")
        wanted = list(splits) if splits else present
        missing = [s for s in wanted if s not in present]
        if missing:
            raise ConvertError(f"split folder '{src / missing[0]}' does not exist (found: {', '.join(present)})")
        return [(src / s, None if out is None else out / f"{s}.beton") for s in wanted]
    if splits:
        raise ConvertError(f"--splits given but '{src}' has no {' or '.join(SPLITS)} sub-folder")
    if out is None:
        return [(src, None)]
    return [(src, out if out.suffix == ".beton" else out / f"{src.resolve().name}.beton")]


def _positive_int(text: str) -> int:
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Convert an ImageFolder (ROOT/train, ROOT/val, or one split folder) "
        "into FFCV .beton files for data.backend=ffcv. Defaults follow ffcv-imagenet's ImageNet recipe.")
    p.add_argument("src", type=Path, help="ImageFolder root holding train/ and/or val/, or one split folder")
    p.add_argument("out", type=Path, nargs="?",
                   help="output folder (receives <split>.beton), or a .beton path for one split")
    p.add_argument("--check-only", action="store_true",
                   help="only decode every image and list the unreadable ones (exit 1 if any); "
                        "for folders read directly by the torchvision / DALI backends")
    p.add_argument("--splits", nargs="+", choices=SPLITS, help="only these splits of SRC (default: all present)")
    p.add_argument("--write-mode", default=DEFAULT_WRITE_MODE, choices=["raw", "jpg", "smart", "proportion"],
                   help="FFCV RGBImageField write_mode (default: %(default)s)")
    p.add_argument("--max-resolution", type=int, default=DEFAULT_MAX_RESOLUTION,
                   help="cap on the longer image side, 0 = keep (default: %(default)s)")
    p.add_argument("--compress-probability", type=float, default=DEFAULT_COMPRESS_PROBABILITY,
                   help="share stored as JPEG with --write-mode proportion (default: %(default)s)")
    p.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY, help="(default: %(default)s)")
    p.add_argument("--num-workers", type=_positive_int, default=None,
                   help="decoding / writing processes (default: all cores)")
    p.add_argument("--chunk-size", type=_positive_int, default=100, help="images per work item (default: %(default)s)")
    p.add_argument("--max-images", type=_positive_int, default=None,
                   help="convert only N images per split, spread over the classes (quick trials)")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable image instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace existing .beton files")
    p.add_argument("--seed", type=int, default=0, help="seed of the proportion-mode JPEG coin (default: %(default)s)")
    return p


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _raise_interrupt(signum, frame) -> None:
    # The exception can land inside code that swallows it (a __del__, a finaliser); the flag makes
    # the next check point raise again, and the final rename never happens after a stop request.
    _STOP.set()
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.out is None and not args.check_only:
        parser.error("OUT is required (an output folder or .beton path), unless --check-only")
    from rich.console import Console

    err = Console(stderr=True)
    out_console = Console(soft_wrap=True, highlight=False)
    # SIGTERM (kill, a CI timeout) takes the same clean-up path as Ctrl-C.
    in_main_thread = threading.current_thread() is threading.main_thread()
    _STOP.clear()
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if in_main_thread else None
    found_bad = False
    try:
        for src, out in plan_jobs(args.src, None if args.check_only else args.out, args.splits):
            if args.check_only:
                r = check_folder(src, num_workers=args.num_workers, max_images=args.max_images, console=err)
                found_bad |= bool(r.skipped)
                listed = " (listed above)" if r.skipped else ""
                out_console.print(f"{src}: {r.images} readable images, {len(r.skipped)} unreadable{listed}, "
                                  f"{r.classes} classes, {r.seconds:.1f} s")
                continue
            r = convert_folder(
                src, out, max_resolution=args.max_resolution or None, write_mode=args.write_mode,
                compress_probability=args.compress_probability, jpeg_quality=args.jpeg_quality,
                num_workers=args.num_workers, chunk_size=args.chunk_size, max_images=args.max_images,
                strict=args.strict, overwrite=args.overwrite, seed=args.seed, console=err)
            extra = f", skipped {len(r.skipped)} unreadable (listed above)" if r.skipped else ""
            extra += f", ignored {r.ignored} non-image files" if r.ignored else ""
            out_console.print(
                f"{r.out}: {r.images} images, {r.classes} classes, {_human_bytes(r.bytes)}, "
                f"{r.seconds:.1f} s ({r.images / max(r.seconds, 1e-9):.0f} img/s){extra}")
    except ConvertError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; the unfinished output was removed", file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 1 if found_bad else 0


if __name__ == "__main__":
    sys.exit(main())
