"""Shared pieces of the compile / attention / teacher-target tests: a tiny distillation run built the way
the trainer builds it (``DistillTask`` + ``build_training``), uint8 batches, weight comparisons and an
exact-fp32 context for GPU comparisons."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn as nn

from fdfast.distributed import DistInfo
from fdfast.optim import Schedule
from fdfast.step import TrainStep
from fdfast.tasks import DistillTask
from fdfast.trainer import build_training, seed_all

CPU = DistInfo(device=torch.device("cpu"))
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# conftest's tiny run (17 tokens both sides) without drop path (compiled and eager runs then draw no
# random masks, so their numbers can be compared) and with an LR large enough for weights to move
# visibly in 3 steps
TINY_SECTIONS = dict(model={"student": {"drop_path": 0.0}}, optim={"base_lr": 0.5, "warmup_epochs": 0},
                     train={"batch_size": 4})


def tiny_sections(**over: dict) -> dict:
    """TINY_SECTIONS with ``over``'s keys set inside each section (e.g. ``compile={"enabled": True}``)."""
    out = {k: dict(v) for k, v in TINY_SECTIONS.items()}
    for section, values in over.items():
        out.setdefault(section, {}).update(values)
    return out


@dataclass
class TinyRun:
    task: DistillTask
    step: TrainStep
    schedule: Schedule

    def losses(self, batches: list, n: int) -> list[float]:
        """``n`` optimizer steps cycling over ``batches``; the loss of each, read after the step."""
        out = []
        for i in range(n):
            self.step.set_lr(self.schedule(i))
            out.append(float(self.step([batches[i % len(batches)]])["loss"]))
        return out


def build_run(cfg, info: DistInfo = CPU, backend: Optional[str] = None) -> TinyRun:
    seed_all(cfg.train.seed)
    task = DistillTask(cfg, info, compile_backend=backend)
    _, step, schedule = build_training(task, cfg, info, steps_per_epoch=1000)
    return TinyRun(task, step, schedule)


def uint8_batches(n: int, batch: int = 4, size: int = 32, device: str = "cpu", seed: int = 0) -> list:
    """``n`` channels-last uint8 batches with int64 labels (the loader contract)."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, device=device, generator=g)
        out.append((x.permute(0, 3, 1, 2), torch.zeros(batch, dtype=torch.long, device=device)))
    return out


def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def max_weight_change(model: nn.Module, init: dict) -> float:
    return max((v.float() - init[k].float()).abs().max().item() for k, v in model.state_dict().items())


@contextlib.contextmanager
def exact_fp32():
    """No TF32 and no autotuned conv algorithms (building a CUDA task turns TF32 on process-wide), so fp32
    comparisons measure the code, not the math mode."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]
