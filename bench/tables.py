"""Tables of the benchmark and the device script: printed with rich (plain text where rich is missing on a
bare box) and written as markdown. No torch import, so the device script's orchestrator can use it."""
from __future__ import annotations

import math
import shutil
from typing import Optional, Sequence

# (title, column names, rows of cells)
Table = tuple[str, list[str], list[list[str]]]


def card_slug(name: str) -> str:
    """A device name as results are named: 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    name = name.lower().replace("nvidia", "")
    return "-".join("".join(ch if ch.isalnum() else " " for ch in name).split()) or "unknown-device"


def fmt(x: Optional[float], spec: str = ".1f") -> str:
    """A number for a table cell; '-' for missing or NaN."""
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_tables(tables: Sequence[Table], notes: Sequence[str] = ()) -> None:
    """Each table, first column left-aligned and the others right-aligned, then the notes."""
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table as RichTable
    except ImportError:
        for title, cols, rows in tables:
            print(f"\n{title}\n" + " | ".join(cols))
            for r in rows:
                print(" | ".join(str(c) for c in r))
        for n in notes:
            print(f"  {n}")
        return
    con = Console(width=max(120, shutil.get_terminal_size((140, 20)).columns))
    for title, cols, rows in tables:
        t = RichTable(title=escape(title), title_justify="left")
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*[escape(str(c)) for c in r])
        con.print(t)
    for n in notes:
        con.print(f"  {n}", markup=False, highlight=False)


def markdown(tables: Sequence[Table]) -> list[str]:
    """The tables as markdown lines: a '## title' heading, the header row, the rows, a blank line."""
    lines: list[str] = []
    for title, cols, rows in tables:
        lines += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
        lines.append("")
    return lines
