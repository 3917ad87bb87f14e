"""The repository's one atomic file writer and output-folder maker: every file fdfast writes (checkpoints,
exports, .beton files, reports, records) is written under a temporary name and renamed into place, and every
output folder is made by :func:`make_folder` (one line instead of a traceback) and, when a command is
refused before its work, removed again (:func:`missing_folders`, :func:`remove_empty_folders`)."""
from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Callable

from .errors import OutputNotWritable

__all__ = ["atomic_write", "fsync_dir", "make_folder", "missing_folders", "remove_empty_folders"]


def fsync_dir(path: Path) -> None:
    try:  # make a rename durable (best effort: not every filesystem allows syncing a folder)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def make_folder(folder: str | os.PathLike) -> Path:
    """Create ``folder`` (and its parents) for output, or raise :class:`OutputNotWritable` in one line
    (a file in the way, no permission) instead of an OSError traceback."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
        why = f"'{blocker}' is a file, not a folder" if blocker is not None else e.strerror or str(e)
        raise OutputNotWritable(f"cannot create the output folder '{folder}': {why}; choose another output "
                                "path") from None
    return folder


def missing_folders(folder: str | os.PathLike) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first: what :func:`make_folder` is about
    to create, so that a command refused before its work can remove them again (:func:`remove_empty_folders`)."""
    missing, path = [], Path(folder).absolute()
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: a refused command leaves no empty output folder."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty (something else writes there), or gone already
            return


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary name in ``path``'s folder, fsync it, then rename to ``path``.

    Same folder so that ``os.replace`` is an atomic rename on one filesystem; the temporary file is removed
    if anything fails, so ``path`` is either the old file or the complete new one.
    """
    path = make_folder(Path(path).parent) / Path(path).name
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
    fsync_dir(path.parent)
    return path
