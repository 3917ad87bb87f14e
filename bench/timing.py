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


# Below this many timed steps a median is one or two samples' luck; above this p90/p10 the steps did not run
# at one speed (shared cores, throttling, recompiles), which a median hides.
MIN_TIMED_STEPS = 10
MAX_SPREAD = 1.5
# e2e: how far the ratio to step-only may fall from 1 - data wait (what waiting alone would cost) unremarked
WAIT_TOLERANCE = 0.15


def per_device(dev: torch.device) -> str:
    """How a rate is normalised in a table title: per GPU on CUDA, per device (a CPU) otherwise."""
    return "per GPU" if dev.type == "cuda" else "per device (CPU)"


def timing_warnings(name: str, step_ms: dict[str, float]) -> list[str]:
    """Why a timed median of ``name`` should not be trusted: too few timed steps, or too wide a spread."""
    out = []
    if step_ms["n"] < MIN_TIMED_STEPS:
        out.append(f"{name}: {step_ms['n']} timed steps, fewer than {MIN_TIMED_STEPS}: the median is not a stable "
                   f"number (--steps {MIN_TIMED_STEPS} or more)")
    if step_ms["p10"] > 0 and step_ms["p90"] / step_ms["p10"] > MAX_SPREAD:
        out.append(f"{name}: steps took {step_ms['p10']:.1f}-{step_ms['p90']:.1f} ms (p10-p90), p90/p10 "
                   f"{step_ms['p90'] / step_ms['p10']:.1f} > {MAX_SPREAD}: the device did not run at one speed "
                   "(shared cores, throttling, recompiles?); the median hides it")
    return out


def wait_warning(name: str, vs_step_only: float, data_wait: float) -> list[str]:
    """An e2e row whose ratio to step-only is not what its data wait explains (about 1 - wait)."""
    expected = 1.0 - data_wait
    if abs(vs_step_only - expected) <= WAIT_TOLERANCE:
        return []
    return [f"{name}: {vs_step_only:.2f}x step-only with {data_wait:.0%} data wait (waiting alone would give about "
            f"{expected:.2f}x): the gap is not waiting for data (loader workers competing with the step for the "
            "same cores, or a noisy step-only reference)"]


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
