"""The train step: pure, compilable, no I/O, no ``.item()``, no logging.

Split as in torchtitan: ``forward_loss`` (one micro-batch, the maths) < ``TrainStep.__call__`` (one
optimizer step over ``accum_steps`` micro-batches) < ``trainer.train`` (the loop). The step returns
device tensors; the loop reads them only on logging steps, so nothing here waits for the GPU
(except GradScaler's inf check in the fp16 mode, which the official recipe uses).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.base import IMAGENET_MEAN, IMAGENET_STD

from .objective import fd_loss, normalize, pixel_constants, whiten

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 elsewhere; fp16/bf16 autocast is CUDA-only here."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision in ("fp16", "bf16") and device.type != "cuda":
        raise ValueError(f"train.precision={precision!r} needs a CUDA device; use fp32 (or auto) on CPU")
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class TeacherTarget(nn.Module):
    """uint8 pixels -> whitened teacher tokens (float32). Frozen, no grad, no state of its own.

    The teacher's own normalisation (CLIP's or ImageNet's mean/std) is applied here, on the device,
    to the same uint8 pixels the student sees; a teacher with a smaller input size (CLIP L/14 at 224
    under a 256 px student) gets the official code's resize (bilinear, no antialias).
    """

    def __init__(self, teacher: nn.Module, eps: float = 1e-5):
        super().__init__()
        self.teacher = teacher
        self.eps = float(eps)
        self.img_size = int(teacher.img_size)
        # Buffers (not Python lists) so that they follow .to(), exist before a CUDA-graph capture and
        # are graph inputs, not host->device copies, when compiled.
        p = next(teacher.parameters(), None)
        m, s = pixel_constants(tuple(teacher.mean), tuple(teacher.std),
                               p.device if p is not None else torch.device("cpu"))
        self.register_buffer("pix_mean", m.clone(), persistent=False)
        self.register_buffer("pix_std", s.clone(), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.pix_mean) / self.pix_std
        size = self.img_size
        if x.shape[-1] != size or x.shape[-2] != size:
            # official: torchvision 0.13 Resize((224, 224)) on a tensor = bilinear, no antialias
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        return whiten(self.teacher(x), self.eps)


def distill_loss_fn(model: nn.Module, target_fn: Callable[[torch.Tensor], torch.Tensor],
                    beta: float = 2.0) -> LossFn:
    """The FD forward for one micro-batch: teacher target, student prediction, SmoothL1."""

    def forward_loss(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        target = target_fn(images)
        pred = model(normalize(images, IMAGENET_MEAN, IMAGENET_STD))
        return fd_loss(pred, target, beta)

    return forward_loss


class TrainStep:
    """One optimizer step: forward/backward over the micro-batches, clip, update.

    ``model`` is what backward flows through (possibly DDP-wrapped and compiled); ``params`` are the
    trainable parameters (clipped together, as the official ``clip_grad_norm_(model.parameters())``).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                 params: Sequence[torch.Tensor], *, precision: str, device: torch.device,
                 clip_grad: Optional[float] = None):
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.params = [p for p in params if p.requires_grad]
        self.precision = precision
        self.device = device
        self.clip_grad = clip_grad
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def set_lr(self, lrs: Sequence[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr

    def __call__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batches = list(batches)
        n = len(batches)
        total = torch.zeros((), device=self.device)
        for i, (images, labels) in enumerate(batches):
            # DDP all-reduces gradients only on the last micro-batch of an accumulation window.
            no_sync = getattr(self.model, "no_sync", None)
            ctx = no_sync() if (no_sync is not None and i < n - 1) else contextlib.nullcontext()
            with ctx:
                with autocast(self.precision, self.device):
                    loss = self.loss_fn(images, labels)
                scaled = loss / n
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            total += loss.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # clip_grad_norm_ scales by min(1, max/norm) on the device: no host sync.
        max_norm = self.clip_grad if self.clip_grad is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": total / n, "grad_norm": grad_norm}

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
