"""Students, built from timm classes and initialised the way the official FD code does.

* ``beit``: :class:`timm.models.beit.Beit` — no absolute position embedding, one relative position
  bias shared by every block (distillation) or one table per block (fine-tuning), layer scale,
  q/v bias (k bias 0), LN eps 1e-6. Distillation keeps the final ``norm`` over all tokens
  (CLS included); fine-tuning uses mean pooling + ``fc_norm`` + head (init x0.001).
* ``swinv2``: :class:`timm.models.swin_transformer_v2.SwinTransformerV2` (cosine attention, log-spaced
  continuous position bias, res-post-norm); the distillation output is the last stage's 7x7 tokens.

Module names follow the official checkpoint (``encoder.*``, ``decoder.*``), which keeps the
weight-decay rules and the official export a matter of prefixes.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from timm.models.swin_transformer_v2 import SwinTransformerV2

from ..config import StudentConfig


def timm_kwargs(cfg: StudentConfig, *, finetune: bool = False) -> dict:
    """The exact constructor kwargs of the timm class :func:`build_student` instantiates.

    Plain JSON values, so the timm export records them as ``model_args`` and ``timm.create_model`` rebuilds
    the very same network from them. ViT: ``finetune`` switches from the shared relative position bias to one
    table per block, mean pooling + ``fc_norm`` + a class head; timm's default norm layer is already FD's
    LayerNorm(eps=1e-6). SwinV2: the same network in both layouts, with a head only when fine-tuning.
    """
    common = dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
                  mlp_ratio=cfg.mlp_ratio, qkv_bias=True, drop_path_rate=cfg.drop_path,
                  num_classes=cfg.num_classes if finetune else 0)
    if cfg.arch == "beit":
        shared = cfg.shared_rel_pos_bias and not finetune
        return dict(common, depth=cfg.depth, num_heads=cfg.num_heads, init_values=cfg.init_values,
                    use_abs_pos_emb=False, use_rel_pos_bias=not shared, use_shared_rel_pos_bias=shared,
                    global_pool="avg" if finetune else "")
    return dict(common, depths=list(cfg.depth), num_heads=list(cfg.num_heads), window_size=cfg.window_size)


def build_beit(cfg: StudentConfig, *, finetune: bool = False) -> Beit:
    """BEiT-style ViT; ``finetune`` switches to per-block RPB + mean pooling + class head."""
    return Beit(**timm_kwargs(cfg, finetune=finetune))


def build_swinv2(cfg: StudentConfig, *, finetune: bool = False) -> SwinTransformerV2:
    return SwinTransformerV2(**timm_kwargs(cfg, finetune=finetune))


@torch.no_grad()
def fd_init_beit(model: Beit) -> None:
    """The distillation student's init (official ``VisionTransformerForFD``).

    Linear and Conv2d weights and ``cls_token`` get trunc_normal(0.02) truncated at +-std (timm
    truncates at +-2, i.e. not at all, and leaves the patch-embed conv at PyTorch's default);
    biases 0; then block l's ``attn.proj`` and ``mlp.fc2`` are divided by sqrt(2 l).
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
            if m.bias is not None:
                m.bias.zero_()
    trunc_normal_(model.cls_token, std=0.02, a=-0.02, b=0.02)
    model.fix_init_weight()


@torch.no_grad()
def fd_init_swinv2(model: SwinTransformerV2) -> None:
    """The official SwinV2 init: res-post-norm weights start at 1e-5 (timm: 0), Linear/Conv
    trunc_normal(0.02), and ``proj`` / ``fc2`` of global block b (1-based) divided by sqrt(2 b)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                m.bias.zero_()
    block_id = 0
    for stage in model.layers:
        for blk in stage.blocks:
            block_id += 1
            for norm in (blk.norm1, blk.norm2):
                norm.weight.fill_(1e-5)
                norm.bias.zero_()
            blk.attn.proj.weight.div_(math.sqrt(2.0 * block_id))
            blk.mlp.fc2.weight.div_(math.sqrt(2.0 * block_id))


def student_tokens(backbone: nn.Module, arch: str, x: torch.Tensor) -> torch.Tensor:
    """Distillation tokens (B, N, D): the final-norm output of every token (Swin: last stage)."""
    y = backbone.forward_features(x)
    if arch == "swinv2":  # (B, H, W, C) -> (B, HW, C)
        y = y.flatten(1, 2)
    return y


def build_student(cfg: StudentConfig, *, finetune: bool = False, fd_init: bool = True) -> nn.Module:
    """The timm backbone (no ``Encoder`` wrapper) with FD's init when ``fd_init``."""
    if cfg.arch == "beit":
        model = build_beit(cfg, finetune=finetune)
        if fd_init and not finetune:
            fd_init_beit(model)
    elif cfg.arch == "swinv2":
        model = build_swinv2(cfg, finetune=finetune)
        if fd_init:
            fd_init_swinv2(model)
    else:  # config validation makes this unreachable
        raise ValueError(f"model.student.arch={cfg.arch!r}")
    return model


class DistillModel(nn.Module):
    """The trainable half of FD: ``encoder`` (student) + ``decoder`` (the 1x1-conv projector, as a
    Linear: identical maths and default init). Only this module is wrapped in DDP."""

    def __init__(self, student_cfg: StudentConfig, teacher_dim: int):
        super().__init__()
        self.arch = student_cfg.arch
        self.encoder = build_student(student_cfg)
        self.decoder = nn.Linear(self.encoder.num_features, teacher_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(student_tokens(self.encoder, self.arch, x))
