"""Rank-0 console output: a rich progress bar on a terminal, plain lines otherwise.

The bar is laid out for the terminal it starts on: on 80 columns one line holds the step, the bar,
loss, img/s (per device) and the ETA, e.g. ``train  1234/62500 ━━━━━━  loss 0.1234  2,147 img/s  ETA 3:04:12``;
from :data:`WIDE` columns on it also shows the LR and the share of time spent waiting for data. After an
evaluation its headline (``k-NN 45.3%`` or ``top-1 76.1%``) follows the loss. The bar takes whatever width
the fixed-width fields leave.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn
from rich.progress import Progress as RichProgress
from rich.table import Column

_console = Console(stderr=False, highlight=False)

WIDE = 110
"""Terminal width from which the bar also shows the LR and the data-wait share."""
_MIN_BAR = 4


def log(msg: str) -> None:
    _console.print(f"[fdfast] {msg}", markup=False, soft_wrap=True)


def append_jsonl(path: Path, record: dict) -> None:
    """One JSON object per line (``metrics.jsonl``): training records and evaluation records."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def format_eta(seconds: Optional[float]) -> str:
    """``H:MM:SS`` (hours unbounded: a 300-epoch run's ETA is days); ``-:--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    s = max(0, round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _lr(rec: dict[str, Any]) -> Optional[float]:
    """The LR to show: ``lr``, else the largest of ``lr_groups`` (the head's under layer decay)."""
    if rec.get("lr") is not None:
        return rec["lr"]
    return max(rec["lr_groups"]) if rec.get("lr_groups") else None


def eval_text(rec: dict[str, Any]) -> str:
    """The headline of an evaluation record: the k-NN monitor's top-1, or a classifier's."""
    if rec.get("knn_top1") is not None:
        return f"k-NN {rec['knn_top1']:.1f}%"
    return f"top-1 {rec['top1']:.1f}%" if rec.get("top1") is not None else ""


def _fields(rec: dict[str, Any], eta: Optional[float], evaluation: str = "") -> dict[str, str]:
    """Each displayed field as text; a field the record lacks is blank."""
    lr, speed, wait = _lr(rec), rec.get("img_per_s_per_device"), rec.get("data_wait")
    loss = f"loss {rec['loss']:.4f}" if rec.get("loss") is not None else ""
    # one field with the loss: no column (and no width taken from the bar) before the first evaluation
    return {"loss": "  ".join(s for s in (loss, evaluation) if s),
            "lr": f"lr {lr:.2e}" if lr is not None else "",
            "speed": f"{speed:,.0f} img/s" if speed is not None else "",
            "wait": f"wait {100 * wait:.0f}%" if wait is not None else "",
            "eta": f"ETA {format_eta(eta)}"}


# (field, minimum width): the minimum keeps the layout still while the values change
_NARROW = (("loss", 11), ("speed", 11), ("eta", 11))
_WIDE = (("loss", 11), ("lr", 11), ("speed", 11), ("wait", 8), ("eta", 11))


def _rich_bar(label: str, console: Console) -> RichProgress:
    wide = console.width >= WIDE
    # fields are padded by one space of the table plus one of their own, except on terminals under 80
    # columns, where that second space is what lets the bar keep a few cells
    gap = " " if console.width >= 80 else ""
    columns = [TextColumn(f"[bold]{label}"), MofNCompleteColumn(),
               BarColumn(bar_width=None, table_column=Column(ratio=1, min_width=_MIN_BAR))]
    for name, width in _WIDE if wide else _NARROW:
        columns.append(TextColumn(gap + f"{{task.fields[{name}]}}",
                                  table_column=Column(min_width=width + len(gap), no_wrap=True)))
    # redrawn on each update (every log.every steps): no refresh thread waking the main rank in between
    return RichProgress(*columns, console=console, auto_refresh=False, expand=True)


class Progress:
    """``mode``: auto (rich on a terminal, plain lines otherwise), rich, plain, none."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, mode: str = "auto",
                 label: str = "train", console: Optional[Console] = None):
        self.enabled = enabled and mode != "none"
        self.total, self.start, self.label = total, start, label
        self.console = console or _console
        self.t0 = time.perf_counter()
        self.evaluation = ""
        self._bar: Optional[RichProgress] = None
        if not self.enabled:
            return
        if mode == "rich" or (mode == "auto" and self.console.is_terminal):
            self._bar = _rich_bar(label, self.console)
            blank = {name: "" for name, _ in _WIDE}
            self._task = self._bar.add_task(label, total=total, completed=start, **{**blank, "eta": "ETA -:--:--"})
            self._bar.start()

    def eta(self, step: int) -> Optional[float]:
        """Seconds left at the pace of this process so far (a resumed run counts from its own start)."""
        done = step - self.start
        return (time.perf_counter() - self.t0) / done * (self.total - step) if done > 0 else None

    def show_eval(self, rec: dict[str, Any]) -> None:
        """Show this evaluation's headline (:func:`eval_text`) with the training fields from now on."""
        self.evaluation = eval_text(rec)

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        fields = _fields(rec, self.eta(step), self.evaluation)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, refresh=True, **fields)
            return
        # plain lines go to log files, where width is free: every field, with its unit spelled out
        speed = rec.get("img_per_s_per_device")
        shown = [fields["loss"], fields["lr"], f"{speed:,.1f} img/s/dev" if speed is not None else "",
                 f"data-wait {100 * rec['data_wait']:.0f}%" if rec.get("data_wait") is not None else "",
                 fields["eta"]]
        self.console.print(f"[fdfast] {self.label} step {step}/{self.total}  " + "  ".join(s for s in shown if s),
                           markup=False, highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
