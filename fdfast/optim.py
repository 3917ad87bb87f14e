"""Parameter groups (no-weight-decay rules, layer-wise LR decay), AdamW / LARS, LR schedule.

Rules follow the official ``optimizer.py`` (spec §1.7, §2.3):

* no weight decay for 1-D parameters (norms, biases, layer scale, q/v bias, logit_scale), names
  ending in ``.bias``, ``cls_token``, ``pos_embed``, ``absolute_pos_embed``, and for Swin any name
  containing ``rpe_mlp``/``cpb_mlp``, ``logit_scale`` or ``relative_position_bias_table``;
* the ViT relative position bias table **is** decayed by the official code (it is 2-D and ViT has no
  keyword list); ``optim.decay_rel_pos_bias=false`` excludes it as BEiT and timm do;
* layer decay (fine-tuning): scale ``decay ** (G - 1 - layer_id)`` with G = depth + 2.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .config import OptimConfig, StudentConfig

SWIN_NO_DECAY_KEYWORDS = ("rpe_mlp", "cpb_mlp", "logit_scale", "relative_position_bias_table")
NO_DECAY_NAMES = ("cls_token", "pos_embed", "absolute_pos_embed", "mask_token")


def _strip(name: str) -> str:
    for prefix in ("module.", "_orig_mod.", "encoder."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def is_no_decay(name: str, param: torch.Tensor, arch: str, decay_rel_pos_bias: bool = True) -> bool:
    bare = _strip(name)
    if param.ndim <= 1 or name.endswith(".bias") or bare in NO_DECAY_NAMES:
        return True
    if arch == "swinv2" and any(k in name for k in SWIN_NO_DECAY_KEYWORDS):
        return True
    if arch == "beit" and not decay_rel_pos_bias and "relative_position_bias_table" in name:
        return True
    return False


def layer_id(name: str, arch: str, num_layers: int, depths: Iterable[int] = ()) -> int:
    """Layer index for layer-wise LR decay; ``num_layers`` = G (ViT: depth + 2, Swin: sum + 2).

    ViT: cls_token / mask_token / pos_embed / patch_embed -> 0, blocks.k -> k + 1, the rest -> G - 1.
    Swin (official mapping, not timm's stage-start grouping): patch_embed -> 0, block b of stage s ->
    sum(depths[:s]) + b + 1; the downsample that ends stage s (timm: ``layers.{s+1}.downsample``)
    -> sum(depths[:s+1]), i.e. with the last block of stage s; norm / head -> G - 1.
    """
    n = _strip(name)
    if arch == "beit":
        if n in ("cls_token", "mask_token", "pos_embed") or n.startswith("patch_embed"):
            return 0
        if n.startswith("blocks."):
            return int(n.split(".")[1]) + 1
        return num_layers - 1
    depths = list(depths)
    if n.startswith(("patch_embed", "absolute_pos_embed")):
        return 0
    if n.startswith("layers."):
        parts = n.split(".")
        stage = int(parts[1])
        if parts[2] == "downsample":  # timm keeps stage s's merge at the start of stage s + 1
            return sum(depths[:stage])
        if parts[2] == "blocks":
            return sum(depths[:stage]) + int(parts[3]) + 1
    return num_layers - 1


def param_groups(model: nn.Module, cfg: OptimConfig, student: StudentConfig) -> list[dict]:
    """Groups with ``weight_decay`` and ``lr_scale``; frozen parameters are left out."""
    arch = student.arch
    decay_on = cfg.layer_decay < 1.0
    num_layers = student.num_blocks + 2
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_wd = is_no_decay(name, p, arch, cfg.decay_rel_pos_bias)
        lid = layer_id(name, arch, num_layers, student.stages) if decay_on else num_layers - 1
        key = (lid, no_wd)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": 0.0 if no_wd else cfg.weight_decay,
                           "lr_scale": cfg.layer_decay ** (num_layers - 1 - lid) if decay_on else 1.0}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    # decayed group first, as the official (decay, no-decay) order; stable for checkpoints
    return [groups[k] for k in sorted(groups, key=lambda k: (k[0], k[1]))]


def build_optimizer(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if cfg.optimizer == "lars":
        return Lars(clean, lr=0.0, weight_decay=cfg.weight_decay, momentum=0.9, trust_coefficient=1e-3)
    fused = cfg.fused if cfg.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(clean, lr=0.0, betas=tuple(cfg.betas), eps=cfg.eps,
                             weight_decay=cfg.weight_decay, fused=fused or None)


class Lars(torch.optim.Optimizer):
    """LARS as in MoCo v3 / MAE, which the official linear probe uses (spec §2.4): momentum SGD where
    parameters with ndim > 1 get weight decay and the trust ratio ``eta * |w| / |g + wd * w|``, and 1-D
    ones (biases, norms) a plain momentum step. timm's ``Lars`` differs in both points: it divides by
    ``|g| + wd * |w|`` (the LARC form) and adapts by group (only when the group's weight_decay != 0,
    so not at all with weight_decay 0)."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                dp = p.grad
                if dp is None:
                    continue
                if p.ndim > 1:
                    dp = dp.add(p, alpha=g["weight_decay"])
                    w_norm, u_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(w_norm)
                    # ratio 1 where either norm is 0 (fresh zero weights, no gradient); no host sync
                    q = torch.where(w_norm > 0, torch.where(u_norm > 0, g["trust_coefficient"] * w_norm / u_norm,
                                                            one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])
        return loss


def scaled_lrs(cfg: OptimConfig, total_batch: int) -> tuple[float, float, float]:
    """(peak, warm-up start, min) LR: the per-512 values times total_batch / 512 (official
    ``main_fd.py``: batch per GPU x world size, then x accumulation steps)."""
    f = total_batch / 512.0
    return cfg.base_lr * f, cfg.warmup_lr * f, cfg.min_lr * f


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, warmup_lr: float, min_lr: float) -> float:
    """timm 0.4.12 ``CosineLRScheduler`` per iteration with ``warmup_prefix=True``, ``cycle_limit=1``:
    linear from ``warmup_lr`` to ``peak`` over ``warmup_steps``, then a half cosine to ``min_lr``
    over the remaining ``total_steps - warmup_steps``; ``min_lr`` afterwards."""
    if step < warmup_steps:
        return warmup_lr + step * (peak - warmup_lr) / warmup_steps
    t = step - warmup_steps
    span = max(1, total_steps - warmup_steps)
    if t >= span:
        return min_lr
    return min_lr + 0.5 * (peak - min_lr) * (1.0 + math.cos(math.pi * t / span))


class Schedule:
    """LR per parameter group for the optimizer step ``step`` (0-based), as the official loop applies it.

    The official ``train_one_epoch`` calls ``lr_scheduler.step_update(t)`` *after* optimizer step ``t``,
    and the scheduler starts at ``warmup_lr``: step ``t`` therefore runs with the schedule's value at
    ``t - 1``, and steps 0 and 1 both run at the warm-up start. Layer decay multiplies only the peak:
    every group warms up from the same ``warmup_lr`` and ends at the same ``min_lr`` (timm scheduler
    semantics, spec pitfall 14).

    With gradient accumulation (``accum_steps`` = A > 1) the schedule counts **micro-batches**, as the
    official one does: it is built over ``len(loader)`` micro-batches per epoch (``batches_per_epoch``),
    warm-up included, and after the optimizer step that ends on micro-batch ``idx`` of the epoch it is
    set to ``epoch * len(loader) + idx``. Optimizer step k > 0 of an epoch therefore runs at micro-batch
    ``k * A - 1`` of the schedule (the last micro-batch of the step before), not at ``(k - 1) * A``:
    A - 1 micro-batches further along the warm-up than counting optimizer steps would be."""

    def __init__(self, cfg: OptimConfig, total_batch: int, steps_per_epoch: int, epochs: int,
                 lr_scales: list[float], *, accum_steps: int = 1, batches_per_epoch: Optional[int] = None):
        self.peak, self.warmup_lr, self.min_lr = scaled_lrs(cfg, total_batch)
        self.steps_per_epoch, self.accum_steps = steps_per_epoch, accum_steps
        # micro-batches per epoch: the leftover ones (len(loader) % A) are read by no optimizer step
        self.batches_per_epoch = batches_per_epoch or steps_per_epoch * accum_steps
        self.total_steps = self.batches_per_epoch * epochs
        self.warmup_steps = int(cfg.warmup_epochs * self.batches_per_epoch)
        self.lr_scales = lr_scales

    def micro_batch(self, step: int) -> int:
        """The schedule position optimizer step ``step`` runs at: the last micro-batch of the step before."""
        if step == 0:
            return 0
        epoch, k = divmod(step - 1, self.steps_per_epoch)
        return epoch * self.batches_per_epoch + (k + 1) * self.accum_steps - 1

    def __call__(self, step: int) -> list[float]:
        t = self.micro_batch(step)
        return [lr_at(t, self.total_steps, self.warmup_steps, self.peak * s, self.warmup_lr, self.min_lr)
                for s in self.lr_scales]
