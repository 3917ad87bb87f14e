"""What keeps a run safe as a process: one run per output folder, and a clean stop on a signal.

* :class:`RunLock` — an exclusive ``fcntl.flock`` on ``<output_dir>/.fdfast.lock`` held by rank 0 for
  the life of the process. The kernel releases it when the process dies (kill -9 included), so a stale
  lock never blocks a rerun. A second ``fdfast-train`` on the same folder exits 2 naming the holder's
  PID. (``flock`` on network filesystems is only as good as their lock support; NFSv4 and Lustre with
  ``flock`` mounts honour it.) A run refused before it wrote anything of value leaves the folder as it found
  it (:meth:`RunLock.release` with ``restore``): what it added (the lock file, ``config.yaml``,
  ``tensorboard/``, ...) is removed, and so is a folder it created.
* :class:`StopRequest` — SIGTERM, SIGINT and SIGUSR1 (what SLURM, Kubernetes and Ctrl-C send) set a flag
  instead of killing the process; the trainer finishes the current step, all ranks agree, a checkpoint
  is written and the process exits with :data:`EXIT_PREEMPTED`. A second SIGINT interrupts at once.
  Ctrl-C and job schedulers signal every process of the job, loader workers included: a worker started
  with :func:`leave_stop_signals_to_the_parent` ignores them while a :class:`StopRequest` is installed
  (a worker killed mid-step makes DataLoader raise in the trainer before it can save), and still ends on
  the SIGTERM a loader's own shutdown sends once the trainer is done.
"""
from __future__ import annotations

import fcntl
import multiprocessing
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Optional

from .files import missing_folders, remove_empty_folders
from .errors import OutputNotWritable, UserError

EXIT_PREEMPTED = 4
"""Exit status after a signal: a checkpoint of the current step was written; rerun to resume."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

# Shared with forked loader workers: 1 while a StopRequest turns stop signals into a clean stop.
_STOP_HANDLED = multiprocessing.Value("b", 0, lock=False)


def _worker_sigterm(signum, frame) -> None:
    if _STOP_HANDLED.value:
        return  # the trainer stops the job cleanly and shuts the workers down afterwards
    # A loader's shutdown (or the interpreter's exit) terminates its workers: leave quietly. Exit status 0,
    # not death by signal, which DataLoader's SIGCHLD handler would report as a failed worker.
    os._exit(0)


def leave_stop_signals_to_the_parent(worker_id: int = 0) -> None:
    """Loader-worker initialiser (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


class RunLocked(UserError):
    """Another process holds the output folder."""


class RunLock:
    """Exclusive lock of an output folder for the life of this process (see the module docstring)."""

    NAME = ".fdfast.lock"

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / self.NAME
        self._fd: Optional[int] = None
        self._created: list[Path] = []   # folders acquire() created, deepest first
        self._found: Optional[set[str]] = None   # the folder's entries when it was locked

    def acquire(self) -> None:
        folder = self.path.parent
        self._created = missing_folders(folder)
        try:
            self._found = {p.name for p in folder.iterdir()} if not self._created else set()
        except OSError:
            self._found = None  # unknown: a refused run then leaves everything in place
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputNotWritable(f"train.output_dir={str(self.path.parent)!r} is not writable ({e.strerror}); "
                                    "choose a folder you can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"train.output_dir={str(self.path.parent)!r} is in use by another fdfast-train "
                            f"(PID {holder}); wait for it to finish or choose another train.output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self, *, restore: bool = False) -> None:
        """Unlock; ``restore``: the run was refused before it wrote anything of value, so remove what it added
        to the folder (see the module docstring): only this run wrote there while it held the lock."""
        if self._fd is None:
            return
        restore = restore and self._found is not None
        if restore:
            for entry in self.path.parent.iterdir():
                if entry.name in self._found or entry == self.path:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
            if self.NAME not in self._found:
                self.path.unlink(missing_ok=True)  # while still locked: no other run holds this file
        os.close(self._fd)  # closing the descriptor releases the flock
        self._fd = None
        if restore:
            remove_empty_folders(self._created)


class StopRequest:
    """Turns the stop signals into a flag for the training loop while installed (main thread only)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        self.signum = signum

    def install(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            _STOP_HANDLED.value = 1
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._previous:
            _STOP_HANDLED.value = 0
        self._previous.clear()

    def __enter__(self) -> "StopRequest":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()
