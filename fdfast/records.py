"""What a run writes about itself besides checkpoints: ``metrics.jsonl`` and ``summary.json``.

* ``metrics.jsonl``: one JSON object per line. Training records (``step``, ``loss``, ...), and records
  with a ``kind``: ``eval``, ``resume`` (the run's step numbering changed: another total batch) and
  ``preempted`` (a stop signal; a checkpoint of that step was written). ``step`` counts the optimizer
  steps the weights have been through, across restarts: it equals the run's step (checkpoint names,
  progress, LR schedule) until a resume on another total batch renumbers the run's steps; the records
  then go on counting from the checkpoint's, so that ``step`` never repeats or goes back (TensorBoard
  and W&B need that too). ``images`` (the data position in images) compares across world sizes. A resume
  drops the records logged after its checkpoint: they are logged again.
* ``config.yaml``: this start's resolved config; an earlier, different one is kept beside it.
* ``summary.json``: how the last start ended. ``"status": "finished"`` with the run's totals, or
  ``"status": "preempted"`` with ``preempted`` = the step, images, signal and checkpoint to resume from:
  what a job scheduler reads to tell "preempted, requeue me" from "failed" (torchrun exits 1 for both).
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from .files import atomic_write
from .logging import append_jsonl, log
from .resume import archive_config


def truncate_metrics(path: Path, step: int, *, drop_eval_at_step: bool = False) -> None:
    """On resume from a checkpoint at metrics ``step``: drop the records logged after it (and its own
    evaluation's record when that evaluation is to be done again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        at = record.get("step", 0)
        if at < step or (at == step and not (drop_eval_at_step and record.get("kind") == "eval")):
            keep.append(line)
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in keep)))


def note_resume(path: Path, state: dict, *, metrics_step: int, step: int, images: int, world_size: int,
                total_batch: int, redo_eval: bool) -> None:
    """Rank 0, resuming from the checkpoint ``state``: drop the records logged after it, and say where the
    run's step numbering changed (another total batch)."""
    truncate_metrics(path, metrics_step, drop_eval_at_step=redo_eval)
    if step != int(state["step"]):
        append_jsonl(path, {"kind": "resume", "step": metrics_step, "run_step": step, "from_step": int(state["step"]),
                            "images": images, "world_size": world_size, "total_batch": total_batch})


def write_config(output_dir: Path, config: dict) -> None:
    """``config.yaml`` = this start's resolved config; an earlier, different one is kept beside it."""
    text = yaml.safe_dump(config, sort_keys=False)
    kept = archive_config(output_dir / "config.yaml", text)
    if kept is not None:
        log(f"the previous start's config is kept as {kept}")
    (output_dir / "config.yaml").write_text(text)


def write_summary(output_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write(output_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2) + "\n"))


def signal_name(signum: int) -> Optional[str]:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return None


def record_preemption(output_dir: Path, metrics_path: Path, *, step: int, metrics_step: int, images: int,
                      signum: int, checkpoint: Optional[Path]) -> None:
    """Rank 0, once the checkpoint of ``step`` is complete: the ``preempted`` record in metrics.jsonl and
    summary.json."""
    where = {"images": images, "signal": signal_name(signum), "checkpoint": str(checkpoint) if checkpoint else None}
    try:
        append_jsonl(metrics_path, {"kind": "preempted", "step": metrics_step, **where, "wall_time": time.time()})
        write_summary(output_dir, {"status": "preempted", "preempted": {"step": step, **where},
                                   "output_dir": str(output_dir), "wall_time": time.time()})
    except OSError as e:  # the checkpoint is what matters: the stop goes on
        log(f"WARNING: could not record the preemption in {output_dir} ({e.strerror or e})")
