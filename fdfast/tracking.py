"""Experiment tracking: where the records of a run go, and the facts about the run they carry.

A :class:`Tracker` receives every record of the loop (a training window or an evaluation) and, on
rank 0 only, appends it to ``metrics.jsonl`` (the run's own record, always written), writes its numeric
fields as TensorBoard scalars under ``<output_dir>/tensorboard`` (on by default) and, when
``log.wandb`` is set, to Weights & Biases. Training records are tagged ``train/<field>``, evaluation
records (``kind: "eval"``) ``eval/<field>``; list fields such as ``lr_groups`` become
``train/lr_groups/0``, ``train/lr_groups/1``, ...

:func:`device_peak_memory_gib` and :func:`run_environment` give the record and ``summary.json`` fields
that describe the run rather than the model: peak device memory, the fdfast version and git commit, the
library versions and the hardware (CPU model, GPU and driver); the benchmark records the same.
"""
from __future__ import annotations

import importlib.metadata
import platform
import re
import secrets
import subprocess
from pathlib import Path
from typing import Any, Optional

import torch

from .config import LogConfig
from .errors import MissingDependency
from .logging import append_jsonl, log

WANDB_INSTALL = "pip install 'fdfast[wandb]'"
TENSORBOARD_DIR = "tensorboard"
# W&B run id kept beside the outputs, so that a rerun of the same command (a resume) continues the same
# W&B run instead of starting a new one at every restart.
WANDB_ID_FILE = "wandb_run_id"
_DALI_DIST = re.compile(r"nvidia-dali(-nightly)?-cuda\d+")
_NVIDIA_PROC = re.compile(r"Kernel Module\s+(?:for \S+\s+)?([0-9][0-9.]*)")
# record fields that are not curves: the x axis, the namespace, and the wall-clock timestamp, which
# TensorBoard and W&B already store with every point
NOT_SCALARS = ("step", "kind", "wall_time")


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numeric fields of ``record`` by tag: ``<kind>/<field>`` (kind defaults to ``train``), list
    fields as ``<kind>/<field>/<index>``. Neither :data:`NOT_SCALARS` nor strings, bools and None (e.g.
    no peak memory on a CPU) are metrics."""
    namespace = record.get("kind", "train")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in NOT_SCALARS:
            continue
        items = enumerate(value) if isinstance(value, (list, tuple)) else [(None, value)]
        for index, v in items:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{namespace}/{key}" if index is None else f"{namespace}/{key}/{index}"] = float(v)
    return out


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as e:
        raise MissingDependency(f"log.wandb=true needs the wandb package, which failed to import ({e}); "
                                f"install it with `{WANDB_INSTALL}`, or set log.wandb=false") from None
    return wandb


def _tensorboard_writer(log_dir: Path, resume_step: int) -> Any:
    """A SummaryWriter, or None (after one warning) when TensorBoard cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        log(f"warning: TensorBoard logging is off ({e}); install it with `pip install tensorboard`, "
            "or set log.tensorboard=false to silence this")
        return None
    # A resumed run re-logs the steps after its checkpoint: purge_step hides the events of the
    # interrupted attempt from those steps on, as _truncate_metrics does for metrics.jsonl.
    return SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else None)


def _wandb_run_id(out: Path) -> str:
    path = out / WANDB_ID_FILE
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(8)
    path.write_text(run_id + "\n")
    return run_id


class Tracker:
    """Rank 0 writes ``metrics.jsonl``, TensorBoard events and (``log.wandb``) W&B; other ranks do nothing.

    Build it once the start step is known (after a resume), call :meth:`log` with each record and
    :meth:`close` at the end (or use it as a context manager). A missing wandb package raises
    :class:`~fdfast.errors.MissingDependency` before anything is written.
    """

    def __init__(self, cfg: LogConfig, output_dir: str | Path, *, rank: int = 0, resume_step: int = 0,
                 config: Optional[dict] = None):
        self.active = rank == 0
        self.output_dir = Path(output_dir)
        self.metrics_path = self.output_dir / "metrics.jsonl"
        self._tensorboard: Any = None
        self._wandb_run: Any = None
        if not self.active:
            return
        wandb = _import_wandb() if cfg.wandb else None
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if cfg.tensorboard:
            self._tensorboard = _tensorboard_writer(self.output_dir / TENSORBOARD_DIR, resume_step)
        if wandb is not None:
            self._wandb_run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity,
                                         name=cfg.wandb_name or self.output_dir.resolve().name,
                                         group=cfg.wandb_group, tags=list(cfg.wandb_tags) or None,
                                         dir=str(self.output_dir), mode=cfg.wandb_mode, config=config,
                                         id=_wandb_run_id(self.output_dir), resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (it must hold ``step``) to every destination."""
        if not self.active:
            return
        append_jsonl(self.metrics_path, record)
        step = int(record["step"])
        tags = scalars(record)
        if self._tensorboard is not None:
            for tag, value in tags.items():
                self._tensorboard.add_scalar(tag, value, step)
            # as fresh on disk as metrics.jsonl: a killed run keeps its curves (a few writes per log step)
            self._tensorboard.flush()
        if self._wandb_run is not None:
            self._wandb_run.log(tags, step=step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def device_peak_memory_gib(device: torch.device | str, reset: bool = False) -> Optional[float]:
    """Peak memory allocated by tensors on a CUDA ``device`` in GiB (the official logs' ``mem``), since
    the start or the last ``reset=True``; None on devices without such a counter (CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return peak


def _git_commit() -> Optional[str]:
    """HEAD of the repository fdfast runs from, if it runs from a checkout; None otherwise, never failing.
    Only the folder holding the package counts: an installed copy inside some other repository (a venv
    in a project folder) must not report that repository's commit."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def _version(distribution: str) -> Optional[str]:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dali_version() -> Optional[str]:
    # read from the installed metadata: importing DALI takes seconds; its package name carries the CUDA flavour
    for dist in importlib.metadata.distributions():
        if _DALI_DIST.fullmatch((dist.metadata["Name"] or "").lower()):
            return dist.version
    return None


def _cpu_model() -> Optional[str]:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what the platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def _nvidia_driver() -> Optional[str]:
    """The NVIDIA kernel driver's version: from /proc (no process to start), else nvidia-smi; None without one."""
    try:
        found = _NVIDIA_PROC.search(Path("/proc/driver/nvidia/version").read_text())
        if found:
            return found.group(1)
    except OSError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    version = out.stdout.strip().splitlines()[0].strip() if out.returncode == 0 and out.stdout.strip() else ""
    return version or None


def run_environment() -> dict[str, Any]:
    """What produced a run, for ``summary.json`` and every benchmark JSON: the fdfast version (the installed
    distribution's) and git commit (only where fdfast runs from a checkout), the library versions, the CPU
    model, the GPU (name, count) and the NVIDIA driver; None for what is absent."""
    cuda = torch.cuda.is_available()
    return {"fdfast": _version("fdfast"), "git_commit": _git_commit(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "timm": _version("timm"),
            "torchvision": _version("torchvision"), "dali": _dali_version(), "ffcv": _version("ffcv"),
            "cpu": _cpu_model(), "gpu": torch.cuda.get_device_name() if cuda else None,
            "gpu_count": torch.cuda.device_count() if cuda else 0, "gpu_driver": _nvidia_driver() if cuda else None}
