"""Feature distillation (spec §1): a frozen teacher's whitened tokens are the student's regression target.

``loss(images, labels)``: the teacher target (teacher normalisation on the device, frozen teacher,
non-affine LayerNorm; compiled and CUDA-graph captured when configured) and the student's projected
tokens from the ImageNet-normalised pixels, compared with SmoothL1 (β = 2). Labels are unused. Only the
student + projector (:class:`~fdfast.models.student.DistillModel`) trains and sits in DDP; the teacher
stays outside, frozen, in eval mode.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from ..config import ConfigError, FDConfig
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..distributed import DistInfo
from ..models.attention import set_attention_kernel
from ..models.student import DistillModel
from ..models.target import GraphedTarget, TeacherTarget
from ..models.teachers import Teacher, build_teacher
from ..objective import fd_loss, normalize
from ..optim import param_groups
from ..parallelize import apply_compile, prepare_model, wrap_for_training
from .base import Task


def build_target(teacher: Teacher, cfg: FDConfig, device: torch.device,
                 compile_backend: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The teacher target of a run: :class:`TeacherTarget` on the teacher's fused (flash) attention;
    with ``compile.enabled`` compiled (``compile.scope``: the whole target incl. normalise/whiten, or
    the teacher's blocks); with ``compile.cuda_graph_teacher`` on CUDA replayed from a CUDA graph per
    input shape. ``compile_backend`` (e.g. 'aot_eager') is for CPU checks of the compiled path."""
    set_attention_kernel(teacher, "sdpa")
    fn: nn.Module = TeacherTarget(teacher, cfg.model.whiten_eps).to(device)
    if cfg.compile.enabled:
        if cfg.compile.scope == "whole":
            fn = apply_compile(fn, cfg.compile, scope="whole", backend=compile_backend)
        else:
            apply_compile(fn.teacher, cfg.compile, scope="blocks", backend=compile_backend)
    if cfg.compile.cuda_graph_teacher and device.type == "cuda":
        return GraphedTarget(fn, device)
    return fn


class DistillTask(Task):
    """Student + projector trained to regress the teacher's whitened tokens."""

    def __init__(self, cfg: FDConfig, info: DistInfo, compile_backend: Optional[str] = None, *,
                 trust_pickle: bool = False):
        s = cfg.model.student
        self.teacher = build_teacher(cfg.model.teacher, s.img_size, trust_pickle=trust_pickle)
        self.teacher.to(info.device)
        if self.teacher.num_tokens != s.num_tokens:
            raise ConfigError(
                f"student ({s.arch}, img {s.img_size}, patch {s.patch_size}) gives {s.num_tokens} tokens but the "
                f"teacher {cfg.model.teacher.model!r} gives {self.teacher.num_tokens}; FD matches tokens index by "
                "index, so change model.student.img_size/patch_size or model.teacher.img_size")
        self.model = prepare_model(DistillModel(s, self.teacher.embed_dim), cfg, info)
        self.groups = param_groups(self.model, cfg.optim, s)
        self.train_model = wrap_for_training(self.model, cfg, info, compile_backend)
        self.target = build_target(self.teacher, cfg, info.device, compile_backend)
        self.beta = cfg.model.loss_beta

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = self.target(images)
        pred = self.train_model(normalize(images, IMAGENET_MEAN, IMAGENET_STD))
        return fd_loss(pred, target, self.beta)
