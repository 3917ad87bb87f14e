"""What every benchmark result carries and where it goes: the environment (fdfast version and commit, card,
driver, versions), the JSON record rewritten after every result (a run cut short keeps what it measured)
and failures kept with their traceback."""
from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch

from fdfast.files import atomic_write
from fdfast.tracking import run_environment


def environment(dev: torch.device, world: int) -> dict[str, Any]:
    """:func:`fdfast.tracking.run_environment` (fdfast version and commit, libraries, CPU, GPU, driver: the
    same record as a training run's ``summary.json``) plus what this benchmark ran on and how it was called."""
    env: dict[str, Any] = {
        **run_environment(), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": platform.node(),
        "device": str(dev), "world_size": world, "cpu_count": os.cpu_count(), "argv": sys.argv[1:],
    }
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2 ** 30, 1), capability=f"{p.major}.{p.minor}",
                   sm_count=p.multi_processor_count)
    else:
        env["gpu"] = None  # a CPU run: no GPU took part, even where the machine has one
    return env


class Recorder:
    """Collects results; rewrites the JSON file after every result (rank 0 only)."""

    def __init__(self, path: Optional[str], enabled: bool, meta: dict):
        self.path = Path(path) if path else None
        self.enabled = enabled
        self.data: dict[str, Any] = dict(meta)
        self.data.setdefault("results", [])
        self.data.setdefault("notes", [])

    def note(self, msg: str) -> None:
        self.data["notes"].append(msg)
        if self.enabled:
            print(f"[bench] {msg}", flush=True)
        self.flush()

    def add(self, result: dict) -> None:
        self.data["results"].append(result)
        self.flush()

    def results(self, mode: str) -> list[dict]:
        return [r for r in self.data["results"] if r["mode"] == mode]

    def flush(self) -> None:
        if self.enabled and self.path:
            text = json.dumps(self.data, indent=2, default=str)
            atomic_write(self.path, lambda tmp: tmp.write_text(text))


def record_failure(result: dict, e: BaseException, show: bool = True) -> None:
    """A variant failed: keep its error and traceback in ``result`` (one failing variant must not stop the
    others) and print the traceback when ``show``."""
    result["error"] = f"{type(e).__name__}: {e}"
    result["traceback"] = traceback.format_exc(limit=20)
    if show:
        print(result["traceback"], file=sys.stderr, flush=True)
