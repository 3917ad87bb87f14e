"""The sections of a device run (``bench/device.py``), most informative first, each a command with its own
time limit. The whole run must fit about 8 minutes on one H200 (``DEVICE_BUDGET_S``); sections that no
longer fit are skipped, and those already run keep their results. Identical graphs compile once: inductor's
on-disk cache makes the second compile of the step (profile, e2e) or of the teacher cheap, which is why
step128 runs first.

With ``DEVICE_DRY_RUN=1`` the same sections run on the CPU with tiny models and the aot_eager compile
backend (how the script is tested).
"""
from __future__ import annotations

import os
from pathlib import Path

# env: fdfast's run_environment() (version, commit, CPU, GPU, driver), plus the versions of what the run uses
# (incl. the carried DALI / FFCV wheels) and nvidia-smi's view of the card
ENV_SNIPPET = r"""
import json, os, platform, subprocess, sys
info = {}
try:  # fdfast's own record (version, commit, libraries, CPU, GPU, driver), as summary.json holds it
    from fdfast.tracking import run_environment
    info.update(run_environment())
except Exception as e:
    info["fdfast_error"] = repr(e)[:200]
info.update(python=platform.python_version(), cpu_count=os.cpu_count(), host=platform.node())
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_mem_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    sm_count=p.multi_processor_count, device_count=torch.cuda.device_count())
except Exception as e:
    info["torch_error"] = repr(e)
for mod in ("timm", "torchvision", "numpy", "rich", "yaml", "numba", "ffcv", "nvidia.dali", "pytest"):
    try:
        m = __import__(mod, fromlist=["__version__"])
        info[mod] = getattr(m, "__version__", "?")
    except Exception as e:
        info[mod] = None
        info[mod + "_error"] = repr(e)[:200]
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

CONFIGS = {"b16": "configs/pretrain/fd_clip_vit_base_300ep.yaml", "l14": "configs/pretrain/fd_clip_vit_large_300ep.yaml",
           "swinv2b": "configs/pretrain/fd_esvit_swin_base_300ep.yaml",
           "dinov2": "configs/pretrain/fd_dinov2_vitb14_reg4_vit_base.yaml",
           "two": "configs/pretrain/fd_siglip2_dinov2_vit_base.yaml"}
# dry run: a SwinV2 student and Swin teacher small enough for a CPU (64 px, 2x2 = 4 tokens both sides)
TINY_SWIN = ["model.student.img_size=64", "model.student.embed_dim=16", "model.student.depth=[1, 1, 2, 1]",
             "model.student.num_heads=[1, 2, 2, 4]", "model.student.window_size=4",
             "model.teacher.model_kwargs={window_size: 4, embed_dim: 16, depths: [1, 1, 2, 1], "
             "num_heads: [1, 2, 2, 4]}"]
# step128 variants, most informative first (a timeout keeps the ones already measured):
#   fast        the config as shipped: whole compile + CUDA-graph teacher + SDPA + bf16 + fused AdamW
#   flex        FlexAttention score_mod bias with the sm90 tiles (compile.flex_kernel_options=auto)
#   flex-small  the same with the fallback tiles
#   blocks      per-block compile (compile time vs speed; re-measured after the recompile-limit fix)
STEP_VARIANTS = ["fast", "flex:model.attention=flex", "flex-small:model.attention=flex,compile.flex_kernel_options=small",
                 "blocks:compile.scope=blocks"]
# compile.mode=max-autotune-no-cudagraphs: GEMM epilogue fusion (bias + GELU) and, for flex, autotuned tiles
# (configs that overflow shared memory are dropped); its compile time is the point, so it runs last
AUTOTUNE_VARIANTS = ["fast-autotune:compile.mode=max-autotune-no-cudagraphs",
                     "flex-autotune:model.attention=flex,compile.flex_kernel_options=default,"
                     "compile.mode=max-autotune-no-cudagraphs"]
E2E_BACKENDS = "dali@0.65,dali@0.75,torchvision,nvjpeg,ffcv"


def plan(py: str, out: Path, dry: bool) -> list[dict]:
    """The sections: name, command, limit in seconds (``cap``), and the least time worth starting with."""
    tp = [py, "bench/throughput.py"]
    if dry:
        dev = ["--device", "cpu", "--compile-backend", "aot_eager"]
        tiny, l14 = ["--tiny"], ["--tiny", "--set", "model.teacher.img_size=null"]
        swin = [*(a for o in TINY_SWIN for a in ("--set", o))]
        b1, b2, b_swin, n_img, workers = "8", "16", "4", 96, "2"
        steps, e2e_steps = ["--steps", "2", "--warmup", "1"], ["--steps", "3", "--warmup", "1"]
    else:
        dev, tiny, l14, swin = [], [], [], []
        b1, b2, b_swin, n_img, workers = "128", "256", "128", 5000, "12"
        steps, e2e_steps = ["--steps", "15", "--warmup", "3"], ["--steps", "30", "--warmup", "5"]
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    data = ["--generate", str(n_img), "--data", str(tmp / f"fdfast_device_jpegs_{n_img}"),
            "--beton", str(tmp / f"fdfast_device_{n_img}.beton"), "--workers", workers]

    def step(name: str, config: str, batch: str, variants: list[str], *extra: str) -> list[str]:
        return [*tp, "--mode", "step", "--config", CONFIGS[config], "--batch-size", batch, *dev, *steps, *extra,
                *(a for v in variants for a in ("--variant", v)), "--json", str(out / f"{name}.json")]

    def mode(name: str, *args: str, timed: list[str] = steps) -> list[str]:
        return [*tp, *args, *dev, *timed, *tiny, "--json", str(out / f"{name}.json")]

    # --continue-on-collection-errors: a test file of a backend absent on the box must not stop the others
    tests = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--continue-on-collection-errors",
             "tests", f"--junitxml={out / 'gpu_tests.xml'}"]
    sections = [
        {"name": "env", "cmd": [py, "-c", ENV_SNIPPET, str(out / "env.json")], "cap": 90, "min": 5},
        {"name": "step128", "cmd": step("step128", "b16", b1, STEP_VARIANTS, "--baseline", *tiny), "cap": 170},
        {"name": "tests", "cmd": tests, "cap": 110},
        {"name": "profile", "cmd": mode("profile", "--profile", "--batch-size", b1, "--profile-dir", str(out)),
         "cap": 60},
        {"name": "e2e", "cmd": mode("e2e", "--mode", "e2e", "--batch-size", b1, "--backends", E2E_BACKENDS, *data,
                                    timed=e2e_steps), "cap": 120},
        {"name": "teacher", "cmd": mode("teacher", "--mode", "teacher", "--batch-size", b1, "--variant",
                                        "official-fp16", "--variant", "compiled+graph", "--variant",
                                        "compiled+graph+bf16"), "cap": 60},
        {"name": "vitl14", "cmd": step("vitl14", "l14", b1, ["fast"], *l14), "cap": 100},
        {"name": "swinv2b", "cmd": step("swinv2b", "swinv2b", b_swin, ["fast"], *swin), "cap": 100},
        # any timm teacher: DINOv2-B/14 reg4 at 196 px (201 tokens, registers dropped) -> ViT-B/16, as shipped
        {"name": "dinov2b14", "cmd": step("dinov2b14", "dinov2", b1, ["fast"], *tiny), "cap": 100},
        # several teachers: SigLIP2-B/16 + DINOv2-B/14 reg4 -> ViT-B/16, two graphed targets, MLP heads, PHI-S
        {"name": "teachers2", "cmd": step("teachers2", "two", b1, ["fast"], *tiny), "cap": 120},
        {"name": "loader", "cmd": mode("loader", "--mode", "loader", "--batch-size", b1, "--backends", E2E_BACKENDS,
                                       *data, timed=e2e_steps), "cap": 45},
        {"name": "step256", "cmd": step("step256", "b16", b2, ["fast"], "--baseline", *tiny), "cap": 90},
        {"name": "autotune", "cmd": step("autotune", "b16", b1, AUTOTUNE_VARIANTS, *tiny), "cap": 200},
    ]
    if dry:  # a shared CPU is slower than the GPU box: the limits are the GPU's, the dry run only checks the wiring
        for s in sections:
            s["cap"] = max(s["cap"], 300)
    return sections
