"""``--mode step``: one FD optimizer step per variant, timed on device-resident synthetic batches.

The fast step is exactly what the trainer runs (``DistillTask`` + ``build_training``, so every switch
comes from the config and ``fdfast.parallelize``); the official-style step (``bench/official.py``) is the
denominator of the ``x official`` column. Every variant starts from the same seed and data, so equal
``loss@0`` means equal maths.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch.profiler import ProfilerActivity, profile

from bench.common import Built, parse_variant, switches, synthetic_batches
from bench.flops import distill_step_flops, fd_flops_from_models, spec_peak_tflops
from bench.official import build_official_step
from bench.report import Recorder, record_failure
from bench.tables import fmt, print_tables
from bench.timing import (fresh_start, gather, measure_matmul_tflops, peak_mem_gib, per_device, time_loop,
                          timing_warnings)
from fdfast.config import FDConfig, load_config
from fdfast.distributed import DistInfo
from fdfast.models.attention import only_sdpa_backends, set_attention_kernel
from fdfast.models.student import DistillModel
from fdfast.parallelize import apply_backend_settings
from fdfast.step import autocast, resolve_precision
from fdfast.tasks import DistillTask
from fdfast.trainer import build_training, seed_all


def build_fast_step(cfg: FDConfig, info: DistInfo, *, backend: Optional[str] = None,
                    trust_pickle: bool = False) -> Built:
    """The fdfast step exactly as the trainer builds it; ``backend`` = compile backend for CPU checks. PHI-S
    teachers estimate their statistics from synthetic batches first, as a run does from its first batches."""
    seed_all(cfg.train.seed)
    task = DistillTask(cfg, info, compile_backend=backend, trust_pickle=trust_pickle)
    if any(slot.phi_s is not None for slot in task.slots):
        task.prepare(synthetic_batches(cfg, info.device, min(4, cfg.model.phi_s_batches), cfg.train.batch_size))
    optimizer, step, schedule = build_training(task, cfg, info, steps_per_epoch=1000)
    applied = apply_backend_settings(cfg.train, info.device)

    def run_step(images: torch.Tensor, labels: torch.Tensor, i: int) -> dict:
        step.set_lr(schedule(i))
        return step([(images, labels)])

    notes = [f"backend flags: {applied}"] if applied else []
    if optimizer.defaults.get("fused"):
        notes.append("fused AdamW")
    if task.slots:
        notes.append("teachers: " + ", ".join(f"{t.name} ({t.teacher.model_name}, {t.head} head, weight {t.weight:g})"
                                              for t in task.slots))
    targets = [slot.target for slot in task.slots] if task.slots else task.target
    return Built("fast", run_step, task.model, task.teacher, step.precision, notes, targets, task)


def step_flops(built: Built, cfg: FDConfig) -> dict[str, Any]:
    s = cfg.model.student
    tokens = (s.img_size // s.patch_size) ** 2 + 1 if s.arch == "beit" else built.teacher.num_tokens
    slots = getattr(built.task, "slots", None)
    if slots:  # several teachers: each one's forward and head (the heads run on every student token)
        return distill_step_flops(built.model.encoder, s.num_tokens,
                                  [(t.name, t.teacher, built.model.heads[t.name]) for t in slots])
    return fd_flops_from_models(built.model.encoder, built.teacher, tokens=tokens, teacher_dim=built.teacher.embed_dim)


def graph_captures(target: Any) -> Optional[int]:
    """CUDA graphs captured by a step's target(s) (None: no graphed target)."""
    counts = [getattr(t, "captures", None) for t in (target if isinstance(target, list) else [target])]
    counts = [c for c in counts if c is not None]
    return sum(counts) if counts else None


def measure_step(built: Built, batches: list, dev: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Timing of ``built`` plus the loss at step 0 and after the last step."""
    losses: list[float] = []
    last: dict = {}

    def fn(i: int) -> None:
        images, labels = batches[i % len(batches)]
        last["out"] = built.run(images, labels, i)
        if i == 0:
            losses.append(float(last["out"]["loss"]))

    t = time_loop(fn, dev, warmup, steps)
    return {**t, "loss_first": losses[0], "loss_last": float(last["out"]["loss"])}


def run_step_mode(args, info: DistInfo, rec: Recorder) -> None:
    dev = info.device
    peak_measured = measure_matmul_tflops(dev)
    peak_spec = spec_peak_tflops(rec.data["env"].get("gpu") or "") if dev.type == "cuda" else None
    rec.data["peak_tflops"] = {"spec_bf16_dense": peak_spec, "measured_bf16_matmul": peak_measured}
    variants = [parse_variant(v) for v in args.variant] or [("fast", [])]
    if args.baseline:
        variants = [("official", None), *variants]
    for name, extra in variants:
        cfg = load_config(args.config, [*args.overrides, *(extra or [])])
        bs = cfg.train.batch_size
        batches = synthetic_batches(cfg, dev, 4, bs)
        fresh_start(dev)
        result: dict[str, Any] = {"mode": "step", "name": name, "overrides": extra or [], "batch_size": bs,
                                  "world_size": info.world_size, "ok": False}
        try:
            if extra is None:
                built = build_official_step(cfg, info, trust_pickle=args.trust_pickle)
                result["switches"] = {"official": True}
            else:
                built = build_fast_step(cfg, info, backend=args.compile_backend, trust_pickle=args.trust_pickle)
                result["switches"] = switches(cfg)
            result.update(precision=built.precision, notes=built.notes)
            if "flops_per_img" not in rec.data:  # the same models in every variant: counted once
                rec.data["flops_per_img"] = step_flops(built, cfg)
            flops = rec.data["flops_per_img"]
            t = measure_step(built, batches, dev, args.warmup, args.steps)
            ips = bs / (t["step_ms"]["median"] / 1e3)
            per_rank = gather(ips, info.world_size)
            achieved = flops["total"] * ips / 1e12
            result.update(t, ok=True, img_per_s=ips, img_per_s_per_rank=per_rank, img_per_s_total=sum(per_rank),
                          img_per_s_wall=bs / (t["wall_ms_per_step"] / 1e3), peak_mem_gib=peak_mem_gib(dev),
                          graph_captures=graph_captures(built.target), tflops=achieved,
                          mfu_spec=achieved / peak_spec if peak_spec else None,
                          mfu_measured=achieved / peak_measured if peak_measured else None,
                          warnings=timing_warnings(name, t["step_ms"]))
            del built
        except Exception as e:  # noqa: BLE001 - one failing variant must not stop the others
            record_failure(result, e, show=info.is_main)
        rec.add(result)
        if info.is_main:
            print(f"[bench] {name}: " + (f"{result['img_per_s']:.1f} img/s, step {result['step_ms']['median']:.1f} ms"
                                         if result["ok"] else result["error"]), flush=True)
    if dev.type == "cuda":
        rec.data["student_sdpa_backends"] = probe_student_sdpa(load_config(args.config, args.overrides), dev)
        rec.flush()
    step_summary(rec, info, dev)


def probe_student_sdpa(cfg: FDConfig, dev: torch.device) -> dict[str, str]:
    """Which SDPA kernels the student's attention (shared RPB as a float mask that needs a gradient)
    can run on, and which attention kernels the default dispatch launches (one profiled fwd+bwd)."""
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
        with profile(activities=[ProfilerActivity.CUDA]) as prof, autocast(precision, dev):
            model(x).float().sum().backward()
            torch.cuda.synchronize(dev)
        keys = ("attention", "fmha", "flash", "cudnn", "mem_eff", "softmax", "cutlass")
        names = sorted({e.key for e in prof.key_averages() if any(k in e.key.lower() for k in keys)})
        out["default dispatch kernels"] = "; ".join(n[:80] for n in names[:6]) or "?"
    except Exception as e:  # noqa: BLE001 - diagnostic only
        out["error"] = f"{type(e).__name__}: {e}"[:200]
    return out


def step_summary(rec: Recorder, info: DistInfo, dev: torch.device) -> None:
    res = rec.results("step")
    base = next((r for r in res if r["name"] == "official" and r["ok"]), None)
    ratios = {}
    rows = []
    for r in res:
        ratio = r["img_per_s"] / base["img_per_s"] if (base and r["ok"]) else None
        if ratio is not None and r is not base:
            ratios[f"{r['name']}/official"] = ratio
        if r["ok"]:
            sm = r["step_ms"]
            rows.append([r["name"], str(r["batch_size"]), fmt(r["img_per_s"]),
                         fmt(r["img_per_s_total"]) if info.world_size > 1 else "-",
                         f"{sm['median']:.1f} [{sm['p10']:.1f}-{sm['p90']:.1f}]",
                         fmt(r["mfu_spec"] * 100 if r["mfu_spec"] else None),
                         fmt(r["mfu_measured"] * 100 if r["mfu_measured"] else None),
                         fmt(r["peak_mem_gib"], ".1f"), fmt(r["warmup_s"], ".0f"),
                         f"{r['loss_first']:.4f}>{r['loss_last']:.4f}", fmt(ratio, ".2f")])
        else:
            rows.append([r["name"], str(r["batch_size"]), "FAILED", "", (r.get("error") or "")[:60], *[""] * 6])
    rec.data["ratios"] = ratios
    rec.flush()
    if not info.is_main:
        return
    f = rec.data.get("flops_per_img") or {}
    env = rec.data["env"]
    pk = rec.data.get("peak_tflops", {})
    notes = [f"FLOPs/img (analytic, bench/flops.py): total {f.get('total', 0) / 1e9:.4g} G = student fwd+bwd "
             f"{f.get('student_fwd_bwd', 0) / 1e9:.4g} + projector {f.get('projector_fwd_bwd', 0) / 1e9:.4g} + "
             f"teacher fwd {f.get('teacher_fwd', 0) / 1e9:.4g}",
             f"peak bf16 TFLOP/s: spec {fmt(pk.get('spec_bf16_dense'))}, measured matmul "
             f"{fmt(pk.get('measured_bf16_matmul'))}; device {env.get('gpu') or env.get('cpu')}, torch {env['torch']}"]
    notes += [f"  {name}: teacher fwd {p['teacher_fwd'] / 1e9:.4g} G + head fwd+bwd {p['head_fwd_bwd'] / 1e9:.4g} G"
              for name, p in (f.get("teachers") or {}).items()]
    notes += sorted({n for r in res for n in r.get("notes", [])})
    notes += [f"warning: {w}" for r in res for w in r.get("warnings", [])]
    print_tables([(f"FD step throughput ({per_device(dev)}; median over timed steps, [p10-p90])",
                   ["variant", "batch", "img/s", "img/s total", "step ms", "MFU% spec", "MFU% meas", "mem GiB",
                    "warm-up s", "loss first>last", "x official"], rows)], notes)
