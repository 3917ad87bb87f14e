"""``--profile``: where one FD step's time goes, by kernel family, from ``torch.profiler``.

The step as the config builds it (compiled, as shipped) runs ``--warmup`` untimed steps (compilation,
CUDA-graph capture), then ``--steps`` steps (default 20) under the profiler. Each GPU kernel (each aten op
on a CPU run: CPU op names differ, the same name patterns classify them) is put in one family:

  GEMM               cuBLAS / CUTLASS / nvjet / Triton matmul templates, convolutions
  attention fwd/bwd  SDPA (flash, memory-efficient, cuDNN), FlexAttention, explicit softmax
  norms/elementwise  LayerNorm, GELU, adds, reductions, Triton pointwise / reduction kernels
  optimizer          AdamW (fused or foreach), gradient-norm clipping
  copies             memcpy / memset, copy and cat kernels
  other              anything else (e.g. NCCL)
  idle               the rest of the wall time: on the GPU, time no kernel runs (launch gaps, host syncs,
                     profiler overhead); on the CPU, host time outside any aten op

The table (ms/step per family, share of the step, the top kernels of each) is written as markdown and
JSON to ``--profile-dir`` (default ``bench/results``), named ``profile-<card>-<date>``.
"""
from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench.common import synthetic_batches
from bench.report import Recorder
from bench.step import build_fast_step
from bench.tables import Table, card_slug, fmt, markdown, print_tables
from bench.timing import fresh_start, sync
from fdfast.files import atomic_write
from fdfast.config import load_config
from fdfast.distributed import DistInfo

FAMILIES = ("GEMM", "attention fwd", "attention bwd", "norms/elementwise", "optimizer", "copies", "other", "idle")
# Substrings of lower-cased kernel / op names, tried in this order (the first family that matches wins).
OPTIMIZER = ("adam", "multi_tensor_apply", "foreach", "lpnorm")
# torch.optim's profiler annotation: a CPU op under it (a single-tensor AdamW's adds and multiplies) is optimizer
OPTIMIZER_STEP = "optimizer.step"
ATTENTION = ("attention", "fmha", "flash", "softmax", "sdpa", "scaled_dot_product")
BACKWARD = ("backward", "bwd", "fmha_cutlassb")
GEMM = ("gemm", "xmma", "nvjet", "cublas", "cutlass", "wgrad", "dgrad", "conv", "mkldnn", "onednn",
        "aten::mm", "aten::addmm", "aten::_addmm", "aten::bmm", "aten::baddbmm", "tem_fused_mm",
        "tem_fused_addmm", "tem_fused_bmm")
COPIES = ("memcpy", "memset", "copy", "aten::cat", "catarray", "aten::clone", "aten::contiguous")
COMMUNICATION = ("nccl",)  # all-reduce kernels say "reduce" but are not elementwise work: "other"
ELEMENTWISE = ("norm", "elementwise", "vectorized", "reduce", "reduction", "gelu", "loss", "triton_", "aten::")


def classify(name: str) -> str:
    """The family of a CUDA kernel or a CPU aten op, from its name."""
    n = name.lower()
    if n.startswith(OPTIMIZER_STEP) or any(p in n for p in OPTIMIZER):
        return "optimizer"
    if any(p in n for p in ATTENTION):
        return "attention bwd" if any(p in n for p in BACKWARD) else "attention fwd"
    for family, patterns in (("GEMM", GEMM), ("copies", COPIES), ("other", COMMUNICATION),
                             ("norms/elementwise", ELEMENTWISE)):
        if any(p in n for p in patterns):
            return family
    return "other"


def _under_optimizer_step(e) -> str:
    """``'Optimizer.step: '`` for an op run inside ``optimizer.step()``, else ``''`` (a name prefix)."""
    parent = e.cpu_parent
    while parent is not None:
        if parent.name.lower().startswith(OPTIMIZER_STEP):
            return "Optimizer.step: "
        parent = parent.cpu_parent
    return ""


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (kernels of several streams overlap)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def family_times(events, device_type: str, wall_us: float, steps: int) -> dict[str, Any]:
    """ms/step per family (and its top names) from profiler events: the GPU kernels of a CUDA run, the
    aten ops' self time of a CPU run; idle = wall time not covered by them."""
    per_name: dict[str, float] = defaultdict(float)
    if device_type == "cuda":
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]
        for e in kernels:
            per_name[e.name] += e.time_range.elapsed_us()
        busy = _busy_us([(e.time_range.start, e.time_range.end) for e in kernels])
    else:
        for e in events:
            if e.device_type == DeviceType.CPU and e.name.startswith("aten::"):
                per_name[_under_optimizer_step(e) + e.name] += e.self_cpu_time_total
        busy = sum(per_name.values())
    families: dict[str, dict[str, Any]] = {f: {"us": 0.0, "top": []} for f in FAMILIES}
    for name, us in sorted(per_name.items(), key=lambda kv: -kv[1]):
        fam = families[classify(name)]
        fam["us"] += us
        if len(fam["top"]) < 3:
            fam["top"].append([name[:120], us / 1e3 / steps])
    # overlapping kernels (several streams) count once in `busy`; scale families to it so that the
    # shares add up to the step
    scale = busy / sum(f["us"] for f in families.values()) if busy else 0.0
    families["idle"]["us"] = max(wall_us - busy, 0.0)
    step_ms = wall_us / 1e3 / steps
    out = {}
    for f, d in families.items():
        ms = d["us"] * (1.0 if f == "idle" else scale) / 1e3 / steps
        out[f] = {"ms_per_step": ms, "share": ms / step_ms if step_ms else 0.0, "top": d["top"]}
    return {"wall_ms_per_step": step_ms, "steps": steps, "families": out}


def profile_table(data: dict[str, Any]) -> Table:
    rows = [[f, fmt(d["ms_per_step"], ".2f"), fmt(d["share"] * 100), "; ".join(f"{n} ({ms:.2f})" for n, ms in d["top"])]
            for f, d in data["families"].items()]
    rows.append(["total", fmt(data["wall_ms_per_step"], ".2f"), "100.0", ""])
    return (f"Profile of {data['steps']} steps on {data['device']}: ms/step by kernel family",
            ["family", "ms/step", "% of step", "top kernels (ms/step)"], rows)


def write_profile(out_dir: str | Path, data: dict[str, Any]) -> tuple[Path, Path]:
    """``profile-<card>-<date>.md`` (the table and the run it describes) and ``.json`` in ``out_dir``."""
    stem = Path(out_dir) / f"profile-{card_slug(data['device'])}-{time.strftime('%Y-%m-%d')}"
    md = [f"# fdfast step profile ({data['device']})", "",
          f"config {data['config']}, overrides {' '.join(data['overrides']) or '-'}; batch {data['batch_size']}, "
          f"precision {data['precision']}; torch {data['torch']}", "", *markdown([profile_table(data)])]
    md_path = atomic_write(stem.with_suffix(".md"), lambda tmp: tmp.write_text("\n".join(md)))
    json_path = atomic_write(stem.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(data, indent=2)))
    return md_path, json_path


def run_profile_mode(args, info: DistInfo, rec: Recorder) -> None:
    dev = info.device
    cfg = load_config(args.config, args.overrides)
    fresh_start(dev)
    built = build_fast_step(cfg, info, backend=args.compile_backend, trust_pickle=args.trust_pickle)
    batches = synthetic_batches(cfg, dev, 4, cfg.train.batch_size)
    for i in range(args.warmup):
        built.run(*batches[i % 4], i)
    sync(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(args.steps):
            built.run(*batches[i % 4], args.warmup + i)
        sync(dev)
        wall_us = (time.perf_counter() - t0) * 1e6
    data = family_times(prof.events(), dev.type, wall_us, args.steps)
    env = rec.data["env"]
    data.update(device=env.get("gpu") or f"cpu {env.get('cpu')}", config=str(args.config),
                overrides=list(args.overrides), batch_size=cfg.train.batch_size, precision=built.precision,
                torch=torch.__version__)
    rec.add({"mode": "profile", "name": "fast", "ok": True, **data})
    data["env"] = env  # the profile's own JSON names the fdfast version, commit and hardware too
    if info.is_main:
        md, js = write_profile(args.profile_dir, data)
        rec.note(f"profile table: {md} and {js.name}")
        print_tables([profile_table(data)])
