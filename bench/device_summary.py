"""What a device run reports: every section's JSON merged, a top-level ``summary`` of the headline numbers
(``None`` where a section did not run or failed), the tables printed last and the markdown beside the JSON.

``summary``: gpu, step_img_s / official_img_s / x_official / mfu_measured (ViT-B/16 <- CLIP B/16, batch
128, as shipped), teacher_img_s (compiled + CUDA-graph teacher target), teacher_bf16 (the same with
``model.teacher.bf16``: img/s and target fidelity), e2e and loader per backend (img/s, data-wait), the
FlexAttention and per-block variants, ViT-L/14, SwinV2-B, DINOv2-B/14 and two-teacher (SigLIP2 + DINOv2) steps,
batch 256, the max-autotune variants with their compile time, the profile's ms/step per family, GPU tests and wheels.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

from bench.tables import Table, fmt

STEP_SECTIONS = ("step128", "vitl14", "swinv2b", "dinov2b14", "teachers2", "step256", "autotune")


def _load(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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


def _row(d: Optional[dict], name: str) -> Optional[dict]:
    """The successful result called ``name`` of a section, or None."""
    return next((r for r in (d or {}).get("results", []) if r.get("name") == name and r.get("ok")), None)


def _get(r: Optional[dict], key: str) -> Any:
    return r.get(key) if r else None


def _step(d: Optional[dict], name: str = "fast") -> dict[str, Any]:
    r = _row(d, name)
    return {"img_s": _get(r, "img_per_s"), "mfu_measured": _get(r, "mfu_measured"),
            "peak_mem_gib": _get(r, "peak_mem_gib"), "compile_s": _get(r, "warmup_s")}


def _loader_rows(d: Optional[dict]) -> dict[str, Any]:
    """Per backend entry: img/s and data-wait; DALI at the config's hw_decoder_load (0.65) is 'dali'."""
    out = {}
    for r in (d or {}).get("results", []):
        key = "dali" if r["name"] == "dali@0.65" else r["name"]
        out[key] = {"img_s": r.get("img_per_s"), "data_wait": r.get("data_wait"), "ok": r.get("ok"),
                    "why": r.get("skipped") or r.get("error")}
    return out


def headline(merged: dict) -> dict[str, Any]:
    s128 = merged.get("step128")
    fast, official = _row(s128, "fast"), _row(s128, "official")
    teacher = _row(merged.get("teacher"), "compiled+graph")
    teacher_bf16 = _row(merged.get("teacher"), "compiled+graph+bf16")
    e2e = _loader_rows(merged.get("e2e"))
    wheels = (merged.get("wheels") or {}).get("wheels", [])
    gt = merged.get("gpu_tests") or {}
    prof = next(iter((merged.get("profile") or {}).get("results", [])), None)
    return {
        "gpu": (merged.get("env") or {}).get("gpu"),
        "step_img_s": _get(fast, "img_per_s"), "official_img_s": _get(official, "img_per_s"),
        "x_official": fast["img_per_s"] / official["img_per_s"] if fast and official else None,
        "mfu_measured": _get(fast, "mfu_measured"), "teacher_img_s": _get(teacher, "img_per_s"),
        "teacher_bf16": {k: _get(teacher_bf16, k) for k in ("img_per_s", "target_cosine_min", "target_fd_loss")},
        "e2e": {k: v for k, v in e2e.items() if not k.startswith("step-only")},
        "loader": _loader_rows(merged.get("loader")),
        "variants_b16": {n: _step(s128, n) for n in ("fast", "flex", "flex-small", "blocks")},
        "vit_l14": _step(merged.get("vitl14")), "swinv2_b": _step(merged.get("swinv2b")),
        "dinov2_b14": _step(merged.get("dinov2b14")), "two_teachers": _step(merged.get("teachers2")),
        "batch256": {"img_s": _get(_row(merged.get("step256"), "fast"), "img_per_s"),
                     "official_img_s": _get(_row(merged.get("step256"), "official"), "img_per_s")},
        "autotune": {n: _step(merged.get("autotune"), n) for n in ("fast-autotune", "flex-autotune")},
        "profile_ms_per_step": {f: v["ms_per_step"] for f, v in prof["families"].items()} if prof else None,
        "gpu_tests": {k: gt.get(k) for k in ("passed", "failures", "errors", "skipped")} if gt else None,
        "wheels": {w["name"]: w.get("installed", False) for w in wheels},
    }


def merge(out: Path, sections: list[dict], dry: bool, budget_s: float) -> dict[str, Any]:
    merged: dict[str, Any] = {"dry_run": dry, "budget_s": budget_s, "sections": sections,
                              "env": _load(out / "env.json"), "wheels": _load(out / "wheels.json"),
                              "gpu_tests": junit_counts(out / "gpu_tests.xml")}
    for s in sections:
        if s["name"] not in merged:
            merged[s["name"]] = _load(out / f"{s['name']}.json")
    return {"summary": headline(merged), **merged}


def _step_table(key: str, d: dict) -> Table:
    base = _row(d, "official")
    rows = []
    for r in d["results"]:
        if r.get("ok"):
            rows.append([r["name"], fmt(r["img_per_s"]), fmt(r["step_ms"]["median"]),
                         fmt(r["mfu_spec"] * 100 if r.get("mfu_spec") else None),
                         fmt(r["mfu_measured"] * 100 if r.get("mfu_measured") else None),
                         fmt(r.get("peak_mem_gib")), fmt(r["warmup_s"], ".0f"),
                         fmt(r["img_per_s"] / base["img_per_s"] if base else None, ".2f"), f"{r['loss_first']:.4f}"])
        else:
            rows.append([r["name"], "FAILED", "", "", "", "", "", "", (r.get("error") or "")[:40]])
    fl = (d.get("flops_per_img") or {}).get("total")
    pk = d.get("peak_tflops") or {}
    return (f"{key}: FD step, batch {d.get('batch_size')} ({fmt(fl / 1e9 if fl else None, '.2f')} GFLOP/img; peak spec "
            f"{fmt(pk.get('spec_bf16_dense'))} / measured {fmt(pk.get('measured_bf16_matmul'))} TFLOP/s)",
            ["variant", "img/s", "step ms", "MFU% spec", "MFU% meas", "mem GiB", "compile s", "x official", "loss@0"],
            rows)


def tables(merged: dict) -> list[Table]:
    out: list[Table] = []
    for key in STEP_SECTIONS:
        d = merged.get(key)
        if d:
            out.append(_step_table(key, d))
        if d and d.get("student_sdpa_backends"):
            out.append(("Student attention (bias + grad): SDPA backends usable", ["backend", "result"],
                        [[k, v] for k, v in d["student_sdpa_backends"].items()]))
    d = merged.get("teacher")
    if d:
        base = _row(d, "official-fp16")
        out.append((f"Teacher target alone, batch {d.get('batch_size')}",
                    ["variant", "img/s", "ms", "MFU% spec", "flash-only", "x official", "target cos min"],
                    [[r["name"], fmt(r.get("img_per_s")), fmt(r["step_ms"]["median"], ".2f") if r.get("ok") else "FAILED",
                      fmt(r["mfu_spec"] * 100 if r.get("mfu_spec") else None), str(r.get("flash_only_ok", "-")),
                      fmt(r["img_per_s"] / base["img_per_s"] if base and r.get("ok") else None, ".2f"),
                      fmt(r.get("target_cosine_min"), ".5f")]
                     for r in d["results"]]))
    for key, title in (("loader", "Loaders alone"), ("e2e", "End to end (loader + fast step)")):
        d = merged.get(key)
        if d:
            out.append((f"{title}, batch {d.get('batch_size')}",
                        ["loader", "img/s", "data-wait %", "x step-only", "workers", "note"],
                        [[r["name"], fmt(r.get("img_per_s")) if r.get("ok") else ("skipped" if "skipped" in r else "FAILED"),
                          fmt(r["data_wait"] * 100 if r.get("data_wait") is not None else None),
                          fmt(r.get("vs_step_only"), ".2f"), str(r.get("workers", "-")),
                          (r.get("note") or r.get("skipped") or r.get("error") or "")[:50]] for r in d["results"]]))
    prof = merged["summary"]["profile_ms_per_step"]
    if prof:
        out.append(("Profile of the shipped step (ms/step by kernel family)", ["family", "ms/step"],
                    [[f, fmt(ms, ".2f")] for f, ms in prof.items()]))
    wheels = (merged.get("wheels") or {}).get("wheels", [])
    if wheels:
        out.append(("Carried wheels", ["wheel", "parts", "sha256 ok", "installed", "note"],
                    [[w["name"], ",".join(w["parts"]) or "whole", str(w["ok"]), str(w.get("installed")),
                      (w.get("reason") or "")[:60]] for w in wheels]))
    rows = [[s["name"], "skipped" if s.get("skipped") else str(s.get("rc")), fmt(s.get("seconds")),
             "yes" if s.get("timed_out") else ""] for s in merged["sections"]]
    gt = merged.get("gpu_tests")
    if gt:
        rows.append(["gpu tests", f"{gt['passed']} passed, {gt['failures'] + gt['errors']} failed, {gt['skipped']} skipped",
                     "", ""])
        rows += [["  FAILED", name, "", ""] for name in gt["failed_tests"]]
    out.append(("Sections", ["section", "rc / result", "seconds", "timed out"], rows))
    return out
