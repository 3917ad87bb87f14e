"""Fine-tuning a distilled student (spec §2) and the linear probe (spec §2.4).

:class:`FinetuneTask` builds the fine-tune student (``build_student(finetune=True)``: ViT with one
relative position bias table per block, mean pooling + ``fc_norm`` + head initialised x0.001; or SwinV2
+ head), loads the distilled weights of ``model.pretrained`` strictly (only the fresh head and
``fc_norm`` may be missing), and computes ``loss(images_uint8, labels)``: ImageNet normalisation,
random erasing and mixup/cutmix on the device (``augment`` section), then soft-target CE (mixup) or CE
with label smoothing. RandAugment runs earlier, in the loader (``data.auto_augment``).

:class:`ProbeTask` (official ``main_linear.py``, MoCo v3 / MAE recipe): every parameter frozen except
the head, which becomes ``Sequential(BatchNorm1d(D, affine=False, eps=1e-6), Linear)`` with the Linear
at trunc_normal(std=0.01); trained with LARS. The official code leaves the *whole* model in train
mode, so the frozen backbone still applies drop path while probing (spec pitfall 13). Here the
backbone runs in eval mode by default (features are a fixed function of the image, as a probe
intends) and ``train.probe_drop_path=true`` reproduces the official behaviour. The BN head is in
train mode either way, so it normalises with batch statistics and tracks running ones for evaluation.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, FDConfig
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..distributed import DistInfo
from ..interop.loading import load_student_weights
from ..logging import log
from ..models.student import build_student
from ..objective import normalize
from ..optim import param_groups
from ..parallelize import prepare_model, wrap_for_training
from ..resume import will_resume
from .base import Task
from .classes import resolve_num_classes
from .evaluation import Evaluator, StopCheck


def get_classifier(model: nn.Module, arch: str) -> nn.Module:
    """The class-score layer: ``head`` of timm Beit, ``head.fc`` of timm SwinV2 (its ``head`` also pools)."""
    return model.head if arch == "beit" else model.head.fc


def set_classifier(model: nn.Module, arch: str, layer: nn.Module) -> None:
    if arch == "beit":
        model.head = layer
    else:
        model.head.fc = layer


def resolve_pretrained(cfg: FDConfig, info: DistInfo) -> str:
    """The file/folder to load, or '' (from scratch, or resuming: the checkpoint has every weight)."""
    path = cfg.model.pretrained
    if will_resume(Path(cfg.train.output_dir), cfg.train.resume):
        # Resuming: the training checkpoint overwrites every weight, so the distilled file is not read
        # (and need not still exist).
        if info.is_main and path:
            log(f"resuming from a checkpoint: model.pretrained={path!r} is not read again")
        return ""
    if not path:
        if info.is_main:
            log("WARNING: model.pretrained is empty: training from random init, not from a distilled "
                "student. Set model.pretrained to a distillation run folder, checkpoint or weights file.")
        return ""
    if not Path(path).exists():
        raise ConfigError(f"model.pretrained={path!r} does not exist; point it at a distillation output_dir "
                          "(the newest complete checkpoint is used), a step_XXXXXXXX folder, an official FD "
                          ".pth or exported timm weights")
    return path


class BatchAugment:
    """uint8 batch -> (normalised, erased, mixed float batch, targets) on the device.

    Order as in the official pipeline: Normalize -> RandomErasing (per image, in timm's transform)
    -> Mixup/CutMix (per batch, in the training loop). Random erasing fills with N(0, 1) noise, which
    is why it must run after normalisation. Randomness: python ``random`` (erasing), numpy (mixup
    lambda / switch) and torch (erasing noise), all seeded per rank and saved in checkpoints by the
    trainer, so a resumed run draws the same values.
    """

    def __init__(self, cfg: FDConfig, device: torch.device):
        aug = cfg.augment
        self.erase = None
        if aug.re_prob > 0:
            from timm.data.random_erasing import RandomErasing
            self.erase = RandomErasing(probability=aug.re_prob, mode="pixel", max_count=1, device=device)
        self.mixup = None
        if aug.mixing:
            from timm.data.mixup import Mixup
            self.mixup = Mixup(mixup_alpha=aug.mixup, cutmix_alpha=aug.cutmix, prob=1.0, switch_prob=0.5,
                               mode="batch", label_smoothing=aug.label_smoothing,
                               num_classes=cfg.model.student.num_classes)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
        if self.erase is not None:
            x = self.erase(x)
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise ValueError(f"mixup/cutmix got an odd batch of {x.shape[0]} images; use an even "
                                 "train.batch_size")
            x, labels = self.mixup(x, labels)  # labels -> (B, C) soft targets, smoothing included
        return x, labels


class FinetuneTask(Task):
    """Fine-tune a distilled student (whole network trains, layer-wise LR decay)."""

    probe = False

    def __init__(self, cfg: FDConfig, info: DistInfo, *, trust_pickle: bool = False):
        cfg = resolve_num_classes(cfg) if not cfg.model.student.num_classes else cfg  # the trainer resolves first
        s = cfg.model.student
        self.cfg, self.info = cfg, info
        model = build_student(s, finetune=True)
        self.extra = {"pretrained": "", "pretrained_layout": "", "pretrained_tensors": 0}
        path = resolve_pretrained(cfg, info)
        if path:
            # Strict: anything missing besides the fresh classifier (and the ViT's fresh fc_norm) is an
            # error, unlike the official load_state_dict(strict=False) (spec pitfall 7).
            report = load_student_weights(model, path, arch=s.arch, expected_missing=("head.", "fc_norm."),
                                          trust_pickle=trust_pickle)
            if info.is_main:
                log(report.summary())
            self.extra = {"pretrained": str(path), "pretrained_layout": report.layout,
                          "pretrained_tensors": report.loaded}
        self.setup_head(model)
        self.model = prepare_model(model, cfg, info)  # flex attention: Beit only (refused for SwinV2 by config)
        self.set_train_mode()
        self.groups = param_groups(self.model, cfg.optim, s)
        if not self.groups:
            raise RuntimeError("the model has no trainable parameters")
        self.train_model = wrap_for_training(self.model, cfg, info)
        self.augment = BatchAugment(cfg, info.device)
        self.evaluator = Evaluator(self.model, cfg, info, self.set_train_mode) if cfg.data.val else None
        self.eval_every = cfg.train.eval_every
        if info.is_main:
            self.describe()

    def setup_head(self, model: nn.Module) -> None:
        """Fine-tuning keeps the fresh head of ``build_student``; the probe replaces it."""

    def set_train_mode(self) -> None:
        self.model.train()

    def describe(self) -> None:
        cfg, s = self.cfg, self.cfg.model.student
        n_train = sum(p.numel() for g in self.groups for p in g["params"])
        a = cfg.augment
        log(f"{cfg.train.task}: {s.arch} with {s.num_classes} classes, {n_train:,} trainable parameters in "
            f"{len(self.groups)} groups, mixup={a.mixup} cutmix={a.cutmix} smoothing={a.label_smoothing} "
            f"re_prob={a.re_prob} auto_augment={cfg.data.auto_augment} eval_norm={cfg.train.eval_norm}"
            + (f" probe_drop_path={cfg.train.probe_drop_path}" if self.probe else "")
            + ("" if self.evaluator else " (no data.val: no evaluation)"))

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, target = self.augment(images, labels)
        logits = self.train_model(x).float()  # the loss in fp32 whatever the autocast dtype
        if target.ndim == 2:  # soft targets from mixup: timm SoftTargetCrossEntropy
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=self.cfg.augment.label_smoothing)

    @property
    def can_evaluate(self) -> bool:
        return self.evaluator is not None

    def evaluate(self, should_stop: Optional[StopCheck] = None) -> dict:
        return self.evaluator(should_stop)

    def state_dict(self) -> dict:
        return dict(self.extra)

    def load_state_dict(self, state: dict) -> None:
        self.extra.update(state)


class ProbeTask(FinetuneTask):
    """Linear probe: frozen backbone, non-affine BN + Linear head, LARS (see the module docstring)."""

    probe = True

    def setup_head(self, model: nn.Module) -> None:
        arch = self.cfg.model.student.arch
        linear = get_classifier(model, arch)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected a Linear classifier, found {type(linear).__name__}")
        nn.init.trunc_normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)
        set_classifier(model, arch, self.head)
        trainable = {id(p) for p in self.head.parameters()}
        for p in model.parameters():  # official main_linear: everything frozen but the head
            p.requires_grad_(id(p) in trainable)

    def set_train_mode(self) -> None:
        self.model.train()
        if not self.cfg.train.probe_drop_path:
            # frozen backbone as a fixed feature extractor (no drop path); the BN head keeps train mode
            self.model.eval()
            self.head.train()
