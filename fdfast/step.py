"""The train step: pure, compilable, no I/O, no ``.item()``, no logging.

Split as in torchtitan: ``Task.loss`` (one micro-batch, the maths; ``fdfast/tasks``) <
``TrainStep.__call__`` (one optimizer step over ``accum_steps`` micro-batches) < ``Trainer.fit`` (the
loop). The step returns device tensors; the loop reads them only on logging steps, so nothing here
waits for the GPU (except GradScaler's inf check in the fp16 mode, which the official recipe uses).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn as nn

from .errors import ConfigError

# a scalar loss, or {"loss": total, "loss_<name>": part, ...} (every key averaged over the micro-batches)
LossFn = Callable[[torch.Tensor, torch.Tensor], Union[torch.Tensor, dict[str, torch.Tensor]]]


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 elsewhere; fp16/bf16 autocast is CUDA-only here."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision in ("fp16", "bf16") and device.type != "cuda":
        raise ConfigError(f"train.precision={precision!r} needs a CUDA device; use train.precision=fp32 (or auto) "
                          "on a CPU")
    return precision


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


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
        totals: dict[str, torch.Tensor] = {}
        for i, (images, labels) in enumerate(batches):
            # DDP all-reduces gradients only on the last micro-batch of an accumulation window.
            no_sync = getattr(self.model, "no_sync", None)
            ctx = no_sync() if (no_sync is not None and i < n - 1) else contextlib.nullcontext()
            with ctx:
                with autocast(self.precision, self.device):
                    out = self.loss_fn(images, labels)
                parts = out if isinstance(out, dict) else {"loss": out}
                scaled = parts["loss"] / n
                if self.scaler is not None:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            for key, value in parts.items():  # the total and any "loss_<name>" parts, averaged alike
                if key not in totals:
                    totals[key] = torch.zeros((), device=self.device)
                totals[key] += value.detach()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        # clip_grad_norm_ scales by min(1, max/norm) on the device: no host sync.
        max_norm = self.clip_grad if self.clip_grad is not None else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        skipped = ~torch.isfinite(grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # GradScaler skips the update itself on inf/NaN gradients
            self.scaler.update()
        else:
            self._step_unless(skipped)
        self.optimizer.zero_grad(set_to_none=True)
        return {**{key: total / n for key, total in totals.items()}, "grad_norm": grad_norm, "skipped": skipped}

    def _step_unless(self, skipped: torch.Tensor) -> None:
        """The optimizer step, skipped when the gradient norm is NaN/Inf: one bad batch (or a loss spike)
        must not turn the weights into NaN, which every later checkpoint and resume would then carry.
        Fused Adam/AdamW read ``found_inf`` on the device and skip there (no host sync: the mechanism
        GradScaler uses); other optimizers decide on the host, which is free on a CPU."""
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = skipped.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(skipped):
            self.optimizer.step()

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict() if self.scaler is not None else {}}

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
