"""The official-style baseline: the same models and data run the way the official ``main_fd.py`` runs them.

This step is the denominator of every published ratio, so it stays what it is: eager; fp16 autocast +
GradScaler on CUDA; float NCHW input made with ToTensor + Normalize semantics (separate ops on a contiguous
float tensor) and the CLIP re-normalisation of that tensor for the teacher; the CLIP teacher with fp16
weights (CLIP's ``convert_weights``) and fp16 input; explicit-softmax attention in student and teacher;
single-tensor AdamW (torch 1.12's default); ``zero_grad(set_to_none=False)``; ``clip_grad_norm_`` after
``unscale_``; and, every step, ``torch.cuda.synchronize()``, ``loss.item()`` and ``scaler.get_scale()`` as
``train_one_epoch`` logs them. On CPU it runs in fp32 (fp16 autocast and GradScaler are CUDA-only here).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn as nn

from bench.common import Built
from fdfast.config import FDConfig
from fdfast.constants import IMAGENET_MEAN, IMAGENET_STD
from fdfast.distributed import DistInfo
from fdfast.models.attention import set_attention_kernel
from fdfast.models.student import DistillModel
from fdfast.models.teachers import Teacher, build_teacher
from fdfast.objective import fd_loss, whiten
from fdfast.optim import Schedule, param_groups
from fdfast.parallelize import wrap_ddp
from fdfast.trainer import seed_all


def official_teacher(cfg: FDConfig, dev: torch.device, *, trust_pickle: bool = False) -> Teacher:
    """The teacher as the official code runs it: fp16 weights for CLIP on CUDA, explicit-softmax attention
    (CLIP's ``nn.MultiheadAttention`` and the official ViTs compute softmax explicitly)."""
    tcfg = cfg.model.teacher
    if tcfg.kind == "clip" and dev.type == "cuda":
        tcfg = dataclasses.replace(tcfg, fp16_weights=True)
    teacher = build_teacher(tcfg, cfg.model.student.img_size, trust_pickle=trust_pickle).to(dev)
    set_attention_kernel(teacher, "eager")
    return teacher


def build_official_step(cfg: FDConfig, info: DistInfo, *, trust_pickle: bool = False) -> Built:
    """An official-style step (main_fd.py + models/feature_distillation.py) on the same models and data."""
    dev = info.device
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True  # main_fd.py sets it
    s = cfg.model.student
    seed_all(cfg.train.seed)
    teacher = official_teacher(cfg, dev, trust_pickle=trust_pickle)
    model = DistillModel(s, teacher.embed_dim).to(dev)
    set_attention_kernel(model.encoder, "eager")
    groups = param_groups(model, cfg.optim, s)
    run = wrap_ddp(model, info)
    clean = [{k: v for k, v in g.items() if k not in ("names", "lr_scale")} for g in groups]
    optimizer = torch.optim.AdamW(clean, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay, foreach=False, fused=False)
    precision = "fp16" if cuda else "fp32"
    scaler = torch.amp.GradScaler("cuda") if cuda else None
    params = [p for g in groups for p in g["params"]]
    total_batch = cfg.train.batch_size * info.world_size
    schedule = Schedule(cfg.optim, total_batch, 1000, cfg.train.epochs, [g["lr_scale"] for g in groups])

    in_mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
    in_std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)
    t_mean = torch.tensor(teacher.mean, device=dev).view(1, 3, 1, 1)
    t_std = torch.tensor(teacher.std, device=dev).view(1, 3, 1, 1)
    renorm = tuple(teacher.mean) != tuple(IMAGENET_MEAN)
    beta, eps, clip = cfg.model.loss_beta, cfg.model.whiten_eps, cfg.optim.clip_grad

    def run_step(images: torch.Tensor, labels: torch.Tensor, i: int) -> dict:
        # ToTensor + Normalize (host side in the official pipeline): float NCHW, separate ops
        x = images.contiguous().float().div_(255.0)
        x = (x - in_mean) / in_std
        for g, lr in zip(optimizer.param_groups, schedule(i)):
            g["lr"] = lr
        model.train()
        with torch.autocast("cuda", dtype=torch.float16) if cuda else contextlib.nullcontext():
            with torch.no_grad():
                xt = ((x * in_std + in_mean) - t_mean) / t_std if renorm else x
                if xt.shape[-1] != teacher.img_size:
                    xt = nn.functional.interpolate(xt, size=(teacher.img_size,) * 2, mode="bicubic",
                                                   align_corners=False)
                if teacher.fp16_weights:
                    xt = xt.half()
                target = whiten(teacher(xt), eps).detach()
            loss = fd_loss(run(x), target, beta)
        optimizer.zero_grad(set_to_none=False)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"),
                                                   foreach=False)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
            torch.cuda.synchronize()
            scaler.get_scale()
        else:
            optimizer.step()
        loss.item()  # the official loop logs every step
        return {"loss": loss.detach(), "grad_norm": grad_norm}

    notes = ["official-style: eager, explicit-softmax attention, single-tensor AdamW, per-step host sync"]
    if cuda:
        notes.append("fp16 autocast + GradScaler; CLIP teacher fp16 weights" if teacher.fp16_weights
                     else "fp16 autocast + GradScaler")
    else:
        notes.append("CPU: fp32 (fp16 autocast + GradScaler are CUDA-only here)")
    return Built("official", run_step, model, teacher, precision, notes)
