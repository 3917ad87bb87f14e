#!/usr/bin/env python
"""FD throughput benchmark: the fast step vs an official-style step, the teacher, loaders, end to end.

    python bench/throughput.py --mode step --baseline                  # ViT-B/16 <- CLIP B/16, 224, batch 128
    python bench/throughput.py --mode step --baseline --variant eager:compile.enabled=false,compile.cuda_graph_teacher=false
    python bench/throughput.py --mode teacher                           # teacher forward: eager / compiled / graph
    python bench/throughput.py --mode loader --generate 2000 --backends torchvision,nvjpeg,dali@0.75
    python bench/throughput.py --mode e2e --data /path/to/imagenet/train --backends dali
    python bench/throughput.py --profile                                # ms/step by kernel family -> bench/results/
    python bench/throughput.py --tiny --mode step --baseline            # CPU smoke run, tiny models
    torchrun --nproc_per_node 8 bench/throughput.py --mode step         # per GPU and total

One module per mode: ``step.py`` (and ``official.py``, the baseline), ``teacher.py``, ``loaders.py``
(loader, e2e), ``profiling.py``; ``timing.py`` / ``report.py`` / ``tables.py`` are shared. Timing:
warm-up steps are excluded; every timed step is bracketed by CUDA events on the step's stream, and the
median and p10/p90 are reported. MFU uses the analytic FLOP count of ``flops.py`` against the card's
dense bf16 spec peak and a bf16 matmul measured in the same process. Results: a table on stdout (last)
and ``--json PATH`` (rewritten after every result, so a run cut short keeps what it measured).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

# run as a script: the repository (not bench/) first on the path, so that `bench.*`, `fdfast` and `pipelines`
# resolve to this checkout
REPO = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == REPO / "bench":
    sys.path[0] = str(REPO)
elif str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.common import DEFAULT_CONFIG, TINY_STUDENT, teacher_overrides  # noqa: E402
from bench.loaders import (LOADER_BACKENDS, generate_image_folder, make_beton, parse_backend,  # noqa: E402
                           run_e2e_mode, run_loader_mode)
from bench.profiling import run_profile_mode  # noqa: E402
from bench.report import Recorder, environment  # noqa: E402
from bench.step import run_step_mode  # noqa: E402
from bench.teacher import TEACHER_VARIANTS, run_teacher_mode  # noqa: E402
from fdfast.cli.common import exit_code, int_at_least  # noqa: E402
from fdfast.config import load_config  # noqa: E402
from fdfast.constants import TRUST_SWITCH  # noqa: E402
from fdfast.distributed import init_distributed, shutdown  # noqa: E402

MODES = {"step": run_step_mode, "teacher": run_teacher_mode, "loader": run_loader_mode, "e2e": run_e2e_mode,
         "profile": run_profile_mode}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/throughput.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=tuple(MODES), default="step")
    p.add_argument("--profile", action="store_true", help="same as --mode profile")
    p.add_argument("--profile-dir", default=str(REPO / "bench" / "results"),
                   help="profile mode: folder of the profile-<card>-<date>.md|json table")
    p.add_argument("--config", default=str(DEFAULT_CONFIG.relative_to(Path.cwd()) if DEFAULT_CONFIG.is_relative_to(
        Path.cwd()) else DEFAULT_CONFIG), help="pretrain YAML (default: CLIP ViT-B/16 300ep)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable (as fdfast-train --set)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME[:k=v,k=v]",
                   help="step mode: a fast variant with extra overrides, repeatable (default: one 'fast'); "
                        f"teacher mode: variant names of {list(TEACHER_VARIANTS)}")
    p.add_argument("--baseline", action="store_true", help="step mode: also time the official-style step")
    p.add_argument("--steps", type=int_at_least(1), default=20, help="timed (or profiled) iterations")
    p.add_argument("--warmup", type=int_at_least(0), default=5, help="untimed iterations first (compile, capture)")
    p.add_argument("--batch-size", type=int_at_least(1), default=None, help="per-GPU batch (default: config's, 128)")
    p.add_argument("--backends", default="torchvision,nvjpeg,ffcv,dali,synthetic",
                   help=f"loader / e2e mode, comma-separated of {','.join(LOADER_BACKENDS)} (dali@LOAD: "
                        "DALI with that hw_decoder_load)")
    p.add_argument("--data", default=None, help="ImageFolder for loader / e2e mode")
    p.add_argument("--beton", default=None, help=".beton for the ffcv backend (written from --data if missing)")
    p.add_argument("--generate", type=int_at_least(0), default=0, metavar="N",
                   help="write N ImageNet-sized synthetic JPEGs (at --data, or a temp dir) first")
    p.add_argument("--workers", type=int_at_least(0), default=None,
                   help="loader workers/threads (default: data.num_workers)")
    p.add_argument("--tiny", action="store_true", help="tiny student + teacher (CPU smoke runs)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend override (default inductor; aot_eager for quick CPU checks)")
    p.add_argument("--json", default=None, metavar="PATH", help="write results here (rewritten after each variant)")
    p.add_argument(TRUST_SWITCH, dest="trust_pickle", action="store_true",
                   help="allow teacher files that pickle code (runs it: only files you trust)")
    args = p.parse_args(argv)
    if args.profile:
        args.mode = "profile"
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    try:
        for b in args.backends:
            parse_backend(b)
    except ValueError as e:
        p.error(str(e))
    unknown = [v for v in args.variant if v not in TEACHER_VARIANTS]
    if args.mode == "teacher" and unknown:
        p.error(f"--variant {unknown}: teacher mode knows {list(TEACHER_VARIANTS)}")
    # random teacher weights; data.backend=synthetic needs no data.train (loader / e2e modes pick the
    # backend per run and pass the data path themselves)
    # (each of model.teachers: model.teachers.<name>.weights=random, see bench/common.py)
    ovs = [*teacher_overrides(args.config, args.overrides, tiny=args.tiny), "data.backend=synthetic"]
    if args.tiny:
        ovs += TINY_STUDENT
        if args.batch_size is None:
            args.batch_size = 8
    if args.batch_size is not None:
        ovs.append(f"train.batch_size={args.batch_size}")
    args.overrides = ovs + list(args.overrides)
    return args


def prepare_data(args, rank: int) -> None:
    """--generate: rank 0 writes the image set (and the .beton) while the others wait for its marker."""
    if args.mode not in ("loader", "e2e"):
        return
    if args.generate:
        root = Path(args.data) if args.data else Path(tempfile.gettempdir()) / f"fdfast_bench_jpegs_{args.generate}"
        args.data = str(root)
        if rank == 0:
            t = time.perf_counter()
            generate_image_folder(root, args.generate)
            print(f"[bench] image set: {root} ({args.generate} JPEGs, {time.perf_counter() - t:.1f}s)", flush=True)
        else:  # before any process group exists: wait for rank 0's marker
            while not (root / ".complete").exists():
                time.sleep(0.5)
    if not (args.data or args.beton) and any(b != "synthetic" for b in args.backends):
        raise SystemExit("loader / e2e mode needs --data PATH (ImageFolder), --beton PATH or --generate N")
    if "ffcv" in args.backends and args.beton and args.data and rank == 0:
        why = make_beton(args.data, args.beton, args.workers)
        if why:
            print(f"[bench] {why}", flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    prepare_data(args, int(os.environ.get("RANK", "0")))
    info = init_distributed("cpu" if args.device == "cpu" else "auto")
    if args.device == "cuda" and info.device.type != "cuda":
        raise SystemExit("--device cuda: no CUDA device")
    cfg = load_config(args.config, args.overrides)  # fail fast on a bad override
    meta = {"env": environment(info.device, info.world_size), "mode": args.mode, "config": args.config,
            "overrides": args.overrides, "batch_size": cfg.train.batch_size, "steps": args.steps,
            "warmup": args.warmup, "data": args.data, "student": dataclasses.asdict(cfg.model.student),
            "teacher": dataclasses.asdict(cfg.model.teacher),
            "teachers": [dataclasses.asdict(t) for t in cfg.model.teachers]}
    rec = Recorder(args.json, info.is_main, meta)
    if info.device.type != "cuda":
        # Random-init models on random pixels produce denormal floats (tiny gradients, Adam moments);
        # x86 arithmetic on denormals is ~30x slower, which would make CPU timings depend on the data.
        # GPUs process denormals at full speed, so this only keeps CPU numbers comparable.
        torch.set_flush_denormal(True)
        rec.note("CPU run: timings only (no MFU), denormals flushed; the official-style baseline runs in fp32")
    try:
        MODES[args.mode](args, info, rec)
    finally:
        shutdown()
    return rec.data


if __name__ == "__main__":
    # a config key, a data path: one line, exit 2, as fdfast-train says it
    sys.exit(exit_code("bench/throughput.py", lambda: main() and 0, interrupted="no results beyond those printed"))
