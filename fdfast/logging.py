"""Rank-0 console output: a rich progress bar on a terminal, plain lines otherwise."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console

_console = Console(stderr=False, highlight=False)


def log(msg: str) -> None:
    _console.print(f"[fdfast] {msg}", markup=False, soft_wrap=True)


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON object per line (``metrics.jsonl``): training records and evaluation records."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _fmt(rec: dict[str, Any]) -> str:
    return (f"loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  {rec['img_per_s_per_device']:.1f} img/s/dev  "
            f"data-wait {100 * rec['data_wait']:.0f}%")


class Progress:
    """``mode``: auto (rich on a TTY, plain otherwise), rich, plain, none."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, mode: str = "auto"):
        self.enabled = enabled and mode != "none"
        self.total, self.start = total, start
        self.t0 = time.perf_counter()
        self._bar: Optional[Any] = None
        if not self.enabled:
            return
        use_rich = mode == "rich" or (mode == "auto" and sys.stdout.isatty())
        if use_rich:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,  # noqa: PLC0415
                                       TextColumn, TimeElapsedColumn, TimeRemainingColumn)

            self._bar = RichProgress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                     TextColumn("ETA"), TimeRemainingColumn(), console=_console)
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=_fmt(rec))
            return
        done = step - self.start
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(done, 1) * (self.total - step)
        print(f"[fdfast] step {step}/{self.total}  {_fmt(rec)}  eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
