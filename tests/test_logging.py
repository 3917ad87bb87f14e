"""Progress: on 80 columns (and 60, 120) one line shows step/total, loss, img/s and the ETA, unclipped."""
import io
import re

import pytest
from rich.console import Console

from fdfast import logging as fdlog
from fdfast.logging import Progress, format_eta

REC = {"step": 1234, "loss": 0.1234, "lr": 1.5e-3, "img_per_s_per_device": 2147.3, "data_wait": 0.031}


@pytest.fixture
def clock(monkeypatch):
    """perf_counter as the test says: 100 s pass between the start and the update."""
    now = {"t": 1000.0}
    monkeypatch.setattr(fdlog.time, "perf_counter", lambda: now["t"])
    return now


def render(width: int, total: int, step: int, rec: dict, clock: dict, mode: str = "rich") -> list[str]:
    console = Console(file=io.StringIO(), width=width)  # not a terminal: the bar's last frame is printed on close
    progress = Progress(total=total, mode=mode, console=console)
    clock["t"] += 100.0
    progress.update(step, rec)
    progress.close()
    return console.file.getvalue().splitlines()


@pytest.mark.parametrize("width", [60, 80, 120])
@pytest.mark.parametrize("total", [62_500, 1_234_567])
def test_bar_line_holds_step_loss_speed_and_eta(width, total, clock):
    lines = render(width, total, 1234, REC, clock)
    assert len(lines) == 1 and len(lines[0]) <= width
    line = lines[0]
    eta = format_eta(100.0 / 1234 * (total - 1234))
    for field in (f"1234/{total}", "loss 0.1234", "2,147 img/s", f"ETA {eta}"):
        assert field in line, (field, line)
    assert line.startswith("train ")
    assert line.index("loss") < line.index("img/s") < line.index("ETA")
    # the LR and the data-wait share only where there is room for them
    assert ("lr 1.50e-03" in line and "wait 3%" in line) == (width >= fdlog.WIDE)


def test_wide_bar_shows_the_largest_group_lr_when_the_record_has_only_groups(clock):
    rec = {k: v for k, v in REC.items() if k != "lr"} | {"lr_groups": [2.5e-5, 4e-4, 1e-4]}
    assert "lr 4.00e-04" in render(120, 100, 10, rec, clock)[0]


def test_eta_format():
    assert format_eta(0) == "0:00:00"
    assert format_eta(3 * 3600 + 4 * 60 + 12.4) == "3:04:12"
    assert format_eta(100 * 3600) == "100:00:00"  # days of training stay in hours
    assert format_eta(None) == format_eta(float("inf")) == "-:--:--"


def test_plain_lines_when_not_on_a_terminal(clock):
    (line,) = render(80, 100, 10, REC, clock, mode="auto")
    assert line.startswith("[fdfast] train step 10/100 ")
    for field in ("loss 0.1234", "lr 1.50e-03", "2,147.3 img/s/dev", "data-wait 3%", "ETA 0:15:00"):
        assert field in line, (field, line)


def test_no_output_when_disabled_or_not_rank_zero(clock):
    assert render(80, 100, 10, REC, clock, mode="none") == []
    console = Console(file=io.StringIO(), width=80)
    progress = Progress(total=100, enabled=False, mode="rich", console=console)
    progress.update(10, REC)
    progress.close()
    assert console.file.getvalue() == ""


def test_eta_counts_from_the_resumed_step(clock):
    console = Console(file=io.StringIO(), width=80)
    progress = Progress(total=1000, start=900, mode="plain", console=console)
    clock["t"] += 50.0
    progress.update(950, REC)  # 50 steps in 50 s, 50 to go
    assert re.search(r"ETA 0:00:50$", console.file.getvalue().strip())
