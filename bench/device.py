#!/usr/bin/env python
"""Every GPU check and benchmark of fdfast in one call, for a bare single-GPU box (run via bench/device.sh).

Sections, each a subprocess with its own time budget (a failure or timeout is recorded and the next
section runs), in order of importance:

  env        GPU, driver, torch / timm / torchvision versions
  tests      pytest -m gpu (CUDA-graph target == eager, bf16 fast step vs fp32 eager, flex grads on
             the Triton kernel, teacher on FlashAttention, nvJPEG decode vs CPU decode)
  step128    FD step, ViT-B/16 <- CLIP B/16 at 224, batch 128: official-style baseline and fast
             variants that isolate what each switch buys
  teacher    teacher target alone: official fp16, eager bf16, + CUDA graph, compiled, compiled + graph
  loader     nvjpeg vs torchvision (12 workers) alone, on a generated ImageNet-sized JPEG set
  e2e        loader + fast step with data-wait %
  step256    batch 256: official vs fast

Output (``$OUT``, default ./bench_out): device.log (everything), one JSON per section, device.json
(all merged), summary.md; the summary table is printed last. ``DEVICE_DRY_RUN=1`` runs the same
sections on the CPU with tiny models and the aot_eager compile backend (the CI check of this script).
``DEVICE_BUDGET_S`` (default 460) bounds the whole run; sections that no longer fit are skipped.
``DEVICE_SECTIONS=step128,e2e`` runs only the named sections (a rerun of what failed).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DRY = os.environ.get("DEVICE_DRY_RUN", "") not in ("", "0")
OUT = Path(os.environ.get("OUT") or (REPO / "bench_out"))
BUDGET_S = float(os.environ.get("DEVICE_BUDGET_S", "460"))
T0 = time.monotonic()
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


# ----------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------
ENV_SNIPPET = r"""
import json, os, platform, subprocess, sys
info = {"python": platform.python_version(), "cpu_count": os.cpu_count(), "host": platform.node()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    sm_count=p.multi_processor_count, device_count=torch.cuda.device_count())
except Exception as e:
    info["torch_error"] = repr(e)
for mod in ("timm", "torchvision", "numpy", "rich", "yaml", "numba", "ffcv", "pytest"):
    try:
        m = __import__(mod)
        info[mod] = getattr(m, "__version__", "?")
        if mod == "timm":
            info["timm_path"] = os.path.dirname(m.__file__)
    except Exception as e:
        info[mod] = None
try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    info["nvidia_smi"] = out.stdout.strip() or out.stderr.strip()
    info["driver"] = out.stdout.split(",")[1].strip() if out.stdout.count(",") >= 1 else None
except Exception as e:
    info["nvidia_smi"] = repr(e)
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"), indent=1)
"""


def plan() -> list[dict]:
    """The sections: (name, command, cap seconds). Dry run: same commands, tiny and on the CPU."""
    tp = [PY, "bench/throughput.py"]
    if DRY:
        common = ["--tiny", "--device", "cpu", "--compile-backend", "aot_eager", "--steps", "2", "--warmup", "1"]
        b1, b2, n_img, workers, e2e_steps = "8", "16", 96, "2", ["--steps", "3", "--warmup", "1"]
    else:
        common = ["--steps", "20", "--warmup", "5"]
        b1, b2, n_img, workers, e2e_steps = "128", "256", 5000, "12", ["--steps", "30", "--warmup", "5"]
    img_dir = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"fdfast_device_jpegs_{n_img}")
    # Fast variants, most informative first (a timeout keeps the ones already measured):
    #   fast        the config as shipped: compile (whole) + CUDA-graph teacher + SDPA + bf16 + fused AdamW
    #   eager       no compile, no graph: what bf16 + SDPA + channels-last + fused AdamW alone buy
    #   eager+graph adds only the CUDA-graph teacher
    #   blocks      regional compile instead of whole-model (compile time vs. speed)
    #   flex-blocks FlexAttention score_mod bias instead of SDPA with a bias tensor (same compile scope)
    variants = ["fast",
                "eager:train.compile=false,train.cuda_graph_teacher=false",
                "eager+graph:train.compile=false,train.cuda_graph_teacher=true",
                "blocks:train.compile_scope=blocks",
                "flex-blocks:train.compile_scope=blocks,train.attention=flex"]
    step128 = tp + ["--mode", "step", "--baseline", "--batch-size", b1, *common,
                    *[a for v in variants for a in ("--variant", v)], "--json", str(OUT / "step128.json")]
    step256 = tp + ["--mode", "step", "--baseline", "--batch-size", b2, *common, "--variant", "fast",
                    "--json", str(OUT / "step256.json")]
    teacher = tp + ["--mode", "teacher", "--batch-size", b1, *common, "--json", str(OUT / "teacher.json")]
    data = ["--generate", str(n_img), "--data", img_dir, "--workers", workers]
    dev = ["--tiny", "--device", "cpu", "--compile-backend", "aot_eager"] if DRY else []
    loader = tp + ["--mode", "loader", "--backends", "nvjpeg,torchvision", "--batch-size", b1, *dev, *data,
                   *e2e_steps, "--json", str(OUT / "loader.json")]
    e2e = tp + ["--mode", "e2e", "--backends", "nvjpeg,torchvision", "--batch-size", b1, *dev, *data, *e2e_steps,
                "--json", str(OUT / "e2e.json")]
    # --continue-on-collection-errors: test files of backends absent on the box (DALI, FFCV) must not
    # stop the GPU tests of the others from running
    tests = [PY, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors", "tests",
             f"--junitxml={OUT / 'gpu_tests.xml'}"]
    return [
        {"name": "env", "cmd": [PY, "-c", ENV_SNIPPET, str(OUT / "env.json")], "cap": 60, "min": 5},
        {"name": "tests", "cmd": tests, "cap": 150},
        {"name": "step128", "cmd": step128, "cap": 240},
        {"name": "teacher", "cmd": teacher, "cap": 90},
        {"name": "loader", "cmd": loader, "cap": 60},
        {"name": "e2e", "cmd": e2e, "cap": 100},
        {"name": "step256", "cmd": step256, "cap": 150},
    ]


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
def _load(name: str) -> Optional[dict]:
    p = OUT / name
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _f(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def junit_counts(path: Path) -> Optional[dict]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root)
    c = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed: list[str] = []
    for s in suites:
        for k in c:
            c[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    c["passed"] = c["tests"] - c["failures"] - c["errors"] - c["skipped"]
    c["failed_tests"] = failed
    return c


def summarize(sections: list[dict]) -> tuple[dict, list[tuple[str, list[str], list[list[str]]]]]:
    merged: dict[str, Any] = {"dry_run": DRY, "budget_s": BUDGET_S, "sections": sections,
                              "env": _load("env.json"), "gpu_tests": junit_counts(OUT / "gpu_tests.xml")}
    tables = []
    for key in ("step128", "step256", "teacher", "loader", "e2e"):
        merged[key] = _load(f"{key}.json")
    for key in ("step128", "step256"):
        d = merged[key]
        if not d:
            continue
        rows = []
        base = next((r for r in d["results"] if r["name"] == "official" and r.get("ok")), None)
        for r in d["results"]:
            if r.get("ok"):
                rows.append([r["name"], _f(r["img_per_s"]), _f(r["step_ms"]["median"]),
                             _f(r["mfu_spec"] * 100 if r.get("mfu_spec") else None),
                             _f(r["mfu_measured"] * 100 if r.get("mfu_measured") else None),
                             _f(r.get("peak_mem_gib")), _f(r["warmup_s"], ".0f"),
                             _f(r["img_per_s"] / base["img_per_s"] if base else None, ".2f"),
                             f"{r['loss_first']:.4f}"])
            else:
                rows.append([r["name"], "FAILED", "", "", "", "", "", "", (r.get("error") or "")[:40]])
        fl = (d.get("flops_per_img") or {}).get("total")
        pk = d.get("peak_tflops") or {}
        tables.append((f"FD step, batch {d.get('batch_size')} ({_f(fl / 1e9 if fl else None, '.2f')} GFLOP/img; "
                       f"peak spec {_f(pk.get('spec_bf16_dense'))} / measured {_f(pk.get('measured_bf16_matmul'))} "
                       f"TFLOP/s)",
                       ["variant", "img/s", "step ms", "MFU% spec", "MFU% meas", "mem GiB", "warm-up s", "x official",
                        "loss@0"], rows))
        if d.get("student_sdpa_backends"):
            tables.append(("Student attention (bias + grad): SDPA backends usable", ["backend", "result"],
                           [[k, v] for k, v in d["student_sdpa_backends"].items()]))
    d = merged["teacher"]
    if d:
        base = next((r for r in d["results"] if r["name"] == "official-fp16" and r.get("ok")), None)
        rows = [[r["name"], _f(r.get("img_per_s")), _f(r["step_ms"]["median"], ".2f") if r.get("ok") else "FAILED",
                 _f(r["mfu_spec"] * 100 if r.get("mfu_spec") else None), str(r.get("flash_only_ok", "-")),
                 _f(r["img_per_s"] / base["img_per_s"] if base and r.get("ok") else None, ".2f")]
                for r in d["results"]]
        tables.append((f"Teacher target alone, batch {d.get('batch_size')}",
                       ["variant", "img/s", "ms", "MFU% spec", "flash-only", "x official"], rows))
    for key, title in (("loader", "Loaders alone"), ("e2e", "End to end (loader + fast step)")):
        d = merged[key]
        if not d:
            continue
        rows = [[r["name"], _f(r.get("img_per_s")) if r.get("ok") else ("skipped" if "skipped" in r else "FAILED"),
                 _f(r["data_wait"] * 100 if r.get("data_wait") is not None else None),
                 _f(r.get("vs_step_only"), ".2f"), str(r.get("workers", "-"))] for r in d["results"]]
        tables.append((f"{title}, batch {d.get('batch_size')}", ["loader", "img/s", "data-wait %", "x step-only",
                                                                  "workers"], rows))
    gt = merged["gpu_tests"]
    sec_rows = [[s["name"], "skipped" if s.get("skipped") else str(s.get("rc")), _f(s.get("seconds")),
                 "yes" if s.get("timed_out") else ""] for s in sections]
    if gt:
        sec_rows.append(["gpu tests", f"{gt['passed']} passed, {gt['failures'] + gt['errors']} failed, "
                                      f"{gt['skipped']} skipped", "", ""])
        for name in gt["failed_tests"]:
            sec_rows.append(["  FAILED", name, "", ""])
    tables.append(("Sections", ["section", "rc / result", "seconds", "timed out"], sec_rows))
    return merged, tables


def print_tables(tables) -> None:
    try:
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table
    except ImportError:
        for title, cols, rows in tables:
            print(f"\n{title}\n" + " | ".join(cols))
            for r in rows:
                print(" | ".join(r))
        return
    con = Console(width=140)
    for title, cols, rows in tables:
        t = Table(title=escape(title), title_justify="left")
        for i, c in enumerate(cols):
            t.add_column(c, justify="left" if i == 0 else "right")
        for r in rows:
            t.add_row(*[escape(str(c)) for c in r])
        con.print(t)


def markdown(tables, env: Optional[dict]) -> str:
    lines = ["# fdfast device run" + (" (DRY RUN: CPU, tiny models)" if DRY else ""), ""]
    if env:
        lines.append(f"GPU: {env.get('gpu')} | driver {env.get('driver')} | torch {env.get('torch')} | "
                     f"timm {env.get('timm')} | torchvision {env.get('torchvision')} | "
                     f"python {env.get('python')} | {env.get('cpu_count')} CPUs")
        lines.append("")
    for title, cols, rows in tables:
        lines += [f"## {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        lines.append("")
    return "\n".join(lines)


def card_slug(env: Optional[dict]) -> str:
    if DRY:
        return "cpu-dryrun"
    name = (env or {}).get("gpu") or "unknown-gpu"
    name = name.lower().replace("nvidia", "").strip()
    return "-".join("".join(ch if ch.isalnum() else " " for ch in name).split()) or "unknown-gpu"


def main() -> int:
    global LOG
    OUT.mkdir(parents=True, exist_ok=True)
    LOG = open(OUT / "device.log", "a")
    say(f"fdfast device run: out {OUT}, budget {BUDGET_S:.0f}s, dry_run={DRY}")
    if DRY:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    only = {x.strip() for x in os.environ.get("DEVICE_SECTIONS", "").split(",") if x.strip()}
    sections = []
    for s in plan():
        if only and s["name"] not in only:
            continue
        sections.append(run_section(s["name"], s["cmd"], s["cap"], s.get("min", 20.0)))
    merged, tables = summarize(sections)
    md = markdown(tables, merged.get("env"))
    (OUT / "device.json").write_text(json.dumps(merged, indent=2, default=str))
    (OUT / "summary.md").write_text(md)
    # the same, named as bench/results/ expects: <card>-<date>.json|md (copy them there and commit)
    stem = f"{card_slug(merged.get('env'))}-{time.strftime('%Y-%m-%d')}"
    (OUT / f"{stem}.json").write_text(json.dumps(merged, indent=2, default=str))
    (OUT / f"{stem}.md").write_text(md)
    say(f"total {time.monotonic() - T0:.0f}s; results in {OUT} (device.json, summary.md, {stem}.json|md, device.log)")
    print_tables(tables)
    LOG.close()
    bad = [s["name"] for s in sections if s.get("rc") not in (0, None) or s.get("timed_out")]
    gt = merged.get("gpu_tests") or {}
    return 1 if bad or gt.get("failures") or gt.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
