#!/usr/bin/env python
"""FD throughput benchmark: the fast step vs an official-style step, loaders, end to end.

    python bench/throughput.py --mode step --baseline                  # ViT-B/16 <- CLIP B/16, 224, batch 128
    python bench/throughput.py --mode step --baseline --variant eager:train.compile=false,train.cuda_graph_teacher=false
    python bench/throughput.py --mode teacher                           # teacher forward: eager / compiled / graph
    python bench/throughput.py --mode loader --generate 2000 --backends torchvision,nvjpeg
    python bench/throughput.py --mode e2e --data /path/to/imagenet/train --backends nvjpeg
    python bench/throughput.py --tiny --mode step --baseline            # CPU smoke run, tiny models
    torchrun --nproc_per_node 8 bench/throughput.py --mode step         # per GPU and total

Timing: warm-up steps (compilation, graph capture, allocator growth) are excluded; every timed step is
bracketed by CUDA events on the step's stream (no host sync inside the timed loop), and the median
and p10/p90 over the timed steps are reported. MFU uses the analytic FLOP count of bench/flops.py
against the card's dense bf16 spec peak and against a bf16 matmul measured in the same process.
Results: a rich table on stdout (last) and ``--json PATH`` (rewritten after every variant, so a run
cut short by a timeout keeps what it measured).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "pretrain" / "fd_clip_vit_base_300ep.yaml"
# --tiny: same code paths, models small enough for a CPU smoke test (17 tokens both sides).
TINY_OVERRIDES = [
    "model.student.img_size=32", "model.student.patch_size=8", "model.student.embed_dim=48",
    "model.student.depth=2", "model.student.num_heads=2",
    "model.teacher.model_kwargs={patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
]
LOADER_BACKENDS = ("torchvision", "ffcv", "dali", "nvjpeg", "synthetic")
# ImageNet-like sizes (mean about 400 x 350) for --generate
IMAGENET_LIKE_SIZES = ((375, 500), (500, 375), (333, 500), (350, 400), (400, 350), (480, 640), (300, 300))


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def _split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Fast-path switches not (yet) in TrainConfig are set as attributes after validation, so the
    benchmark can exercise them before the schema has them; everything else goes through the schema."""
    from fdfast.config import TrainConfig, parse_override  # noqa: PLC0415
    from fdfast.fast import FAST_DEFAULTS  # noqa: PLC0415

    known = {f.name for f in dataclasses.fields(TrainConfig)}
    schema, extra = [], {}
    for ov in overrides:
        keys, value = parse_override(ov)
        if len(keys) == 2 and keys[0] == "train" and keys[1] not in known and keys[1] in FAST_DEFAULTS:
            extra[keys[1]] = value
        else:
            schema.append(ov)
    return schema, extra


def load_bench_config(path: Optional[str], overrides: list[str]):
    from fdfast.config import load_config  # noqa: PLC0415

    schema, extra = _split_overrides(overrides)
    cfg = load_config(path, schema)
    for k, v in extra.items():
        setattr(cfg.train, k, v)
    return cfg


def fast_switches(cfg) -> dict[str, Any]:
    from fdfast.fast import FAST_DEFAULTS, train_option  # noqa: PLC0415

    out = {k: train_option(cfg, k) for k in FAST_DEFAULTS}
    out["precision"] = cfg.train.precision
    out["fused_adamw"] = cfg.optim.fused
    return out


# ----------------------------------------------------------------------------------------------
# Steps under test
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Built:
    name: str
    run: Callable[[torch.Tensor, torch.Tensor, int], dict]  # (images, labels, step index) -> metrics
    model: nn.Module
    teacher: nn.Module
    precision: str
    notes: list[str]
    target_fn: Any = None


def _ddp(run: nn.Module, info) -> nn.Module:
    if not info.enabled:
        return run
    kwargs = {"device_ids": [info.local_rank]} if info.device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(run, broadcast_buffers=False, **kwargs)


def build_fast_step(cfg, info, *, backend: Optional[str] = None) -> Built:
    """The fdfast step exactly as the trainer builds it (build_distill_task + build_training), with the
    fast switches of fdfast.fast from the config; ``backend`` = compile backend for CPU checks."""
    from fdfast.fast import apply_backend_settings  # noqa: PLC0415
    from fdfast.trainer import build_distill_task, build_training, seed_all  # noqa: PLC0415

    seed_all(cfg.train.seed)
    task = build_distill_task(cfg, info, compile_backend=backend)
    optimizer, step, schedule = build_training(task, cfg, info, steps_per_epoch=1000)
    applied = apply_backend_settings(cfg, info.device)

    def run_step(images: torch.Tensor, labels: torch.Tensor, i: int) -> dict:
        step.set_lr(schedule(i))
        return step([(images, labels)])

    notes = [f"backend flags: {applied}"] if applied else []
    if getattr(optimizer, "defaults", {}).get("fused"):
        notes.append("fused AdamW")
    return Built("fast", run_step, task.model, task.teacher, step.precision, notes, task.target_fn)


def build_official_step(cfg, info) -> Built:
    """An official-style step (main_fd.py + models/feature_distillation.py) on the same models and data.

    eager; fp16 autocast + GradScaler on CUDA (fp32 on CPU: both are CUDA-only here); float NCHW input
    made by ToTensor + Normalize semantics (separate ops, contiguous NCHW); CLIP re-normalisation of that
    tensor for the teacher; CLIP teacher with fp16 weights (convert_weights) and explicit-softmax
    attention in student and teacher (no SDPA); single-tensor AdamW (torch 1.12 default);
    zero_grad(set_to_none=False); clip_grad_norm_ (no foreach); torch.cuda.synchronize() + loss.item()
    + scaler.get_scale() every step for logging, as the official train_one_epoch does."""
    from fdfast.models.student import DistillModel, set_attention_kernel  # noqa: PLC0415
    from fdfast.models.teachers import build_teacher  # noqa: PLC0415
    from fdfast.objective import fd_loss, whiten  # noqa: PLC0415
    from fdfast.optim import Schedule, param_groups  # noqa: PLC0415
    from fdfast.trainer import seed_all  # noqa: PLC0415
    from pipelines.base import IMAGENET_MEAN, IMAGENET_STD  # noqa: PLC0415

    dev = info.device
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # main_fd.py sets it
    s = cfg.model.student
    tcfg = cfg.model.teacher
    if tcfg.kind == "clip" and cuda:
        tcfg = dataclasses.replace(tcfg, fp16_weights=True)
    seed_all(cfg.train.seed)
    teacher = build_teacher(tcfg, s.img_size).to(dev)
    for m in teacher.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    model = DistillModel(s, teacher.embed_dim).to(dev)
    set_attention_kernel(model.encoder, "eager")
    groups = param_groups(model, cfg.optim, s)
    run = _ddp(model, info)
    clean = [{k: v for k, v in g.items() if k not in ("names", "lr_scale")} for g in groups]
    optimizer = torch.optim.AdamW(clean, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, foreach=False, fused=False)
    precision = "fp16" if cuda else "fp32"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    params = [p for g in groups for p in g["params"]]
    total_batch = cfg.train.batch_size * info.world_size
    schedule = Schedule(cfg.optim, total_batch, 1000, cfg.train.epochs, [g["lr_scale"] for g in groups])

    in_mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    in_std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    t_mean = torch.tensor(teacher.mean, device=dev).view(1, 3, 1, 1)
    t_std = torch.tensor(teacher.std, device=dev).view(1, 3, 1, 1)
    renorm = tuple(teacher.mean) != tuple(IMAGENET_MEAN)
    beta, eps, clip = cfg.model.loss_beta, cfg.model.whiten_eps, cfg.optim.clip_grad

    def run_step(images: torch.Tensor, labels: torch.Tensor, i: int) -> dict:
        # ToTensor + Normalize (host side in the official pipeline): float NCHW, separate ops
        x = images.contiguous().float().div_(255.0)
        x = (x - in_mean) / in_std
        for g, lr in zip(optimizer.param_groups, schedule(i)):
            g["lr"] = lr
        model.train()
        with torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext():
            with torch.no_grad():
                xt = ((x * in_std + in_mean) - t_mean) / t_std if renorm else x
                if xt.shape[-1] != teacher.img_size:
                    xt = nn.functional.interpolate(xt, size=(teacher.img_size,) * 2, mode="bicubic",
                                                   align_corners=False)
                if tcfg.fp16_weights:
                    xt = xt.half()
                target = whiten(teacher(xt), eps).detach()
            loss = fd_loss(run(x), target, beta)
        optimizer.zero_grad(set_to_none=False)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"),
                                                   foreach=False)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
            torch.cuda.synchronize()
            scaler.get_scale()
        else:
            optimizer.step()
        loss.item()  # the official loop logs every step
        return {"loss": loss.detach(), "grad_norm": grad_norm}

    notes = ["official-style: eager, explicit-softmax attention, single-tensor AdamW, per-step host sync"]
    if cuda:
        notes.append("fp16 autocast + GradScaler; CLIP teacher fp16 weights" if tcfg.kind == "clip"
                     else "fp16 autocast + GradScaler")
    else:
        notes.append("CPU: fp32 (fp16 autocast + GradScaler are CUDA-only here)")
    return Built("official", run_step, model, teacher, precision, notes)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------
def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _stats(ms: list[float]) -> dict[str, float]:
    xs = sorted(ms)

    def q(p: float) -> float:
        k = (len(xs) - 1) * p
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"median": statistics.median(xs), "p10": q(0.10), "p90": q(0.90), "mean": statistics.fmean(xs),
            "min": xs[0], "max": xs[-1], "n": len(xs)}


def time_loop(fn: Callable[[int], Any], dev: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Run ``fn(i)`` ``warmup`` times untimed, then ``steps`` times timed (CUDA events per step)."""
    t_warm = time.perf_counter()
    for i in range(warmup):
        fn(i)
    _sync(dev)
    warm_s = time.perf_counter() - t_warm
    ms: list[float] = []
    if dev.type == "cuda":
        stream = torch.cuda.current_stream(dev)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
        t0 = time.perf_counter()
        for i in range(steps):
            events[i][0].record(stream)
            fn(warmup + i)
            events[i][1].record(stream)
        _sync(dev)
        wall = time.perf_counter() - t0
        ms = [a.elapsed_time(b) for a, b in events]
    else:
        t0 = time.perf_counter()
        for i in range(steps):
            t = time.perf_counter()
            fn(warmup + i)
            ms.append((time.perf_counter() - t) * 1e3)
        wall = time.perf_counter() - t0
    return {"step_ms": _stats(ms), "wall_ms_per_step": wall * 1e3 / max(steps, 1), "warmup_s": warm_s}


def measure_matmul_tflops(dev: torch.device, n: int = 8192, iters: int = 20) -> Optional[float]:
    """Dense bf16 matmul throughput on this card (the achievable peak MFU is quoted against)."""
    if dev.type != "cuda":
        return None
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        a @ b
    end.record()
    torch.cuda.synchronize(dev)
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


def _peak_mem_gib(dev: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None


def _reset_mem(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _reset_compiled() -> None:
    """Forget compiled graphs between variants (each variant compiles its own; the on-disk inductor
    cache still makes a repeated graph cheap) and drop the eager-flex compiled kernel."""
    import fdfast.fast as fast  # noqa: PLC0415

    torch._dynamo.reset()
    fast._compiled_flex = None


def synthetic_batches(cfg, dev: torch.device, n: int, batch_size: int, rank: int = 0) -> list:
    """Device-resident uint8 channels-last batches from pipelines.synthetic, made before timing."""
    from pipelines.base import LoaderSpec  # noqa: PLC0415
    from pipelines.synthetic import SyntheticLoader  # noqa: PLC0415

    spec = LoaderSpec(path="", train=True, batch_size=batch_size, img_size=cfg.model.student.img_size, device=dev,
                      rank=rank, seed=cfg.train.seed, num_classes=cfg.data.num_classes,
                      synthetic_size=batch_size * n)
    return [(x.contiguous(memory_format=torch.channels_last), y) for x, y in SyntheticLoader(spec)]


# ----------------------------------------------------------------------------------------------
# Environment, FLOPs, output
# ----------------------------------------------------------------------------------------------
def environment(dev: torch.device, world: int) -> dict[str, Any]:
    import timm  # noqa: PLC0415

    env: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": platform.node(), "python": platform.python_version(),
        "torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda, "device": str(dev),
        "world_size": world, "cpu_count": os.cpu_count(), "argv": sys.argv[1:],
    }
    try:
        import torchvision  # noqa: PLC0415
        env["torchvision"] = torchvision.__version__
    except ImportError:
        env["torchvision"] = None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        env.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2 ** 30, 1), capability=f"{p.major}.{p.minor}",
                   sm_count=p.multi_processor_count)
        try:
            env["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        except Exception:  # noqa: BLE001 - informational only
            env["driver"] = None
    else:
        env["gpu"] = None
        env["cpu"] = platform.processor() or platform.machine()
    return env


def step_flops(model: nn.Module, teacher: nn.Module, tokens: int) -> dict[str, Any]:
    from bench.flops import fd_flops_from_models  # noqa: PLC0415

    return fd_flops_from_models(model.encoder, teacher, tokens=tokens, teacher_dim=teacher.embed_dim)


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

    def flush(self) -> None:
        if not (self.enabled and self.path):
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)


def _gather(value: float, info) -> list[float]:
    if not info.enabled:
        return [value]
    import torch.distributed as dist  # noqa: PLC0415

    out: list = [None] * info.world_size
    dist.all_gather_object(out, value)
    return [float(v) for v in out]


def _fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def print_table(title: str, columns: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:
    try:
        from rich.console import Console  # noqa: PLC0415
        from rich.table import Table  # noqa: PLC0415
    except ImportError:
        print(f"\n{title}\n" + " | ".join(columns))
        for r in rows:
            print(" | ".join(r))
        for n in notes:
            print(f"  {n}")
        return
    from rich.markup import escape  # noqa: PLC0415

    t = Table(title=escape(title), title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*[escape(c) for c in r])
    con = Console(width=max(120, shutil.get_terminal_size((140, 20)).columns))
    con.print(t)
    for n in notes:
        con.print(f"  {n}", markup=False, highlight=False)


# ----------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------
def _record_failure(result: dict, e: BaseException, show: bool = True) -> None:
    """A variant failed: keep its error and traceback in ``result`` (one failing variant must not stop the
    others) and print the traceback when ``show``."""
    result["error"] = f"{type(e).__name__}: {e}"
    result["traceback"] = traceback.format_exc(limit=20)
    if show:
        print(result["traceback"], file=sys.stderr, flush=True)


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME`` or ``NAME:key=value,key=value`` (values must not contain commas)."""
    name, _, rest = text.partition(":")
    overrides = [x.strip() for x in rest.split(",") if x.strip()] if rest else []
    return name.strip(), overrides


def run_step_mode(args, info, rec: Recorder) -> None:
    dev = info.device
    main = info.is_main
    peak_measured = measure_matmul_tflops(dev)
    from bench.flops import spec_peak_tflops  # noqa: PLC0415

    peak_spec = spec_peak_tflops(rec.data["env"].get("gpu") or "") if dev.type == "cuda" else None
    rec.data["peak_tflops"] = {"spec_bf16_dense": peak_spec, "measured_bf16_matmul": peak_measured}
    variants = [parse_variant(v) for v in args.variant] or [("fast", [])]
    if args.baseline:
        variants = [("official", None)] + variants
    base_ovs = list(args.overrides)
    first = None
    for name, extra in variants:
        cfg = load_bench_config(args.config, base_ovs + (extra or []))
        bs = cfg.train.batch_size
        batches = synthetic_batches(cfg, dev, 4, bs, info.rank)
        _reset_compiled()
        _reset_mem(dev)
        result: dict[str, Any] = {"mode": "step", "name": name, "overrides": extra or [], "batch_size": bs,
                                  "world_size": info.world_size, "ok": False}
        try:
            built = build_official_step(cfg, info) if extra is None else build_fast_step(cfg, info,
                                                                                       backend=args.compile_backend)
            result["switches"] = ({"official": True} if extra is None else fast_switches(cfg))
            result["precision"] = built.precision
            result["notes"] = built.notes
            if first is None:
                first = step_flops(built.model, built.teacher, (cfg.model.student.img_size //
                                                                 cfg.model.student.patch_size) ** 2 + 1
                                   if cfg.model.student.arch == "beit" else built.teacher.num_tokens)
                rec.data["flops_per_img"] = first
            losses: list[float] = []

            def fn(i: int) -> None:
                images, labels = batches[i % len(batches)]
                out = built.run(images, labels, i)
                if i == 0:
                    losses.append(float(out["loss"]))
                fn.last = out  # type: ignore[attr-defined]

            t = time_loop(fn, dev, args.warmup, args.steps)
            losses.append(float(fn.last["loss"]))  # type: ignore[attr-defined]
            med_s = t["step_ms"]["median"] / 1e3
            ips = bs / med_s
            per_rank = _gather(ips, info)
            result.update(t)
            result.update(ok=True, img_per_s=ips, img_per_s_per_rank=per_rank, img_per_s_total=sum(per_rank),
                          img_per_s_wall=bs / (t["wall_ms_per_step"] / 1e3), loss_first=losses[0],
                          loss_last=losses[-1], peak_mem_gib=_peak_mem_gib(dev),
                          graph_captures=getattr(built.target_fn, "captures", None))
            achieved = first["total"] * ips / 1e12
            result["tflops"] = achieved
            result["mfu_spec"] = achieved / peak_spec if peak_spec else None
            result["mfu_measured"] = achieved / peak_measured if peak_measured else None
            del built, fn
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the others
            _record_failure(result, e, show=main)
        rec.add(result)
        if main:
            print(f"[bench] {name}: " + (f"{result['img_per_s']:.1f} img/s, step {result['step_ms']['median']:.1f} ms"
                                         if result["ok"] else result["error"]), flush=True)
    if dev.type == "cuda":
        cfg = load_bench_config(args.config, base_ovs)
        rec.data["student_sdpa_backends"] = probe_student_sdpa(cfg, dev)
        rec.flush()
    _step_summary(rec, info)


def probe_student_sdpa(cfg, dev: torch.device) -> dict[str, str]:
    """Which SDPA kernels the student's attention (shared RPB as a float mask that needs a gradient)
    can run on, and which attention kernels the default dispatch launches (one profiled fwd+bwd)."""
    from fdfast.fast import only_sdpa_backends  # noqa: PLC0415
    from fdfast.models.student import DistillModel, set_attention_kernel  # noqa: PLC0415
    from fdfast.step import autocast, resolve_precision  # noqa: PLC0415

    s = cfg.model.student
    out: dict[str, str] = {}
    try:
        precision = resolve_precision(cfg.train.precision, dev)
        model = DistillModel(s, 64).to(dev).to(memory_format=torch.channels_last)
        set_attention_kernel(model.encoder, "sdpa")
        x = torch.randn(2, 3, s.img_size, s.img_size, device=dev)
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH"):
            try:
                with only_sdpa_backends(name), autocast(precision, dev):
                    model(x).float().sum().backward()
                torch.cuda.synchronize(dev)
                out[name] = "ok"
            except Exception as e:  # noqa: BLE001
                out[name] = f"no ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
        from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

        with profile(activities=[ProfilerActivity.CUDA]) as prof, autocast(precision, dev):
            model(x).float().sum().backward()
            torch.cuda.synchronize(dev)
        keys = ("attention", "fmha", "flash", "cudnn", "mem_eff", "softmax", "cutlass")
        names = sorted({e.key for e in prof.key_averages() if any(k in e.key.lower() for k in keys)})
        out["default dispatch kernels"] = "; ".join(n[:80] for n in names[:6]) or "?"
    except Exception as e:  # noqa: BLE001 - diagnostic only
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    return out


def _step_summary(rec: Recorder, info) -> None:
    res = [r for r in rec.data["results"] if r["mode"] == "step"]
    base = next((r for r in res if r["name"] == "official" and r["ok"]), None)
    ratios = {}
    rows = []
    for r in res:
        ratio = r["img_per_s"] / base["img_per_s"] if (base and r["ok"]) else None
        if ratio is not None and r is not base:
            ratios[f"{r['name']}/official"] = ratio
        if r["ok"]:
            sm = r["step_ms"]
            rows.append([r["name"], str(r["batch_size"]), _fmt(r["img_per_s"]),
                         _fmt(r["img_per_s_total"]) if info.world_size > 1 else "-",
                         f"{sm['median']:.1f} [{sm['p10']:.1f}-{sm['p90']:.1f}]",
                         _fmt(r["mfu_spec"] * 100 if r["mfu_spec"] else None),
                         _fmt(r["mfu_measured"] * 100 if r["mfu_measured"] else None),
                         _fmt(r["peak_mem_gib"], ".1f"), f"{r['loss_first']:.4f}>{r['loss_last']:.4f}",
                         _fmt(ratio, ".2f")])
        else:
            rows.append([r["name"], str(r["batch_size"]), "FAILED", "", (r.get("error") or "")[:60], "", "", "", "", ""])
    rec.data["ratios"] = ratios
    rec.flush()
    if info.is_main:
        f = rec.data.get("flops_per_img") or {}
        env = rec.data["env"]
        pk = rec.data.get("peak_tflops", {})
        notes = [f"FLOPs/img (analytic, bench/flops.py): total {f.get('total', 0) / 1e9:.4g} G = student fwd+bwd "
                 f"{f.get('student_fwd_bwd', 0) / 1e9:.4g} + projector {f.get('projector_fwd_bwd', 0) / 1e9:.4g} + "
                 f"teacher fwd {f.get('teacher_fwd', 0) / 1e9:.4g}",
                 f"peak bf16 TFLOP/s: spec {_fmt(pk.get('spec_bf16_dense'))}, measured matmul "
                 f"{_fmt(pk.get('measured_bf16_matmul'))}; device {env.get('gpu') or env.get('cpu')}, "
                 f"torch {env['torch']}"]
        notes += sorted({n for r in res for n in r.get("notes", [])})
        print_table("FD step throughput (per GPU; median over timed steps, [p10-p90])",
                    ["variant", "batch", "img/s", "img/s total", "step ms", "MFU% spec", "MFU% meas", "mem GiB",
                     "loss first>last", "x official"], rows, notes)


def run_teacher_mode(args, info, rec: Recorder) -> None:
    """Teacher target alone (normalise -> teacher -> whiten): official fp16/explicit attention,
    eager bf16, eager + CUDA graph, compiled, compiled + CUDA graph."""
    from fdfast.fast import build_fast_target, only_sdpa_backends  # noqa: PLC0415
    from fdfast.models.teachers import build_teacher  # noqa: PLC0415
    from fdfast.step import TeacherTarget, autocast, resolve_precision  # noqa: PLC0415

    dev = info.device
    cfg0 = load_bench_config(args.config, list(args.overrides))
    bs = cfg0.train.batch_size
    batches = synthetic_batches(cfg0, dev, 4, bs)
    precision = resolve_precision(cfg0.train.precision, dev)
    cuda = dev.type == "cuda"
    variants = [
        ("official-fp16", {"official": True}),
        ("eager", {"train.compile": False, "train.cuda_graph_teacher": False}),
        ("eager+graph", {"train.compile": False, "train.cuda_graph_teacher": True}),
        ("compiled", {"train.compile": True, "train.cuda_graph_teacher": False}),
        ("compiled+graph", {"train.compile": True, "train.cuda_graph_teacher": True}),
    ]
    if not cuda:
        variants = [v for v in variants if "graph" not in v[0]]
    from bench.flops import model_count, spec_peak_tflops  # noqa: PLC0415

    peak_spec = spec_peak_tflops(rec.data["env"].get("gpu") or "") if cuda else None
    for name, sw in variants:
        _reset_compiled()
        _reset_mem(dev)
        result: dict[str, Any] = {"mode": "teacher", "name": name, "batch_size": bs, "ok": False}
        try:
            cfg = load_bench_config(args.config, list(args.overrides) + [f"{k}={str(v).lower()}" for k, v in sw.items()
                                                                         if k != "official"])
            tcfg = cfg.model.teacher
            official = sw.get("official", False)
            if official and tcfg.kind == "clip" and cuda:
                tcfg = dataclasses.replace(tcfg, fp16_weights=True)
            torch.manual_seed(cfg.train.seed)
            teacher = build_teacher(tcfg, cfg.model.student.img_size).to(dev)
            target = TeacherTarget(teacher, cfg.model.whiten_eps)
            if official:
                for m in teacher.modules():
                    if hasattr(m, "fused_attn"):
                        m.fused_attn = False
                fn = target
                prec = "fp16" if cuda else "fp32"
            else:
                fn = build_fast_target(target, cfg, dev, backend=args.compile_backend)
                prec = precision

            def call(i: int) -> None:
                with autocast(prec, dev):
                    call.out = fn(batches[i % len(batches)][0])  # type: ignore[attr-defined]

            t = time_loop(call, dev, args.warmup, args.steps)
            ips = bs / (t["step_ms"]["median"] / 1e3)
            flops = model_count(teacher).fwd
            result.update(t)
            result.update(ok=True, img_per_s=ips, precision=prec, teacher_fwd_flops=flops,
                          mfu_spec=flops * ips / 1e12 / peak_spec if peak_spec else None,
                          peak_mem_gib=_peak_mem_gib(dev), graph_captures=getattr(fn, "captures", None))
            if cuda and not official:
                try:  # proof that the bias-free teacher attention runs on the FlashAttention kernel
                    with only_sdpa_backends("FLASH_ATTENTION"), autocast(prec, dev), torch.no_grad():
                        teacher(torch.randn(2, 3, teacher.img_size, teacher.img_size, device=dev))
                    result["flash_only_ok"] = True
                except Exception as e:  # noqa: BLE001
                    result["flash_only_ok"] = False
                    result["flash_only_error"] = f"{type(e).__name__}: {e}"[:300]
            del fn, target, teacher, call
        except Exception as e:  # noqa: BLE001
            _record_failure(result, e)
        rec.add(result)
    res = [r for r in rec.data["results"] if r["mode"] == "teacher"]
    base = next((r for r in res if r["name"] == "official-fp16" and r["ok"]), None)
    rows = [[r["name"], r.get("precision", "-"), _fmt(r.get("img_per_s")),
             f"{r['step_ms']['median']:.2f}" if r["ok"] else "FAILED",
             _fmt(r["mfu_spec"] * 100 if r.get("mfu_spec") else None),
             str(r.get("flash_only_ok", "-")),
             _fmt(r["img_per_s"] / base["img_per_s"] if base and r["ok"] else None, ".2f")] for r in res]
    if info.is_main:
        print_table(f"Teacher target forward alone (batch {bs})",
                    ["variant", "precision", "img/s", "ms", "MFU% spec", "flash-only ok", "x official"], rows)


def _loader_spec(cfg, backend: str, data: str, dev: torch.device, info, bs: int, workers: Optional[int]):
    from pipelines import make_spec  # noqa: PLC0415

    d = dataclasses.replace(cfg.data, train=data, backend=backend)
    if workers is not None:
        d = dataclasses.replace(d, num_workers=workers)
    return make_spec(d, train=True, batch_size=bs, img_size=cfg.model.student.img_size, device=dev,
                     rank=info.rank, world_size=info.world_size, seed=cfg.train.seed)


def _build_loader(backend: str, spec):
    """The loader, or a reason to skip it (missing library / data kind)."""
    from pipelines import MissingDependency, build_loader_from_spec  # noqa: PLC0415

    if backend == "ffcv" and not spec.path.endswith(".beton"):
        return None, "ffcv reads .beton files: pass --beton PATH (make one with fdfast-convert)"
    if backend != "ffcv" and backend != "synthetic" and spec.path.endswith(".beton"):
        return None, f"{backend} reads an ImageFolder, not a .beton"
    if backend == "nvjpeg" and spec.device.type != "cuda":
        note = "nvjpeg on CPU: torchvision CPU decode (the GPU decoder needs CUDA)"
    else:
        note = None
    try:
        return build_loader_from_spec(backend, spec), note
    except (MissingDependency, ModuleNotFoundError) as e:
        return None, f"{backend} skipped: {e}"


def _endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _loader_paths(args, backend: str) -> str:
    if backend == "ffcv":
        return args.beton or ""
    return args.data or ""


def _measure_each_loader(args, cfg, info, rec: Recorder, mode: str, measure) -> None:
    """One result row per backend of ``args.backends``: skipped (with the reason) when its loader cannot be
    built here, else ``ok`` with what ``measure(loader, spec, note)`` returns, or the failure."""
    bs = cfg.train.batch_size
    for backend in args.backends:
        result: dict[str, Any] = {"mode": mode, "name": backend, "batch_size": bs, "ok": False}
        spec = _loader_spec(cfg, backend, _loader_paths(args, backend), info.device, info, bs, args.workers)
        loader, note = _build_loader(backend, spec)
        if loader is None:
            result["skipped"] = note
            rec.add(result)
            rec.note(note)
            continue
        try:
            result.update(ok=True, **measure(loader, spec, note))
        except Exception as e:  # noqa: BLE001
            _record_failure(result, e)
        del loader
        rec.add(result)


def run_loader_mode(args, info, rec: Recorder) -> None:
    from pipelines.base import check_batch  # noqa: PLC0415

    dev = info.device
    cfg = load_bench_config(args.config, list(args.overrides))
    bs = cfg.train.batch_size

    def measure(loader, spec, note) -> dict[str, Any]:
        it = _endless(loader)
        for i in range(args.warmup):
            x, y = next(it)
            if i == 0:
                check_batch(x, y)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            x, y = next(it)
        _sync(dev)
        wall = time.perf_counter() - t0
        it.close()
        return dict(img_per_s=args.steps * bs / wall, workers=spec.num_workers, note=note,
                    num_samples=loader.num_samples, stats=getattr(loader, "stats", None))

    _measure_each_loader(args, cfg, info, rec, "loader", measure)
    res = [r for r in rec.data["results"] if r["mode"] == "loader"]
    tv = next((r for r in res if r["name"] == "torchvision" and r["ok"]), None)
    ratios = {f"{r['name']}/torchvision": r["img_per_s"] / tv["img_per_s"] for r in res if r["ok"] and tv}
    rec.data.setdefault("ratios", {}).update(ratios)
    rec.flush()
    rows = [[r["name"], _fmt(r.get("img_per_s")) if r["ok"] else ("skipped" if "skipped" in r else "FAILED"),
             _fmt(r["img_per_s"] / tv["img_per_s"] if tv and r["ok"] else None, ".2f"),
             str(r.get("workers", "-")), (r.get("note") or r.get("skipped") or r.get("error") or "")[:70]]
            for r in res]
    if info.is_main:
        print_table(f"Loaders alone (train augmentation, batch {bs}, per process)",
                    ["backend", "img/s", "x torchvision", "workers", "note"], rows)


def run_e2e_mode(args, info, rec: Recorder) -> None:
    """Loader + fast step; data-wait = host time blocked on the loader / wall time (the trainer's metric)."""
    dev = info.device
    cfg = load_bench_config(args.config, list(args.overrides))
    bs = cfg.train.batch_size
    _reset_mem(dev)
    built = build_fast_step(cfg, info, backend=args.compile_backend)
    batches = synthetic_batches(cfg, dev, 4, bs, info.rank)
    ref = time_loop(lambda i: built.run(*batches[i % 4], i), dev, args.warmup, args.steps)
    step_ips = bs / (ref["step_ms"]["median"] / 1e3)
    rec.add({"mode": "e2e", "name": "step-only (synthetic)", "ok": True, "img_per_s": step_ips, "batch_size": bs,
             "step_ms": ref["step_ms"], "data_wait": 0.0})
    log_every = cfg.train.log_every

    def measure(loader, spec, note) -> dict[str, Any]:
        it = _endless(loader)
        for i in range(args.warmup):
            images, labels = next(it)
            built.run(images, labels, i)
        _sync(dev)
        wait = 0.0
        t0 = time.perf_counter()
        for i in range(args.steps):
            tw = time.perf_counter()
            images, labels = next(it)
            wait += time.perf_counter() - tw
            out = built.run(images, labels, args.warmup + i)
            if (i + 1) % log_every == 0:
                float(out["loss"])  # the trainer's periodic metric read (a host sync)
        _sync(dev)
        wall = time.perf_counter() - t0
        ips = args.steps * bs / wall
        per_rank = _gather(ips, info)
        it.close()
        return dict(img_per_s=ips, img_per_s_per_rank=per_rank, img_per_s_total=sum(per_rank),
                    data_wait=wait / wall, vs_step_only=ips / step_ips, workers=spec.num_workers, note=note,
                    stats=getattr(loader, "stats", None))

    _measure_each_loader(args, cfg, info, rec, "e2e", measure)
    res = [r for r in rec.data["results"] if r["mode"] == "e2e"]
    rows = [[r["name"], _fmt(r.get("img_per_s")) if r["ok"] else ("skipped" if "skipped" in r else "FAILED"),
             _fmt(r["data_wait"] * 100 if r.get("data_wait") is not None else None),
             _fmt(r.get("vs_step_only", 1.0 if r["name"].startswith("step-only") else None), ".2f"),
             str(r.get("workers", "-")), (r.get("note") or r.get("skipped") or r.get("error") or "")[:60]]
            for r in res]
    if info.is_main:
        print_table(f"End to end: loader + fast step (batch {bs}, per GPU)",
                    ["loader", "img/s", "data-wait %", "x step-only", "workers", "note"], rows)


# ----------------------------------------------------------------------------------------------
# Image set generation (parallel, ImageNet-like sizes)
# ----------------------------------------------------------------------------------------------
def _gen_class(job: tuple) -> int:
    from pipelines.generate import make_image_folder  # noqa: PLC0415

    root, cls, per_class, seed, sizes = job
    tmp = Path(root) / f".tmp_{cls}"
    make_image_folder(tmp, num_classes=1, per_class=per_class, sizes=sizes, seed=seed)
    os.replace(tmp / "class_000", Path(root) / f"class_{cls:03d}")
    shutil.rmtree(tmp, ignore_errors=True)
    return per_class


def generate_image_folder(root: str | Path, n: int, *, classes: int = 16, workers: Optional[int] = None,
                          sizes=IMAGENET_LIKE_SIZES, seed: int = 0) -> Path:
    """``n`` JPEGs in ``classes`` folders, written by all cores (pipelines.generate per class)."""
    import multiprocessing as mp  # noqa: PLC0415
    from concurrent.futures import ProcessPoolExecutor  # noqa: PLC0415

    root = Path(root)
    done = root / ".complete"
    if done.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    classes = max(1, min(classes, n))
    per = [n // classes + (1 if c < n % classes else 0) for c in range(classes)]
    jobs = [(str(root), c, per[c], seed * 1000 + c, tuple(sizes)) for c in range(classes) if per[c] > 0]
    workers = workers or os.cpu_count() or 1
    if workers > 1:
        # fork: no CUDA is initialised yet in this process; spawn would re-import torch per worker
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=mp.get_context("fork")) as ex:
            list(ex.map(_gen_class, jobs))
    else:
        for j in jobs:
            _gen_class(j)
    done.write_text(str(n))
    return root


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/throughput.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("step", "teacher", "loader", "e2e"), default="step")
    p.add_argument("--config", default=str(DEFAULT_CONFIG.relative_to(Path.cwd()) if DEFAULT_CONFIG.is_relative_to(
        Path.cwd()) else DEFAULT_CONFIG), help="pretrain YAML (default: CLIP ViT-B/16 300ep)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (as fdfast-train --set)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[:k=v,k=v]",
                   help="step mode: a fast variant with extra overrides, repeatable (default: one 'fast')")
    p.add_argument("--baseline", action="store_true", help="step mode: also time the official-style step")
    p.add_argument("--steps", type=int, default=20, help="timed iterations")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (compile, capture)")
    p.add_argument("--batch-size", type=int, default=None, help="per-GPU batch (default: config's, 128)")
    p.add_argument("--backends", default="torchvision,nvjpeg,ffcv,dali,synthetic",
                   help=f"loader / e2e mode, comma-separated of {','.join(LOADER_BACKENDS)}")
    p.add_argument("--data", default=None, help="ImageFolder for loader / e2e mode")
    p.add_argument("--beton", default=None, help=".beton for the ffcv backend")
    p.add_argument("--generate", type=int, default=0, metavar="N",
                   help="write N ImageNet-sized synthetic JPEGs (at --data, or a temp dir) first")
    p.add_argument("--workers", type=int, default=None, help="loader workers/threads (default: data.num_workers)")
    p.add_argument("--tiny", action="store_true", help="tiny student + teacher (CPU smoke runs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend override (default inductor; aot_eager for quick CPU checks)")
    p.add_argument("--json", default=None, metavar="PATH", help="write results here (rewritten after each variant)")
    args = p.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in args.backends if b not in LOADER_BACKENDS]
    if unknown:
        p.error(f"--backends: unknown {unknown}; choose from {LOADER_BACKENDS}")
    return args


def _prepare_overrides(args) -> None:
    # random teacher weights; data.backend=synthetic needs no data.train (loader / e2e modes pick the
    # backend per run and pass the data path themselves)
    ovs = ["model.teacher.weights=random", "data.backend=synthetic"]
    if args.tiny:
        ovs += TINY_OVERRIDES
        if args.batch_size is None:
            args.batch_size = 8
    if args.batch_size is not None:
        ovs.append(f"train.batch_size={args.batch_size}")
    args.overrides = ovs + list(args.overrides)


def main(argv=None) -> dict:
    args = parse_args(argv)
    _prepare_overrides(args)
    rank = int(os.environ.get("RANK", "0"))
    if args.mode in ("loader", "e2e") and args.generate:
        root = Path(args.data) if args.data else Path(tempfile.gettempdir()) / f"fdfast_bench_jpegs_{args.generate}"
        args.data = str(root)
        if rank == 0:
            t = time.perf_counter()
            generate_image_folder(root, args.generate)
            print(f"[bench] image set: {root} ({args.generate} JPEGs, {time.perf_counter() - t:.1f}s)", flush=True)
        else:  # before any process group exists: wait for rank 0's marker
            while not (root / ".complete").exists():
                time.sleep(0.5)
    if args.mode in ("loader", "e2e") and not (args.data or args.beton):
        if any(b != "synthetic" for b in args.backends):
            raise SystemExit("loader / e2e mode needs --data PATH (ImageFolder), --beton PATH or --generate N")

    from fdfast.distributed import init_distributed, shutdown  # noqa: PLC0415

    info = init_distributed("cpu" if args.device == "cpu" else "auto")
    if args.device == "cuda" and info.device.type != "cuda":
        raise SystemExit("--device cuda: no CUDA device")
    cfg = load_bench_config(args.config, args.overrides)  # fail fast on a bad override
    meta = {"env": environment(info.device, info.world_size), "mode": args.mode, "config": args.config,
            "overrides": args.overrides, "batch_size": cfg.train.batch_size, "steps": args.steps,
            "warmup": args.warmup, "data": args.data, "student": dataclasses.asdict(cfg.model.student),
            "teacher": dataclasses.asdict(cfg.model.teacher)}
    rec = Recorder(args.json, info.is_main, meta)
    if info.device.type != "cuda":
        # Random-init models on random pixels produce denormal floats (tiny gradients, Adam moments);
        # x86 arithmetic on denormals is ~30x slower, which would make CPU timings depend on the data.
        # GPUs process denormals at full speed, so this only keeps CPU numbers comparable.
        torch.set_flush_denormal(True)
        rec.note("CPU run: timings only (no MFU), denormals flushed; the official-style baseline runs in fp32")
    try:
        {"step": run_step_mode, "teacher": run_teacher_mode, "loader": run_loader_mode,
         "e2e": run_e2e_mode}[args.mode](args, info, rec)
    finally:
        shutdown()
    return rec.data


if __name__ == "__main__":
    main()
