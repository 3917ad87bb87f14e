#!/usr/bin/env python
"""Every GPU check and benchmark of fdfast in one call, for a bare single-GPU box (run via bench/device.sh).

The sections (``bench/device_plan.py``: env, step128, tests, profile, e2e, teacher, vitl14, swinv2b,
dinov2b14, teachers2, loader, step256, autotune) run in that order, each a subprocess with its own time limit: a failure or
timeout is recorded and the next section runs. ``DEVICE_BUDGET_S`` (default 470, counted from the start of
``device.sh``, wheel installation included) bounds the whole run; sections that no longer fit are skipped.
``DEVICE_SECTIONS=step128,e2e`` runs only the named sections (a rerun of what failed).

Output (``$OUT``, default ./bench_out): device.log (everything), one JSON per section, device.json (all
merged, with the headline ``summary``, ``bench/device_summary.py``), summary.md, and the same two named as
``bench/results/`` expects: ``<card>-<date>.json|md``; the tables are printed last. ``DEVICE_DRY_RUN=1``
runs the same sections on the CPU with tiny models and the aot_eager compile backend (the CI check of this
script).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

# run as a script: the repository (not bench/) first on the path
REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)

from bench.device_plan import plan  # noqa: E402
from bench.device_summary import merge, tables  # noqa: E402
from bench.tables import card_slug, markdown, print_tables  # noqa: E402

PY = sys.executable
DRY = os.environ.get("DEVICE_DRY_RUN", "") not in ("", "0")
OUT = Path(os.environ.get("OUT") or (REPO / "bench_out"))
BUDGET_S = float(os.environ.get("DEVICE_BUDGET_S", "470"))
# device.sh records when it started, so that installing the carried wheels counts against the budget
T0 = time.monotonic() - max(0.0, time.time() - float(os.environ.get("DEVICE_START_EPOCH") or time.time()))
LOG: Optional[Any] = None


def say(msg: str) -> None:
    line = f"[device {time.monotonic() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    if LOG:
        LOG.write(line + "\n")
        LOG.flush()


def remaining() -> float:
    return BUDGET_S - (time.monotonic() - T0)


def run_section(name: str, cmd: list[str], cap_s: float, min_s: float = 20.0) -> dict:
    """Run ``cmd`` with output teed to the log; kill its whole process group after
    ``min(cap_s, time left)`` seconds. Never raises."""
    rec: dict[str, Any] = {"name": name, "cmd": cmd, "rc": None, "seconds": 0.0, "timed_out": False,
                           "skipped": False}
    left = remaining() - 10  # keep time for the summary
    if left < min_s:
        rec.update(skipped=True, reason=f"{left:.0f}s left of DEVICE_BUDGET_S={BUDGET_S:.0f}")
        say(f"== {name}: SKIPPED ({rec['reason']})")
        return rec
    limit = min(cap_s, left)
    say(f"== {name} (limit {limit:.0f}s): {' '.join(cmd)}")
    t = time.monotonic()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True, bufsize=1)
    except OSError as e:
        rec.update(rc=-1, error=str(e))
        say(f"== {name}: cannot start: {e}")
        return rec

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if LOG:
                LOG.write(line)
                LOG.flush()

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        rec["timed_out"] = True
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    th.join(timeout=5)
    rec["rc"] = proc.returncode
    rec["seconds"] = round(time.monotonic() - t, 1)
    say(f"== {name}: rc={rec['rc']} in {rec['seconds']}s" + (" (TIMED OUT)" if rec["timed_out"] else ""))
    return rec


def report(merged: dict) -> str:
    """The markdown beside the JSON: the environment line, then the tables."""
    env = merged.get("env") or {}
    lines = ["# fdfast device run" + (" (DRY RUN: CPU, tiny models)" if DRY else ""), ""]
    if env:
        lines += [f"GPU: {env.get('gpu')} | driver {env.get('driver')} | torch {env.get('torch')} | timm {env.get('timm')} "
                  f"| torchvision {env.get('torchvision')} | DALI {env.get('nvidia.dali')} | FFCV {env.get('ffcv')} | "
                  f"python {env.get('python')} | {env.get('cpu_count')} CPUs", ""]
    return "\n".join(lines + markdown(tables(merged)))


def main() -> int:
    global LOG
    OUT.mkdir(parents=True, exist_ok=True)
    LOG = open(OUT / "device.log", "a")
    say(f"fdfast device run: out {OUT}, budget {BUDGET_S:.0f}s, dry_run={DRY}")
    if DRY:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    only = {x.strip() for x in os.environ.get("DEVICE_SECTIONS", "").split(",") if x.strip()}
    sections = [run_section(s["name"], s["cmd"], s["cap"], s.get("min", 20.0))
                for s in plan(PY, OUT, DRY) if not only or s["name"] in only]
    merged = merge(OUT, sections, DRY, BUDGET_S)
    md = report(merged)
    text = json.dumps(merged, indent=2, default=str)
    # the same two files also named as bench/results/ expects: <card>-<date>.json|md (copied there and committed)
    card = "cpu-dryrun" if DRY else card_slug(merged["summary"]["gpu"] or "unknown-gpu")
    stem = f"{card}-{time.strftime('%Y-%m-%d')}"
    for name, content in (("device.json", text), ("summary.md", md), (f"{stem}.json", text), (f"{stem}.md", md)):
        (OUT / name).write_text(content)
    say(f"total {time.monotonic() - T0:.0f}s; results in {OUT} (device.json, summary.md, {stem}.json|md, device.log)")
    print_tables(tables(merged))
    LOG.close()
    bad = [s["name"] for s in sections if s.get("rc") not in (0, None) or s.get("timed_out")]
    gt = merged.get("gpu_tests") or {}
    wheels_ok = all(merged["summary"]["wheels"].values())
    return 1 if bad or gt.get("failures") or gt.get("errors") or not wheels_ok else 0


if __name__ == "__main__":
    sys.exit(main())
