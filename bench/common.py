"""What every mode of the benchmark shares: the config a run starts from (YAML + ``--set`` overrides, the
``--tiny`` models), device-resident synthetic batches, the record of a step's switches and :class:`Built`,
one step under test."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from fdfast.config import FDConfig, load_config
from pipelines.base import LoaderRequest
from pipelines.synthetic import SyntheticLoader

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "pretrain" / "fd_clip_vit_base_300ep.yaml"
# --tiny: same code paths, models small enough for a CPU smoke test (17 tokens both sides).
TINY_STUDENT = ["model.student.img_size=32", "model.student.patch_size=8", "model.student.embed_dim=48",
                "model.student.depth=2", "model.student.num_heads=2"]
TINY_TEACHER_KWARGS = "{patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"
TINY_OVERRIDES = [*TINY_STUDENT, f"model.teacher.model_kwargs={TINY_TEACHER_KWARGS}"]


def teacher_overrides(config: str, overrides: list[str], *, tiny: bool) -> list[str]:
    """Random weights (and with ``tiny`` the tiny sizes) for the config's teacher, or for each entry of its
    ``model.teachers`` (``model.teachers.<name>.weights=random``): no weights file on the benchmark's box."""
    cfg = load_config(config, ["data.backend=synthetic", *overrides])
    keys = [t.key for t in cfg.model.teacher_configs]
    return [f"{k}.weights=random" for k in keys] + ([f"{k}.model_kwargs={TINY_TEACHER_KWARGS}" for k in keys]
                                                    if tiny else [])


@dataclasses.dataclass
class Built:
    """A step under test: ``run(images, labels, step index) -> metrics`` plus what the report needs."""

    name: str
    run: Callable[[torch.Tensor, torch.Tensor, int], dict]
    model: nn.Module
    teacher: nn.Module
    precision: str
    notes: list[str]
    target: Any = None
    task: Any = None
    """The fdfast ``DistillTask`` of a fast step (its teachers, heads and targets), None for the baseline."""


def switches(cfg: FDConfig) -> dict[str, Any]:
    """The switches of a step as the JSON records them: the compile section and the other speed knobs."""
    return {"compile": dataclasses.asdict(cfg.compile), "attention": cfg.model.attention,
            "channels_last": cfg.train.channels_last, "tf32": cfg.train.tf32,
            "cudnn_benchmark": cfg.train.cudnn_benchmark, "precision": cfg.train.precision,
            "fused_adamw": cfg.optim.fused}


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``NAME`` or ``NAME:key=value,key=value`` (values must not contain commas)."""
    name, _, rest = text.partition(":")
    overrides = [x.strip() for x in rest.split(",") if x.strip()] if rest else []
    return name.strip(), overrides


def synthetic_batches(cfg: FDConfig, dev: torch.device, n: int, batch_size: int) -> list:
    """Device-resident uint8 channels-last batches from pipelines.synthetic, made before timing (the same
    on every rank: they only feed the timed step)."""
    data = dataclasses.replace(cfg.data, backend="synthetic", synthetic_size=batch_size * n)
    request = LoaderRequest(train=True, batch_size=batch_size, img_size=cfg.model.student.img_size, device=dev,
                            seed=cfg.train.seed)
    return [(x.contiguous(memory_format=torch.channels_last), y) for x, y in SyntheticLoader(data, request)]
