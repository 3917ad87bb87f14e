"""Fine-tuning and linear probing of a distilled student (spec §2), as a ``Task`` for the trainer.

``build_finetune_task(cfg, info)`` builds, for ``train.task`` in (finetune, linprobe):

* the fine-tune student (``build_student(finetune=True)``: ViT with one relative position bias table
  per block, mean pooling + ``fc_norm`` + head initialised x0.001; or SwinV2 + head), with the distilled
  weights of ``model.pretrained`` loaded strictly through ``fdfast.models.interop`` (only the fresh head
  and ``fc_norm`` may be missing);
* ``loss_fn(images_uint8, labels)``: ImageNet normalisation, random erasing and mixup/cutmix on the
  device, then soft-target CE (mixup) or CE with label smoothing. RandAugment runs earlier, in the
  loader backend (only the torchvision backend implements it; see ``check_augment_backend``);
* ``evaluate()``: resize 256 (bicubic) + center crop, fp32 without autocast as the official
  ``validate``, top-1 / top-5 counted exactly over the whole validation set (see ``EvalCounts``).

Linear probe (official ``main_linear.py``, MoCo v3 / MAE recipe): every parameter frozen except the
head, which becomes ``Sequential(BatchNorm1d(D, affine=False, eps=1e-6), Linear)`` with the Linear at
trunc_normal(std=0.01); trained with LARS. The official code leaves the *whole* model in train mode, so
the frozen backbone still applies drop path while probing (spec pitfall 13). Here the backbone runs in
eval mode by default (no drop path / dropout: features are a fixed function of the image, as a probe
intends) and ``train.probe_drop_path=true`` reproduces the official behaviour. The BN head is in train
mode either way, so it normalises with batch statistics and tracks running ones for evaluation.

Evaluation normalisation: training uses ImageNet mean/std, but the official validation transform
normalises with CLIP's mean/std (spec pitfall 1; inputs scaled by ~0.85). ``train.eval_norm`` picks:
``imagenet`` (default, consistent with training) or ``clip`` (the official numbers).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import pipelines
from pipelines.base import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD

from . import checkpoint as ckpt
from .config import ConfigError, FDConfig
from .distributed import DistInfo, all_reduce_sum
from .logging import log
from .models.student import build_student
from .objective import normalize
from .optim import param_groups

# Loader backends that apply data.auto_augment (RandAugment) per image before batching.
# torchvision: PIL + timm's rand_augment_transform in the DataLoader workers. FFCV's numba pipeline
# and the nvJPEG / synthetic paths have no RandAugment. DALI has nvidia.dali.auto_aug.rand_augment,
# but only counts once pipelines/dali.py declares ``SUPPORTS_AUTO_AUGMENT = True``.
_AUTO_AUGMENT_BACKENDS = ("torchvision",)
_OPT_IN_BACKENDS = ("dali",)


# ----------------------------------------------------------------------------------------------
# Config checks specific to fine-tuning
# ----------------------------------------------------------------------------------------------
def _backend_declares_auto_augment(backend: str) -> bool:
    module_name = pipelines.BACKENDS[backend][0]
    try:
        module = importlib.import_module(module_name)
    except ImportError:  # not written yet, or its library is missing: it cannot augment either way
        return False
    return bool(getattr(module, "SUPPORTS_AUTO_AUGMENT", False))


def supports_auto_augment(backend: str) -> bool:
    if backend in _AUTO_AUGMENT_BACKENDS:
        return True
    if backend in _OPT_IN_BACKENDS:
        return _backend_declares_auto_augment(backend)
    return False


def check_augment_backend(cfg: FDConfig) -> None:
    """Refuse a RandAugment config the loader backend would silently skip, and bad RandAugment specs."""
    aa, backend = cfg.data.auto_augment, cfg.data.backend
    if not aa:
        return
    if not supports_auto_augment(backend):
        able = [b for b in pipelines.BACKENDS if supports_auto_augment(b)]
        why = {
            "ffcv": "FFCV's numba-compiled pipeline has no RandAugment operation",
            "dali": "pipelines/dali.py does not implement it (it does not set SUPPORTS_AUTO_AUGMENT = True)",
            "synthetic": "synthetic batches are random pixels generated on the device, nothing is augmented",
            "nvjpeg": "the nvJPEG path decodes and crops on the GPU without RandAugment",
        }.get(backend, "this backend does not implement it")
        raise ConfigError(
            f"data.auto_augment={aa!r} (RandAugment) cannot run with data.backend={backend!r}: {why}. "
            f"Use data.backend={' or '.join(repr(b) for b in able)} (ImageFolder data.train), or set "
            "data.auto_augment=null to fine-tune without RandAugment (not the official recipe).")
    if not aa.startswith("rand"):
        raise ConfigError(f"data.auto_augment={aa!r}: only timm RandAugment specs are supported, e.g. "
                          "'rand-m9-mstd0.5-inc1' (the official fine-tune setting)")
    from timm.data.auto_augment import rand_augment_transform  # noqa: PLC0415
    try:
        rand_augment_transform(aa, {"translate_const": 100, "img_mean": (124, 116, 104)})
    except Exception as e:  # timm raises assorted errors on malformed specs
        raise ConfigError(f"data.auto_augment={aa!r} is not a valid timm RandAugment spec ({e}); "
                          "example: 'rand-m9-mstd0.5-inc1'") from None


def check_finetune_config(cfg: FDConfig) -> None:
    tr, s = cfg.train, cfg.model.student
    if tr.task not in ("finetune", "linprobe"):
        raise ConfigError(f"build_finetune_task handles train.task finetune/linprobe, got {tr.task!r}")
    if s.num_classes != cfg.data.num_classes:
        raise ConfigError(
            f"model.student.num_classes={s.num_classes} but data.num_classes={cfg.data.num_classes}; the "
            "classifier and the labels must agree: set both to the number of classes of data.train")
    if mixup_active(cfg) and tr.batch_size % 2:
        raise ConfigError(
            f"train.batch_size={tr.batch_size} is odd, but mixup/cutmix (train.mixup={tr.mixup}, "
            f"train.cutmix={tr.cutmix}) pairs each image with its mirror in the batch (timm Mixup, "
            "mode='batch') and needs an even per-device batch: make train.batch_size even")
    if tr.mixup < 0 or tr.cutmix < 0:
        raise ConfigError(f"train.mixup={tr.mixup} / train.cutmix={tr.cutmix} are Beta alphas and must be >= 0")
    if not 0 <= tr.label_smoothing < 1:
        raise ConfigError(f"train.label_smoothing must be in [0, 1), got {tr.label_smoothing}")
    if tr.eval_every < 1:
        raise ConfigError(f"train.eval_every must be >= 1, got {tr.eval_every}")
    if tr.task == "linprobe" and cfg.optim.layer_decay != 1.0:
        raise ConfigError(f"optim.layer_decay={cfg.optim.layer_decay} has no effect in a linear probe (only "
                          "the head trains); set optim.layer_decay=1.0")
    check_augment_backend(cfg)


def mixup_active(cfg: FDConfig) -> bool:
    return cfg.train.mixup > 0 or cfg.train.cutmix > 0


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
def get_classifier(model: nn.Module, arch: str) -> nn.Module:
    """The class-score layer: ``head`` of timm Beit, ``head.fc`` of timm SwinV2 (its ``head`` also
    pools)."""
    return model.head if arch == "beit" else model.head.fc


def set_classifier(model: nn.Module, arch: str, layer: nn.Module) -> None:
    if arch == "beit":
        model.head = layer
    else:
        model.head.fc = layer


def make_probe_head(model: nn.Module, arch: str) -> nn.Module:
    """Official linear-probe head (MAE / MoCo v3): non-affine BN on the pooled features, then the
    Linear with weight trunc_normal(std=0.01) and bias 0. Replaces the classifier in place."""
    linear = get_classifier(model, arch)
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected a Linear classifier, found {type(linear).__name__}")
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    head = nn.Sequential(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)
    set_classifier(model, arch, head)
    return head


def resolve_pretrained(cfg: FDConfig, info: DistInfo) -> str:
    """The file/folder to load, or '' (from scratch, or resuming: the checkpoint has every weight)."""
    path = cfg.model.pretrained
    latest = ckpt.find_latest(cfg.train.output_dir, info.world_size) if cfg.train.resume else None
    if latest is not None:
        # Resuming: the training checkpoint overwrites every weight, so the distilled file is not read
        # (and need not still exist).
        if info.is_main and path:
            log(f"resuming from {latest}: model.pretrained={path!r} is not read again")
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


def load_pretrained(model: nn.Module, path: str, arch: str, info: DistInfo, trust_pickle: bool = False) -> dict:
    from .models.interop import load_student_weights  # noqa: PLC0415

    # Strict: anything missing besides the fresh classifier (and the ViT's fresh fc_norm) is an error,
    # unlike the official load_state_dict(strict=False) (spec pitfall 7).
    report = load_student_weights(model, path, arch=arch, expected_missing=("head.", "fc_norm."),
                                  trust_pickle=trust_pickle)
    if info.is_main:
        log(report.summary())
    return {"pretrained": str(path), "pretrained_layout": report.layout, "pretrained_tensors": report.loaded}


# ----------------------------------------------------------------------------------------------
# Training loss: on-device batch augmentation + criterion
# ----------------------------------------------------------------------------------------------
class BatchAugment:
    """uint8 batch -> (normalised, erased, mixed float batch, targets) on the device.

    Order as in the official pipeline: Normalize -> RandomErasing (per image, in timm's transform)
    -> Mixup/CutMix (per batch, in the training loop). Random erasing fills with N(0, 1) noise, which
    is why it must run after normalisation. Randomness: python ``random`` (erasing), numpy (mixup
    lambda / switch) and torch (erasing noise), all seeded per rank and saved in checkpoints by the
    trainer, so a resumed run draws the same values.
    """

    def __init__(self, cfg: FDConfig, device: torch.device):
        tr = cfg.train
        self.num_classes = cfg.model.student.num_classes
        self.erase = None
        if cfg.data.re_prob > 0:
            from timm.data.random_erasing import RandomErasing  # noqa: PLC0415
            self.erase = RandomErasing(probability=cfg.data.re_prob, mode="pixel", max_count=1, device=device)
        self.mixup = None
        if mixup_active(cfg):
            from timm.data.mixup import Mixup  # noqa: PLC0415
            self.mixup = Mixup(mixup_alpha=tr.mixup, cutmix_alpha=tr.cutmix, prob=1.0, switch_prob=0.5,
                               mode="batch", label_smoothing=tr.label_smoothing, num_classes=self.num_classes)

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


def make_loss_fn(run: nn.Module, augment: BatchAugment, label_smoothing: float) -> Callable:
    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, target = augment(images, labels)
        logits = run(x).float()  # the loss in fp32 whatever the autocast dtype
        if target.ndim == 2:  # soft targets from mixup: timm SoftTargetCrossEntropy
            return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)

    return loss_fn


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------
def eval_counts(logits: torch.Tensor, labels: torch.Tensor, topk: int = 5) -> torch.Tensor:
    """float64 ``[top-1 hits, top-k hits, summed CE loss, valid images]`` of one batch.

    Entries with label -1 (the padding eval loaders add so that every rank has equal batches) count
    nowhere. Sums, not per-batch means: the official code averages per-batch accuracies across ranks
    (spec pitfall 12), which weights a short last batch like a full one.
    """
    logits = logits.float()
    valid = labels >= 0
    target = labels.clamp(min=0)
    k = min(topk, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(target[:, None]) & valid[:, None]
    loss = F.cross_entropy(logits, target, reduction="none") * valid
    return torch.stack([hits[:, 0].sum().double(), hits.any(dim=1).sum().double(), loss.sum().double(),
                        valid.sum().double()])


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    count: int

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count}


def summarize_counts(sums: torch.Tensor) -> EvalResult:
    c1, c5, loss, n = (float(v) for v in sums.cpu())
    if n <= 0:
        raise RuntimeError("evaluation saw no labelled image: is data.val empty?")
    return EvalResult(top1=100.0 * c1 / n, top5=100.0 * c5 / n, loss=loss / n, count=int(round(n)))


class Evaluator:
    """``evaluate()`` of the task. Builds the eval loader once (failing at build time, not after the
    first epoch, when data.val is wrong) and restores the training mode afterwards."""

    def __init__(self, model: nn.Module, cfg: FDConfig, info: DistInfo, restore_mode: Callable[[], None]):
        self.model, self.cfg, self.info, self.restore_mode = model, cfg, info, restore_mode
        self.batch_size = cfg.train.batch_size
        self.loader = pipelines.build_loader(
            cfg.data, train=False, batch_size=self.batch_size, img_size=cfg.model.student.img_size,
            device=info.device, rank=info.rank, world_size=info.world_size, seed=cfg.train.seed)
        classes = getattr(self.loader, "classes", None)
        if classes is not None and len(classes) > cfg.model.student.num_classes:
            raise ConfigError(f"data.val={cfg.data.val!r} has {len(classes)} classes but "
                              f"model.student.num_classes={cfg.model.student.num_classes}")
        if cfg.train.eval_norm == "clip":
            self.mean, self.std = CLIP_MEAN, CLIP_STD  # the official eval transform (spec pitfall 1)
        else:
            self.mean, self.std = IMAGENET_MEAN, IMAGENET_STD
        # The eager module by default. With train.compile: compile_scope 'blocks' compiled the blocks
        # in place, so the plain module already runs them compiled; 'whole' gets a separately compiled
        # view of the same weights (the training one sits inside DDP). Either way batches keep one
        # fixed size (the short last batch is padded with label -1), so the eval graph compiles once
        # (compile uses dynamic=False).
        self.forward = model
        if cfg.train.compile and cfg.train.compile_scope == "whole":
            from .fast import compile_module  # noqa: PLC0415 - GPU-path module, imported on demand
            self.forward = compile_module(model, cfg)
        self.pad = cfg.train.compile

    def _batches(self):
        for images, labels in self.loader:
            n = images.shape[0]
            if self.pad and n < self.batch_size:
                extra = self.batch_size - n
                images = torch.cat([images, images[:1].expand(extra, -1, -1, -1)]).contiguous(
                    memory_format=torch.channels_last)
                labels = torch.cat([labels, labels.new_full((extra,), -1)])
            yield images, labels

    @torch.no_grad()
    def __call__(self) -> dict:
        dev = self.info.device
        sums = torch.zeros(4, dtype=torch.float64, device=dev)
        self.model.eval()
        # The eval pass must not move the training RNG streams (DataLoader iterators draw a seed from
        # the global torch generator), or a run resumed after an eval would diverge from one without.
        fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] \
            if dev.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=fork_devices), torch.autocast(dev.type, enabled=False):
                self.loader.set_epoch(0)
                for images, labels in self._batches():
                    # fp32, no autocast: the official validate() runs without AMP
                    logits = self.forward(normalize(images, self.mean, self.std))
                    sums += eval_counts(logits, labels)
        finally:
            self.restore_mode()
        all_reduce_sum(sums)  # exact totals over every rank; nothing averaged per batch or per rank
        return summarize_counts(sums).as_dict()


# ----------------------------------------------------------------------------------------------
# The task
# ----------------------------------------------------------------------------------------------
def build_finetune_task(cfg: FDConfig, info: DistInfo):
    from .trainer import Task, prepare_model, wrap_for_training  # noqa: PLC0415 - trainer imports us lazily

    check_finetune_config(cfg)
    s = cfg.model.student
    probe = cfg.train.task == "linprobe"
    model = build_student(s, finetune=True)

    extra: dict = {"pretrained": "", "pretrained_layout": "", "pretrained_tensors": 0}
    path = resolve_pretrained(cfg, info)
    if path:
        extra = load_pretrained(model, path, s.arch, info, cfg.model.pretrained_trust_pickle)

    if probe:
        head = make_probe_head(model, s.arch)
        trainable = {id(p) for p in head.parameters()}
        for p in model.parameters():  # official main_linear: everything frozen but the head
            p.requires_grad_(id(p) in trainable)
    model = prepare_model(model, cfg, info)  # flex attention: Beit only, refused with a message for SwinV2

    def set_train_mode() -> None:
        model.train()
        if probe and not cfg.train.probe_drop_path:
            # frozen backbone as a fixed feature extractor (no drop path); the BN head keeps train mode
            model.eval()
            head.train()

    set_train_mode()
    groups = param_groups(model, cfg.optim, s)
    if not groups:
        raise RuntimeError("the model has no trainable parameters")
    run = wrap_for_training(model, cfg, info)
    loss_fn = make_loss_fn(run, BatchAugment(cfg, info.device), cfg.train.label_smoothing)
    evaluate = Evaluator(model, cfg, info, set_train_mode) if cfg.data.val else None
    if info.is_main:
        n_train = sum(p.numel() for g in groups for p in g["params"])
        log(f"{cfg.train.task}: {s.arch} with {s.num_classes} classes, {n_train:,} trainable parameters in "
            f"{len(groups)} groups, mixup={cfg.train.mixup} cutmix={cfg.train.cutmix} "
            f"smoothing={cfg.train.label_smoothing} re_prob={cfg.data.re_prob} "
            f"auto_augment={cfg.data.auto_augment} eval_norm={cfg.train.eval_norm}"
            + (f" probe_drop_path={cfg.train.probe_drop_path}" if probe else "")
            + ("" if evaluate else " (no data.val: no evaluation)"))
    return Task(model=model, train_model=run, loss_fn=loss_fn, groups=groups,
                evaluate=evaluate, extra_state=extra)


__all__ = ["BatchAugment", "EvalResult", "Evaluator", "build_finetune_task", "check_augment_backend",
           "check_finetune_config", "eval_counts", "get_classifier", "make_loss_fn", "make_probe_head",
           "mixup_active", "summarize_counts", "supports_auto_augment"]
