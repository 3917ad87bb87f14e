"""Atomic, resumable training checkpoints.

Layout: ``<output_dir>/checkpoints/step_00000500/`` holding ``state.pt`` (model, projector,
optimizer, scaler, step, epoch, config; written by rank 0), ``rng_rank{r}.pt`` (each rank's RNG
states) and ``meta.json`` (written last, with the byte size of every file). The folder is built
under a temporary name and renamed into place, so a ``step_*`` folder exists only once complete;
``find_latest`` also re-checks the sizes in ``meta.json`` and skips anything that does not match.
Everything is tensors and plain values: ``torch.load(weights_only=True)`` reads it.
"""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import distributed as dist_utils
from .interop.reading import load_torch_file

FORMAT = "fdfast-train"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def ckpt_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((3, tuple(py[0]), py[1]))


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name in ``path``'s folder, fsync it, then rename to ``path``.

    Same folder so that ``os.replace`` is an atomic rename on one filesystem; the temporary file is removed
    if anything fails, so ``path`` is either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fresh unguessable name, created by the writer itself so the file gets the usual umask permissions
    # (tempfile.mkstemp would leave it 0600 after the rename)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # the writer may have closed the file without syncing
            os.fsync(f.fileno())
        # some writers (safetensors) create 0600 files; give the usual umask permissions
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable (best effort: not every filesystem allows syncing a folder)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def _fsync_write(path: Path, obj: Any) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(output_dir: str | os.PathLike, step: int, state: dict, *, rank: int = 0,
                    keep: int = 2) -> Optional[Path]:
    """Collective: every rank calls it. ``state`` (tensors and plain values) is written by rank 0,
    each rank writes its own RNG states; the folder appears under its final name only when complete."""
    root = ckpt_root(output_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist_utils.barrier()
    _fsync_write(tmp / f"rng_rank{rank}.pt", rng_state())
    dist_utils.barrier()
    if rank == 0:
        try:
            _fsync_write(tmp / "state.pt", {"format": FORMAT, "version": VERSION, **state})
            sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
            (tmp / "meta.json").write_text(json.dumps({"format": FORMAT, "step": step, "files": sizes}))
            if final.exists():  # re-saving the same step (e.g. final save right after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _prune(root, keep)
    dist_utils.barrier()
    return final if rank == 0 else None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    steps = sorted(list_checkpoints(root.parent), reverse=True)
    for _, path in steps[max(keep, 1):]:
        shutil.rmtree(path, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    root = ckpt_root(output_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def is_complete(path: Path, world_size: int = 1) -> bool:
    meta = path / "meta.json"
    try:
        info = json.loads(meta.read_text())
        files = info["files"]
        if "state.pt" not in files:
            return False
        if any(f"rng_rank{r}.pt" not in files for r in range(world_size)):
            return False
        return all((path / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def find_latest(output_dir: str | os.PathLike, world_size: int = 1) -> Optional[Path]:
    """Newest complete checkpoint folder, skipping incomplete or damaged ones."""
    for _, path in reversed(list_checkpoints(output_dir)):
        if is_complete(path, world_size):
            return path
    return None


def load_checkpoint(path: str | os.PathLike, rank: int = 0, map_location: Any = "cpu") -> tuple[dict, Optional[dict]]:
    """(state, this rank's RNG state or None if the checkpoint was written by fewer ranks)."""
    path = Path(path)
    if path.is_file():
        state_file, folder = path, path.parent
    else:
        state_file, folder = path / "state.pt", path
    # the load policy: a file that pickles anything but tensors and plain values is refused (a UserError)
    state = load_torch_file(state_file, map_location=map_location, opt_in=None)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise RuntimeError(f"{state_file} is not an fdfast training checkpoint (format={state.get('format')!r})"
                           if isinstance(state, dict) else f"{state_file} is not an fdfast training checkpoint")
    rng_file = folder / f"rng_rank{rank}.pt"
    rng = load_torch_file(rng_file, opt_in=None) if rng_file.exists() else None
    return state, rng
