"""``--mode loader`` (each backend alone) and ``--mode e2e`` (backend feeding the fast step), on an
ImageFolder (``--data``, or ``--generate N`` ImageNet-sized JPEGs) and, for FFCV, a ``.beton`` made from
it. A backend entry ``dali@0.75`` is DALI with ``data.dali_hw_decoder_load=0.75``.

data-wait = host time blocked in ``next(loader)`` / wall time, the trainer's metric; the e2e loop reads
the loss every ``log.every`` steps as the trainer does. A generated set is in the page cache (just
written): this measures decode + augmentation, not a cold disk.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from bench.common import synthetic_batches
from bench.report import Recorder, record_failure
from bench.step import build_fast_step
from bench.tables import fmt, print_tables
from bench.timing import fresh_start, gather, per_device, sync, time_loop, timing_warnings, wait_warning
from pipelines.ffcv_writer import convert_folder
from fdfast.config import FDConfig, load_config
from fdfast.distributed import DistInfo
from pipelines import DataError, MissingDependency, build_loader, check_batch
from pipelines.generate import make_image_folder

LOADER_BACKENDS = ("torchvision", "ffcv", "dali", "nvjpeg", "synthetic")
# ImageNet-like sizes (mean about 400 x 350) for --generate
IMAGENET_LIKE_SIZES = ((375, 500), (500, 375), (333, 500), (350, 400), (400, 350), (480, 640), (300, 300))


def parse_backend(entry: str) -> tuple[str, Optional[float]]:
    """``NAME`` or ``dali@HW_DECODER_LOAD``."""
    name, _, load = entry.partition("@")
    if name not in LOADER_BACKENDS or (load and name != "dali"):
        raise ValueError(f"--backends: {entry!r}; choose from {LOADER_BACKENDS} (dali@LOAD sets DALI's "
                         "hw_decoder_load)")
    return name, float(load) if load else None


def _loader(args, cfg: FDConfig, entry: str, info: DistInfo):
    """(loader, its data section, note), or (None, None, why it is skipped)."""
    backend, hw_load = parse_backend(entry)
    path = (args.beton or "") if backend == "ffcv" else (args.data or "")
    if backend == "ffcv" and not path.endswith(".beton"):
        return None, None, "ffcv reads .beton files: pass --beton PATH (made from --data when missing)"
    if backend == "ffcv" and not Path(path).exists():
        return None, None, f"ffcv skipped: {path} could not be made (see the notes)"
    data = dataclasses.replace(cfg.data, train=path, backend=backend)
    if hw_load is not None:
        data = dataclasses.replace(data, dali_hw_decoder_load=hw_load)
    if args.workers is not None:
        data = dataclasses.replace(data, num_workers=args.workers)
    note = None
    if backend == "nvjpeg" and info.device.type != "cuda":
        note = "nvjpeg on CPU: torchvision CPU decode (the GPU decoder needs CUDA)"
    if backend == "dali":
        note = f"hw_decoder_load {data.dali_hw_decoder_load}" if info.device.type == "cuda" else "DALI on the CPU"
    try:
        loader = build_loader(data, train=True, batch_size=cfg.train.batch_size, img_size=cfg.model.student.img_size,
                              device=info.device, rank=info.rank, world_size=info.world_size, seed=cfg.train.seed)
        return loader, data, note
    except (MissingDependency, ModuleNotFoundError) as e:
        return None, None, f"{entry} skipped: {e}"


def _endless(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _each_loader(args, cfg: FDConfig, info: DistInfo, rec: Recorder, mode: str,
                 measure: Callable[[Any, Any], dict]) -> None:
    """One result row per entry of ``args.backends``: skipped (with the reason) when its loader cannot be
    built here, else ``ok`` with what ``measure(loader, data)`` returns, or the failure."""
    for entry in args.backends:
        result: dict[str, Any] = {"mode": mode, "name": entry, "batch_size": cfg.train.batch_size, "ok": False}
        loader, data, note = _loader(args, cfg, entry, info)
        if loader is None:
            result["skipped"] = note
            rec.add(result)
            rec.note(note)
            continue
        try:
            result.update(ok=True, note=note, workers=data.num_workers, **measure(loader, data))
        except Exception as e:  # noqa: BLE001
            record_failure(result, e)
        del loader
        rec.add(result)


def _status(r: dict) -> str:
    return fmt(r.get("img_per_s")) if r["ok"] else ("skipped" if "skipped" in r else "FAILED")


def _why(r: dict) -> str:
    return (r.get("note") or r.get("skipped") or r.get("error") or "")[:70]


def run_loader_mode(args, info: DistInfo, rec: Recorder) -> None:
    dev = info.device
    cfg = load_config(args.config, args.overrides)
    bs = cfg.train.batch_size

    def measure(loader, data) -> dict[str, Any]:
        it = _endless(loader)
        for i in range(args.warmup):
            x, y = next(it)
            if i == 0:
                check_batch(x, y)
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            next(it)
        sync(dev)
        wall = time.perf_counter() - t0
        it.close()
        return dict(img_per_s=args.steps * bs / wall, num_samples=loader.num_samples,
                    stats=getattr(loader, "stats", None))

    _each_loader(args, cfg, info, rec, "loader", measure)
    res = rec.results("loader")
    tv = next((r for r in res if r["name"] == "torchvision" and r["ok"]), None)
    rec.data.setdefault("ratios", {}).update(
        {f"{r['name']}/torchvision": r["img_per_s"] / tv["img_per_s"] for r in res if r["ok"] and tv})
    rec.flush()
    rows = [[r["name"], _status(r), fmt(r["img_per_s"] / tv["img_per_s"] if tv and r["ok"] else None, ".2f"),
             str(r.get("workers", "-")), _why(r)] for r in res]
    if info.is_main:
        print_tables([(f"Loaders alone (train augmentation, batch {bs}, per process)",
                       ["backend", "img/s", "x torchvision", "workers", "note"], rows)])


def run_e2e_mode(args, info: DistInfo, rec: Recorder) -> None:
    """Loader + fast step, against the same step on device-resident batches in the same process."""
    dev = info.device
    cfg = load_config(args.config, args.overrides)
    bs = cfg.train.batch_size
    fresh_start(dev)
    built = build_fast_step(cfg, info, backend=args.compile_backend, trust_pickle=args.trust_pickle)
    batches = synthetic_batches(cfg, dev, 4, bs)
    ref = time_loop(lambda i: built.run(*batches[i % 4], i), dev, args.warmup, args.steps)
    step_ips = bs / (ref["step_ms"]["median"] / 1e3)
    rec.add({"mode": "e2e", "name": "step-only (synthetic)", "ok": True, "img_per_s": step_ips, "batch_size": bs,
             "step_ms": ref["step_ms"], "warmup_s": ref["warmup_s"], "data_wait": 0.0,
             "warnings": timing_warnings("step-only (synthetic)", ref["step_ms"])})

    def measure(loader, data) -> dict[str, Any]:
        it = _endless(loader)
        for i in range(args.warmup):
            built.run(*next(it), i)
        sync(dev)
        wait = 0.0
        t0 = time.perf_counter()
        for i in range(args.steps):
            tw = time.perf_counter()
            images, labels = next(it)
            wait += time.perf_counter() - tw
            out = built.run(images, labels, args.warmup + i)
            if (i + 1) % cfg.log.every == 0:
                float(out["loss"])  # the trainer's periodic metric read (a host sync)
        sync(dev)
        wall = time.perf_counter() - t0
        ips = args.steps * bs / wall
        per_rank = gather(ips, info.world_size)
        it.close()
        return dict(img_per_s=ips, img_per_s_per_rank=per_rank, img_per_s_total=sum(per_rank),
                    data_wait=wait / wall, vs_step_only=ips / step_ips, stats=getattr(loader, "stats", None))

    _each_loader(args, cfg, info, rec, "e2e", measure)
    for r in rec.results("e2e"):
        if r["ok"] and "vs_step_only" in r:
            r["warnings"] = wait_warning(r["name"], r["vs_step_only"], r["data_wait"])
    rec.flush()
    rows = [[r["name"], _status(r), fmt(r["data_wait"] * 100 if r.get("data_wait") is not None else None),
             fmt(r.get("vs_step_only", 1.0 if r["name"].startswith("step-only") else None), ".2f"),
             str(r.get("workers", "-")), _why(r)] for r in rec.results("e2e")]
    if info.is_main:
        notes = [f"warning: {w}" for r in rec.results("e2e") for w in r.get("warnings", [])]
        print_tables([(f"End to end: loader + fast step (batch {bs}, {per_device(dev)})",
                       ["loader", "img/s", "data-wait %", "x step-only", "workers", "note"], rows)], notes)


# ----------------------------------------------------------------------------------------------
# The image set (parallel, ImageNet-like sizes) and its .beton
# ----------------------------------------------------------------------------------------------
def _gen_class(job: tuple) -> int:
    root, cls, per_class, seed, sizes = job
    tmp = Path(root) / f".tmp_{cls}"
    make_image_folder(tmp, num_classes=1, per_class=per_class, sizes=sizes, seed=seed)
    os.replace(tmp / "class_000", Path(root) / f"class_{cls:03d}")
    shutil.rmtree(tmp, ignore_errors=True)
    return per_class


def generate_image_folder(root: str | Path, n: int, *, classes: int = 16, workers: Optional[int] = None,
                          sizes=IMAGENET_LIKE_SIZES, seed: int = 0) -> Path:
    """``n`` JPEGs in ``classes`` folders, written by all cores (pipelines.generate per class)."""
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


def make_beton(data: str, beton: str, workers: Optional[int]) -> Optional[str]:
    """Write ``beton`` from the ImageFolder ``data`` (fdfast-convert) unless it exists; the reason when
    it cannot be made (FFCV missing)."""
    if Path(beton).exists():
        return None
    try:
        convert_folder(data, beton, num_workers=workers)
    except (DataError, MissingDependency) as e:
        return f"no .beton: {e}"
    return None
