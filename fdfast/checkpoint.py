"""Atomic, verified, resumable training checkpoints (written with :mod:`fdfast.files`, the one atomic writer).

Layout: ``<output_dir>/checkpoints/step_00000500/`` holding ``state.pt`` (``Trainer.state_dict()``:
model, optimizer, scaler, step, epoch, config; written by rank 0), ``rng_rank{r}.pt`` (each rank's RNG
states) and ``meta.json`` (written last: format, step, world size, the resolved config, the run geometry
and the images seen, the write sequence number, and the byte size and SHA-256 of every file). The folder is
built under a temporary name and renamed into place, so a ``step_*`` folder exists only once complete.

Order: a step means another number of images once the world size (the total batch) changes, so
checkpoints are ordered by ``meta.json``'s write sequence, then images seen, never by the step in their
name. Folders of earlier versions (no sequence) come first, ordered by the images their step and config
imply. A step number already taken by a checkpoint of another geometry or position gets the name
``step_XXXXXXXX_img<images>``: a checkpoint of another run geometry is never overwritten.

Guarantees:

* **Complete and intact.** :func:`verify` re-checks every file's size and SHA-256 against ``meta.json``;
  a folder that fails (killed mid-write, truncated, bit flips, hand-edited) is skipped with a warning
  naming it and the reason, and the next older valid one is used (:func:`valid_checkpoints`).
* **Finite.** :func:`save_checkpoint` refuses a state holding a NaN/Inf tensor (:class:`NonFiniteState`),
  on every rank, before anything is written.
* **Readable without running code.** Everything is tensors and plain values, read with
  ``torch.load(weights_only=True)``.
* **No half-written files.** A failed write (disk full, permissions) removes the temporary folder and
  raises :class:`CheckpointWriteError` naming the folder; the previous checkpoints are untouched.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from . import distributed as dist_utils
from .errors import UserError
from .files import fsync_dir
from .interop.reading import load_torch_file
from .rng import rng_state

FORMAT = "fdfast-train"
VERSION = 2
_STEP_DIR = re.compile(r"^step_(\d{8})(?:_img\d+)?(?:_\d+)?$")
_CHUNK = 1 << 22


class CheckpointWriteError(UserError, OSError):
    """A checkpoint could not be written (disk full, no permission); nothing half-written was left."""


class CheckpointLoadError(UserError, RuntimeError):
    """A checkpoint the user named (or the only one there is) cannot be read."""


class NonFiniteState(RuntimeError):
    """The state to save holds NaN/Inf values: it is never written."""


def ckpt_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


class _HashingFile:
    """A write-only file wrapper that hashes what passes through (torch.save only calls write/flush) and
    keeps the first write error, which torch's zip writer replaces by its own ``RuntimeError``."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()
        self.error: Optional[OSError] = None

    def write(self, data) -> int:
        self.sha.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def _save_hashed(path: Path, obj: Any) -> dict:
    """torch.save ``obj`` to ``path`` (fsynced); returns ``{"size", "sha256"}`` of the bytes written. Any
    failure to write (a full disk included) is an ``OSError``, whatever torch's writer turned it into."""
    with open(path, "wb") as f:
        h = _HashingFile(f)
        try:
            torch.save(obj, h)
        except RuntimeError as e:
            # ENOSPC inside the zip writer surfaces as "RuntimeError: ... unexpected pos N vs M"
            cause = h.error or next((c for c in (e.__cause__, e.__context__) if isinstance(c, OSError)), None)
            if cause is not None:
                raise cause from None
            if "unexpected pos" in str(e) or "PytorchStreamWriter" in str(e):
                raise OSError(errno.EIO, f"the file was not written completely ({str(e).strip().splitlines()[0]})"
                              ) from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return {"size": path.stat().st_size, "sha256": h.sha.hexdigest()}


def file_sha256(path: str | os.PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _non_finite_keys(obj: Any, prefix: str = "") -> list[str]:
    """Paths of floating tensors in a nested state that hold NaN/Inf (one device sync in all)."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(o: Any, name: str) -> None:
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() and o.numel():
                found.append((name, o))
        elif isinstance(o, dict):
            for k, v in o.items():
                walk(v, f"{name}.{k}" if name else str(k))
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{name}[{i}]")

    walk(obj, prefix)
    if not found:
        return []
    ok = torch.stack([torch.isfinite(t).all().to("cpu", non_blocking=True) for _, t in found])
    return [name for (name, _), good in zip(found, ok.tolist()) if not good]


def save_checkpoint(output_dir: str | os.PathLike, step: int, state: dict, *, rank: int = 0, keep: int = 2,
                    world_size: int = 1, config: Optional[dict] = None) -> Optional[Path]:
    """Collective: every rank calls it. ``state`` (tensors and plain values) is written by rank 0, each
    rank writes its own RNG states; the folder appears under its final name only when complete.
    ``config`` (the resolved config as a dict) is recorded in ``meta.json`` for the resume checks."""
    bad = _non_finite_keys(state)
    if dist_utils.any_rank(bool(bad)):
        where = f": {', '.join(bad[:5])}" + (" ..." if len(bad) > 5 else "") if bad else " (on another rank)"
        raise NonFiniteState(f"refusing to save step {step}: the state holds NaN/Inf values{where}")
    root = ckpt_root(output_dir)
    tmp = root / f".tmp_step_{step:08d}"
    error: Optional[BaseException] = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    except OSError as e:
        error = e
    if dist_utils.any_rank(error is not None):
        _raise_write_error(error, root, step)
    try:
        _save_hashed(tmp / f"rng_rank{rank}.pt", rng_state())
    except OSError as e:
        error = e
    if dist_utils.any_rank(error is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_error(error, root, step)
    final = None
    if rank == 0:
        try:
            rng_files = [f"rng_rank{r}.pt" for r in range(world_size)]
            existing = list_checkpoints(output_dir)  # oldest first: the last one holds the highest sequence
            meta = {"step": step, "world_size": world_size, "config": config, **_position(state, step),
                    "seq": 1 + (_order_key(existing[-1][1])[0] if existing else 0)}
            final = _folder_for(root, step, meta)
            _publish(tmp, final, {"format": FORMAT, "version": VERSION, **state}, rng_files, meta)
            _prune(root, keep)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if not isinstance(e, OSError):
                raise
            error = e
    if dist_utils.any_rank(error is not None):
        _raise_write_error(error, root, step)
    return final


def _position(state: dict, step: int) -> dict:
    """Where in the data a checkpoint stands and the geometry that numbers its steps (``meta.json``)."""
    total = state.get("total_batch")
    images = state.get("images")
    return {"images": int(images) if images is not None else (step * int(total) if total else None),
            "total_batch": int(total) if total else None, "steps_per_epoch": state.get("steps_per_epoch")}


def _legacy_images(meta: dict) -> int:
    """Images seen at a checkpoint of an earlier version: its step times the total batch of its config."""
    train = (meta.get("config") or {}).get("train") or {}
    total = int(train.get("batch_size") or 1) * int(meta.get("world_size") or 1) * int(train.get("accum_steps") or 1)
    return int(meta.get("step") or 0) * total


def _order_key(path: Path) -> tuple[int, int]:
    """(write sequence, images seen) of a checkpoint folder; (-1, -1) when its meta.json is unreadable: such
    a folder counts as oldest (never preferred to a readable one) and pruning leaves it alone."""
    try:
        meta = read_meta(path)
        images = meta.get("images")
        return int(meta.get("seq") or 0), int(images) if images is not None else _legacy_images(meta)
    except (OSError, ValueError, TypeError, AttributeError):
        return -1, -1


def _folder_for(root: Path, step: int, meta: dict) -> Path:
    """``step_XXXXXXXX``, unless a checkpoint at another position or of another geometry has that name."""
    base = f"step_{step:08d}"
    first = f"{base}_img{meta['images']}" if meta.get("images") is not None else base
    for name in [base, first] + [f"{first}_{n}" for n in range(2, 1000)]:
        if not (root / name).exists() or _same_position(root / name, meta):
            return root / name
    raise CheckpointWriteError(f"{root} holds 1000 checkpoints named {base}*; move the old ones away")


def _same_position(folder: Path, meta: dict) -> bool:
    """Whether ``folder`` is this position of this geometry (saving it again replaces it) or unreadable
    (verify() rejects it anyway, so replacing it loses nothing)."""
    try:
        there = read_meta(folder)
    except (OSError, ValueError):
        return True
    return isinstance(there, dict) and all(there.get(k) == meta.get(k)
                                           for k in ("world_size", "images", "total_batch", "steps_per_epoch"))


def _publish(tmp: Path, final: Path, state: dict, extra_files: list[str], meta: dict) -> None:
    """Write ``state.pt`` into the folder ``tmp`` (which may already hold ``extra_files``), then
    ``meta.json`` with every file's size and SHA-256, then rename ``tmp`` to ``final``."""
    files = {"state.pt": _save_hashed(tmp / "state.pt", state)}
    for name in extra_files:
        files[name] = {"size": (tmp / name).stat().st_size, "sha256": file_sha256(tmp / name)}
    with open(tmp / "meta.json", "w") as f:
        json.dump({"format": FORMAT, "version": VERSION, **meta, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def save_best(output_dir: str | os.PathLike, state: dict, *, config: Optional[dict] = None) -> Path:
    """Rank 0: ``<output_dir>/best/`` = the model weights (no optimizer) with the step, epoch and the
    metrics that made them the best, in the checkpoint layout (so fdfast-export / fdfast-eval read it);
    replaced atomically."""
    bad = _non_finite_keys(state)
    if bad:
        raise NonFiniteState(f"refusing to save the best weights: NaN/Inf in {', '.join(bad[:5])}")
    out = Path(output_dir)
    final, tmp = out / "best", out / f".tmp_best_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        _publish(tmp, final, {"format": FORMAT, "version": VERSION, **state}, [],
                 {"step": state.get("step"), "world_size": 1, "config": config})
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_error(e, out, int(state.get("step") or 0))
    return final


def _raise_write_error(error: Optional[BaseException], root: Path, step: int) -> None:
    if error is None:
        raise CheckpointWriteError(f"writing checkpoint step {step} into {root} failed on another rank")
    if getattr(error, "errno", None) == errno.ENOSPC:
        raise CheckpointWriteError(f"no space left on {root} while writing checkpoint step {step}; free space "
                                   "(or lower checkpoint.keep) and rerun: the run resumes from the last "
                                   "complete checkpoint") from None
    raise CheckpointWriteError(f"cannot write checkpoint step {step} into {root} ({error.strerror or error}); "
                               "check that train.output_dir is writable") from None


def _prune(root: Path, keep: int) -> None:
    # oldest first; a folder whose meta.json cannot be read (maybe only for now) is left for the user
    for _, path in [c for c in list_checkpoints(root.parent) if _order_key(c[1])[0] >= 0][:-max(keep, 1)]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every checkpoint folder, oldest first (see "Order" in the module docstring)."""
    root = ckpt_root(output_dir)
    try:
        entries = list(root.iterdir()) if root.is_dir() else []
    except OSError as e:
        raise CheckpointLoadError(f"cannot list {root} ({e.strerror}); check its permissions") from None
    found = [(int(m.group(1)), p) for p in entries if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, key=lambda sp: (*_order_key(sp[1]), sp[0], sp[1].name))


def read_meta(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "meta.json").read_text())


def verify(path: str | os.PathLike, *, hashes: bool = True) -> Optional[str]:
    """None when the folder is a complete, intact checkpoint; otherwise the reason it is not."""
    path = Path(path)
    try:
        meta = read_meta(path)
        files = meta["files"]
        if meta.get("format") != FORMAT or "state.pt" not in files:
            return "meta.json does not describe an fdfast checkpoint"
        for name, info in files.items():
            size, digest = (info["size"], info.get("sha256")) if isinstance(info, dict) else (info, None)
            actual = (path / name).stat().st_size
            if actual != size:
                return f"{name} has {actual} bytes, meta.json says {size} (truncated or still being written)"
            if hashes and digest is not None and file_sha256(path / name) != digest:
                return f"{name} does not match its SHA-256 in meta.json (damaged on disk)"
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"meta.json is unreadable ({type(e).__name__}: {e})"
    return None


def valid_checkpoints(output_dir: str | os.PathLike, on_skip: Optional[Callable[[Path, str], None]] = None
                      ) -> Iterator[Path]:
    """Checkpoint folders newest first, verified; each skipped one is reported to ``on_skip(path, why)``."""
    for _, path in reversed(list_checkpoints(output_dir)):
        why = verify(path)
        if why is None:
            yield path
        elif on_skip is not None:
            on_skip(path, why)


def find_latest(output_dir: str | os.PathLike, on_skip: Optional[Callable[[Path, str], None]] = None
                ) -> Optional[Path]:
    """Newest complete, intact checkpoint folder, skipping (and reporting) incomplete or damaged ones."""
    return next(valid_checkpoints(output_dir, on_skip), None)


def load_checkpoint(path: str | os.PathLike, rank: int = 0, map_location: Any = "cpu") -> tuple[dict, Optional[dict]]:
    """(state, this rank's RNG state or None when the checkpoint was written by fewer ranks)."""
    path = Path(path)
    state_file, folder = (path, path.parent) if path.is_file() else (path / "state.pt", path)
    try:
        # the load policy: a file that pickles anything but tensors and plain values is refused
        state = load_torch_file(state_file, map_location=map_location, opt_in=None)
    except UserError as e:
        raise CheckpointLoadError(f"cannot read checkpoint {state_file}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointLoadError(f"{state_file} is not an fdfast training checkpoint")
    rng_file = folder / f"rng_rank{rank}.pt"
    rng = load_torch_file(rng_file, opt_in=None) if rng_file.exists() else None
    return state, rng
