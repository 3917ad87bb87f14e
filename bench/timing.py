"""How the benchmark times things: warm-up excluded, CUDA events per step on the step's stream (no host
sync inside the timed loop), median and spread; the card's measured bf16 matmul peak; peak memory."""
from __future__ import annotations

import gc
import math
import statistics
import time
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def stats(ms: list[float]) -> dict[str, float]:
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
    sync(dev)
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
        sync(dev)
        wall = time.perf_counter() - t0
        ms = [a.elapsed_time(b) for a, b in events]
    else:
        t0 = time.perf_counter()
        for i in range(steps):
            t = time.perf_counter()
            fn(warmup + i)
            ms.append((time.perf_counter() - t) * 1e3)
        wall = time.perf_counter() - t0
    return {"step_ms": stats(ms), "wall_ms_per_step": wall * 1e3 / max(steps, 1), "warmup_s": warm_s}


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


def peak_mem_gib(dev: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None


def fresh_start(dev: torch.device) -> None:
    """Before each variant: forget compiled graphs (each variant compiles its own; inductor's on-disk cache
    still makes a repeated graph cheap), free memory and reset the peak-memory counter."""
    torch._dynamo.reset()
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def gather(value: float, world_size: int) -> list[float]:
    """``value`` of every rank (img/s per GPU under torchrun)."""
    if world_size == 1:
        return [value]
    out: list = [None] * world_size
    dist.all_gather_object(out, value)
    return [float(v) for v in out]
