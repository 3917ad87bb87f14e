"""``--mode teacher``: the teacher target alone (normalise -> teacher -> whiten), official fp16 with
explicit attention vs the run's target eager, CUDA-graph replayed, compiled, compiled + replayed, and with
the whole teacher in bf16 (``model.teacher.bf16``; its target fidelity against the default target is
recorded: per-token cosine, max abs difference, and the FD loss between the two targets). With
``model.teachers`` every variant is measured for each teacher in turn (rows ``<variant>/<teacher name>``)."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from bench.common import synthetic_batches
from bench.flops import model_count, spec_peak_tflops
from bench.official import official_teacher
from bench.report import Recorder, record_failure
from bench.tables import fmt, print_tables
from bench.timing import fresh_start, peak_mem_gib, per_device, time_loop, timing_warnings
from fdfast.config import FDConfig, TeacherConfig, load_config
from fdfast.distributed import DistInfo
from fdfast.models.attention import only_sdpa_backends
from fdfast.models.target import TeacherTarget
from fdfast.models.teachers import build_teacher
from fdfast.objective import fd_loss
from fdfast.step import autocast, resolve_precision
from fdfast.tasks.distill import build_target

# name -> overrides of the run's target (None: the official-style teacher)
TEACHER_VARIANTS = {
    "official-fp16": None,
    "eager": ["compile.enabled=false", "compile.cuda_graph_teacher=false"],
    "eager+graph": ["compile.enabled=false", "compile.cuda_graph_teacher=true"],
    "compiled": ["compile.enabled=true", "compile.cuda_graph_teacher=false"],
    "compiled+graph": ["compile.enabled=true", "compile.cuda_graph_teacher=true"],
    "compiled+bf16": ["compile.enabled=true", "compile.cuda_graph_teacher=false", "model.teacher.bf16=true"],
    "compiled+graph+bf16": ["compile.enabled=true", "compile.cuda_graph_teacher=true", "model.teacher.bf16=true"],
}


def _flash_only(teacher, precision: str, dev: torch.device) -> dict[str, Any]:
    """Proof that the bias-free teacher attention runs on the FlashAttention kernel."""
    try:
        with only_sdpa_backends("FLASH_ATTENTION"), autocast(precision, dev), torch.no_grad():
            teacher(torch.randn(2, 3, teacher.img_size, teacher.img_size, device=dev))
        return {"flash_only_ok": True}
    except Exception as e:  # noqa: BLE001
        return {"flash_only_ok": False, "flash_only_error": f"{type(e).__name__}: {e}"[:300]}


@torch.no_grad()
def target_fidelity(fn, cfg, images: torch.Tensor, precision: str, dev: torch.device, *,
                    trust_pickle: bool = False) -> dict[str, float]:
    """How far the target ``fn`` (e.g. a bf16 teacher) is from the default one (the same teacher file and
    seed, fp32 weights, eager) on ``images``."""
    with autocast(precision, dev):
        fast = fn(images).float().clone()  # a graph's output buffer is overwritten by its next replay
    torch.manual_seed(cfg.train.seed)
    reference = build_teacher(dataclasses.replace(cfg.model.teacher, bf16=False), cfg.model.student.img_size,
                              trust_pickle=trust_pickle)
    with autocast(precision, dev):
        ref = TeacherTarget(reference.to(dev), cfg.model.whiten_eps)(images).float()
    cosine = F.cosine_similarity(fast, ref, dim=-1)
    return {"target_cosine_min": float(cosine.min()), "target_cosine_mean": float(cosine.mean()),
            "target_max_abs_diff": float((fast - ref).abs().max()),
            "target_fd_loss": float(fd_loss(fast, ref, cfg.model.loss_beta))}


def _one_teacher(cfg: FDConfig, name: str | None) -> FDConfig:
    """``cfg`` distilling from its teacher ``name`` of ``model.teachers`` alone (None: ``cfg`` itself)."""
    if name is None:
        return cfg
    entry = next(t for t in cfg.model.teachers if t.name == name)
    teacher = TeacherConfig(**{f.name: getattr(entry, f.name) for f in dataclasses.fields(TeacherConfig)})
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, teacher=teacher, teachers=[]))


def _variant_overrides(extra: list[str] | None, name: str | None) -> list[str]:
    """A variant's overrides, its ``model.teacher.*`` keys aimed at the teacher ``name`` of ``model.teachers``."""
    if name is None:
        return list(extra or [])
    return [x.replace("model.teacher.", f"model.teachers.{name}.", 1) for x in extra or []]


def _what_ran(name: str, extra, cfg, cuda: bool, precision: str) -> tuple[str, str]:
    """(label, precision) of what a variant really runs here: on a CPU the official teacher cannot run in
    fp16, and a bf16 teacher computes in bf16 whatever the autocast precision says."""
    if extra is None:
        return (name, "fp16") if cuda else (f"{name.replace('official-fp16', 'official', 1)} (fp32: no fp16 on a CPU)",
                                            "fp32")
    return name, "bf16 (whole teacher)" if cfg.model.teacher.bf16 else precision


def run_teacher_mode(args, info: DistInfo, rec: Recorder) -> None:
    """``--variant NAME`` picks variants of :data:`TEACHER_VARIANTS` (default: all that the device allows;
    CUDA-graph variants need a GPU and are skipped, and said to be, elsewhere)."""
    dev = info.device
    cuda = dev.type == "cuda"
    cfg0 = load_config(args.config, args.overrides)
    bs = cfg0.train.batch_size
    batches = synthetic_batches(cfg0, dev, 4, bs)
    precision = resolve_precision(cfg0.train.precision, dev)
    names = args.variant or list(TEACHER_VARIANTS)
    peak_spec = spec_peak_tflops(rec.data["env"].get("gpu") or "") if cuda else None
    no_graph = [n for n in names if "graph" in n and not cuda]
    if no_graph:
        rec.note(f"skipped on a CPU (CUDA graphs need a GPU): {', '.join(no_graph)}")
    teachers = [t.name for t in cfg0.model.teachers] or [None]
    for name, which in [(n, t) for n in names for t in teachers]:
        fresh_start(dev)
        row = name if which is None else f"{name}/{which}"
        result: dict[str, Any] = {"mode": "teacher", "name": row, "batch_size": bs, "ok": False}
        if which is not None:
            result["teacher"] = which
        if name in no_graph:
            if args.variant:  # asked for by name: a row that says why it did not run
                rec.add({**result, "skipped": "CUDA graphs need a GPU"})
            continue
        try:
            extra = TEACHER_VARIANTS[name]
            cfg = _one_teacher(load_config(args.config, [*args.overrides, *_variant_overrides(extra, which)]), which)
            torch.manual_seed(cfg.train.seed)
            if extra is None:
                teacher = official_teacher(cfg, dev, trust_pickle=args.trust_pickle)
                fn, prec = TeacherTarget(teacher, cfg.model.whiten_eps), ("fp16" if cuda else "fp32")
            else:
                teacher = build_teacher(cfg.model.teacher, cfg.model.student.img_size,
                                        trust_pickle=args.trust_pickle).to(dev)
                fn, prec = build_target(teacher, cfg, dev, args.compile_backend), precision
            label, ran = _what_ran(row, extra, cfg, cuda, prec)

            def call(i: int, fn=fn, prec=prec) -> None:
                with autocast(prec, dev):
                    fn(batches[i % len(batches)][0])

            t = time_loop(call, dev, args.warmup, args.steps)
            ips = bs / (t["step_ms"]["median"] / 1e3)
            flops = model_count(teacher).fwd
            result.update(t, ok=True, img_per_s=ips, label=label, precision=ran, teacher_fwd_flops=flops,
                          mfu_spec=flops * ips / 1e12 / peak_spec if peak_spec else None,
                          peak_mem_gib=peak_mem_gib(dev), graph_captures=getattr(fn, "captures", None),
                          warnings=timing_warnings(label, t["step_ms"]))
            if cuda and extra is not None:
                result.update(_flash_only(teacher, prec, dev))
            if extra is not None and cfg.model.teacher.bf16:
                result.update(target_fidelity(fn, cfg, batches[0][0], prec, dev, trust_pickle=args.trust_pickle))
            del fn, teacher, call
        except Exception as e:  # noqa: BLE001
            record_failure(result, e)
        rec.add(result)
    res = rec.results("teacher")
    base = {r.get("teacher"): r for r in res if r["name"].split("/")[0] == "official-fp16" and r["ok"]}

    def cells(r: dict) -> list[str]:
        if not r["ok"]:
            return [r["name"], "-", "skipped" if "skipped" in r else "FAILED", r.get("skipped", ""), *["-"] * 4]
        return [r["label"], r["precision"], fmt(r["img_per_s"]), f"{r['step_ms']['median']:.2f}",
                fmt(r["mfu_spec"] * 100 if r.get("mfu_spec") else None), str(r.get("flash_only_ok", "-")),
                fmt(r["img_per_s"] / base[r.get("teacher")]["img_per_s"] if r.get("teacher") in base else None, ".3g"),
                fmt(r.get("target_cosine_min"), ".5f")]
    if info.is_main:
        notes = [f"warning: {w}" for r in res for w in r.get("warnings", [])]
        print_tables([(f"Teacher target forward alone (batch {bs}, {per_device(dev)})",
                       ["variant (what ran)", "precision", "img/s", "ms", "MFU% spec", "flash-only ok",
                        "x official", "target cos min"], [cells(r) for r in res])], notes)
