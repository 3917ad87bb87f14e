"""The config schema: one ``kw_only`` dataclass per section, each checking itself in ``__post_init__``.

Sections: ``model`` (student, teacher, objective, weights to start from), ``data`` (what the loader
reads and how it crops), ``augment`` (on-device batch augmentation of fine-tuning), ``optim``,
``train`` (the loop), ``compile`` (torch.compile and the CUDA-graph teacher), ``checkpoint`` and
``log``. A check that involves two sections lives in :class:`FDConfig`. Every failure raises
:class:`~fdfast.errors.ConfigError` naming the key, the value and the fix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from ..errors import ConfigError

# Loader backends that run timm RandAugment per image (PIL in DataLoader workers). FFCV's numba
# pipeline, DALI's graph, nvJPEG and synthetic batches have none.
AUTO_AUGMENT_BACKENDS = ("torchvision",)


def need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _finite(value: float, key: str, *, low: float = 0.0) -> None:
    need(math.isfinite(value) and value >= low, f"{key} must be a finite number >= {low:g}, got {value}")


@dataclass(kw_only=True)
class StudentConfig:
    arch: Literal["beit", "swinv2"] = "beit"
    """Student family: BEiT-style ViT with a shared relative position bias, or SwinV2."""
    img_size: int = 224
    """Input resolution of the student (and of the teacher, unless teacher.img_size is set)."""
    patch_size: int = 16
    """ViT patch size (16 for B/16, 14 for L/14) or Swin patch size (4)."""
    embed_dim: int = 768
    """Token width (Swin: width of the first stage)."""
    depth: Union[int, list[int]] = 12
    """Blocks: an integer for the ViT, blocks per stage for Swin (e.g. [2, 2, 18, 2])."""
    num_heads: Union[int, list[int]] = 12
    """Attention heads: an integer for the ViT, heads per stage for Swin (e.g. [4, 8, 16, 32])."""
    window_size: int = 14
    """Swin window size."""
    mlp_ratio: float = 4.0
    """MLP hidden width / token width."""
    init_values: float = 0.1
    """ViT layer-scale init (gamma_1/gamma_2). Swin uses FD's 1e-5 res-post-norm init instead."""
    drop_path: float = 0.1
    """Stochastic depth, linear ramp from 0 to this value over the blocks."""
    shared_rel_pos_bias: bool = True
    """ViT: one relative position bias table shared by every block (FD's USE_SHARED_RPB)."""
    num_classes: int = 0
    """0 for distillation (features only); the class count for fine-tuning / probing."""

    def __post_init__(self) -> None:
        p = "model.student"
        need(self.img_size > 0 and self.patch_size > 0 and self.embed_dim > 0,
             f"{p}.img_size, patch_size and embed_dim must be > 0")
        need(0 <= self.drop_path < 1, f"{p}.drop_path must be in [0, 1), got {self.drop_path}")
        need(self.num_classes >= 0, f"{p}.num_classes must be >= 0, got {self.num_classes}")
        if self.arch == "beit":
            need(isinstance(self.depth, int) and isinstance(self.num_heads, int),
                 f"{p}.depth and num_heads are integers for arch 'beit' (lists are per Swin stage), got "
                 f"{self.depth} / {self.num_heads}")
            need(self.img_size % self.patch_size == 0,
                 f"{p}.img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
            need(self.embed_dim % self.num_heads == 0,
                 f"{p}.embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}")
        else:
            need(isinstance(self.depth, list) and isinstance(self.num_heads, list)
                 and len(self.depth) == len(self.num_heads) and len(self.depth) > 0,
                 f"{p}.depth and num_heads are per-stage lists of equal length for arch 'swinv2', got "
                 f"{self.depth} / {self.num_heads}")
            need(self.img_size % (self.patch_size * 2 ** (len(self.depth) - 1)) == 0,
                 f"{p}.img_size={self.img_size} must be divisible by patch_size*2^(stages-1)")

    @property
    def stages(self) -> list[int]:
        """Blocks per stage (a ViT is one stage of ``depth`` blocks)."""
        return list(self.depth) if isinstance(self.depth, list) else [self.depth]

    @property
    def num_blocks(self) -> int:
        return sum(self.stages)

    @property
    def num_tokens(self) -> int:
        """Tokens of the distillation output: patches + CLS (ViT) or the last stage's grid (Swin)."""
        if self.arch == "beit":
            return (self.img_size // self.patch_size) ** 2 + 1
        return (self.img_size // (self.patch_size * 2 ** (len(self.stages) - 1))) ** 2


@dataclass(kw_only=True)
class TeacherConfig:
    kind: Literal["clip", "dino", "deit", "esvit"] = "clip"
    """Which teacher: selects the release-file layout, the input normalisation and the token set."""
    model: str = "vit_base_patch16_clip_quickgelu_224"
    """timm model name of the teacher architecture."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm.create_model arguments (e.g. a tiny width for tests, window_size=14 for EsViT)."""
    weights: str = "random"
    """Path to the original release file (CLIP .pt, DINO .pth, DeiT .pth, EsViT .pth), or 'random'."""
    img_size: Optional[int] = None
    """Teacher input size; None = student.img_size. CLIP L/14 uses 224 with a 256 px student."""
    fp16_weights: bool = False
    """Keep the teacher's weights in fp16 as the official CLIP loader does (CUDA only)."""

    def __post_init__(self) -> None:
        for reserved in ("img_size", "num_classes", "pretrained"):
            need(reserved not in self.model_kwargs,
                 f"model.teacher.model_kwargs must not set {reserved!r}: "
                 + ("use model.teacher.img_size" if reserved == "img_size" else
                    "the teacher is always headless (num_classes=0) and loads model.teacher.weights itself"))
        need(self.weights != "", "model.teacher.weights is empty: give the release file's path, or 'random'")


@dataclass(kw_only=True)
class ModelConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    whiten_eps: float = 1e-5
    """eps of the non-affine LayerNorm that whitens the teacher's features."""
    loss_beta: float = 2.0
    """SmoothL1 beta."""
    pretrained: str = ""
    """Fine-tune / probe: distilled student file (fdfast checkpoint, official FD .pth, timm weights)."""
    trust_pickle: bool = False
    """Allow teacher / pretrained files that pickle classes beyond the known data-only ones (this runs
    code stored in the file: only for files from a source you trust)."""
    attention: Literal["sdpa", "flex", "eager"] = "sdpa"
    """Student attention kernel with the relative position bias (models/attention.py)."""

    def __post_init__(self) -> None:
        _finite(self.whiten_eps, "model.whiten_eps")
        need(self.loss_beta > 0, f"model.loss_beta must be > 0, got {self.loss_beta}")


@dataclass(kw_only=True)
class DataConfig:
    backend: Literal["synthetic", "torchvision", "ffcv", "dali", "nvjpeg"] = "synthetic"
    """Loader backend. All yield uint8 channels-last images on the device and int64 labels."""
    train: str = ""
    """Training set: ImageFolder directory (torchvision, dali, nvjpeg) or .beton file (ffcv)."""
    val: str = ""
    """Validation set, same kinds as `train`; empty = no evaluation."""
    num_classes: int = 1000
    """Number of classes (synthetic labels; fine-tune head)."""
    synthetic_size: int = 4096
    """Images per epoch of the synthetic backend."""
    min_scale: float = 0.08
    """RandomResizedCrop lower scale bound."""
    max_scale: float = 1.0
    """RandomResizedCrop upper scale bound."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    """Training crop interpolation (FD distillation: bilinear; fine-tuning: bicubic). FFCV always
    resizes with OpenCV's INTER_AREA and ignores it."""
    eval_resize: int = 256
    """Evaluation: resize the shorter side to this, then center-crop to the model size."""
    auto_augment: Optional[str] = None
    """timm RandAugment spec for fine-tuning, e.g. 'rand-m9-mstd0.5-inc1' (runs in the loader, per
    image; torchvision backend only); None = off."""
    num_workers: int = 8
    """Decoding workers / threads per process."""
    prefetch: int = 2
    """Batches prepared ahead of the step."""
    ffcv_order: Literal["random", "quasi_random"] = "random"
    """FFCV traversal order."""
    ffcv_os_cache: bool = True
    """FFCV: memory-map the .beton through the OS page cache."""
    dali_hw_decoder_load: float = 0.65
    """DALI: share of JPEG decoding sent to the hardware decoder (tune per card)."""

    def __post_init__(self) -> None:
        need(0 < self.min_scale <= self.max_scale <= 1.0,
             f"data.min_scale/max_scale must satisfy 0 < min <= max <= 1, got ({self.min_scale}, {self.max_scale})")
        need(self.num_classes > 0, f"data.num_classes must be > 0, got {self.num_classes}")
        need(self.synthetic_size > 0, f"data.synthetic_size must be > 0, got {self.synthetic_size}")
        need(self.eval_resize > 0, f"data.eval_resize must be > 0, got {self.eval_resize}")
        need(self.num_workers >= 0 and self.prefetch >= 1, "data.num_workers must be >= 0 and data.prefetch >= 1")
        need(0 <= self.dali_hw_decoder_load <= 1,
             f"data.dali_hw_decoder_load must be in [0, 1], got {self.dali_hw_decoder_load}")
        if self.backend != "synthetic":
            need(bool(self.train), f"data.backend={self.backend!r} needs data.train (an ImageFolder dir or "
                 ".beton file)")
        if self.backend == "ffcv":
            for key in ("train", "val"):
                path = getattr(self, key)
                need(not path or path.endswith(".beton"),
                     f"data.backend='ffcv' reads .beton files; data.{key}={path!r} is not one (build it with "
                     "fdfast-convert)")
        if self.auto_augment:
            self._check_auto_augment()

    def _check_auto_augment(self) -> None:
        aa = self.auto_augment
        if self.backend not in AUTO_AUGMENT_BACKENDS:
            why = {
                "ffcv": "FFCV's numba-compiled pipeline has no RandAugment operation",
                "dali": "the DALI graph here has no RandAugment",
                "synthetic": "synthetic batches are random pixels generated on the device, nothing is augmented",
                "nvjpeg": "the nvJPEG path decodes and crops on the GPU without RandAugment",
            }[self.backend]
            raise ConfigError(
                f"data.auto_augment={aa!r} (RandAugment) cannot run with data.backend={self.backend!r}: {why}. "
                f"Use data.backend={' or '.join(repr(b) for b in AUTO_AUGMENT_BACKENDS)} (ImageFolder "
                "data.train), or set data.auto_augment=null to train without RandAugment (not the official "
                "fine-tune recipe).")
        if not aa.startswith("rand"):
            raise ConfigError(f"data.auto_augment={aa!r}: only timm RandAugment specs are supported, e.g. "
                              "'rand-m9-mstd0.5-inc1' (the official fine-tune setting)")
        from timm.data.auto_augment import rand_augment_transform
        try:
            rand_augment_transform(aa, {"translate_const": 100, "img_mean": (124, 116, 104)})
        except Exception as e:  # timm raises assorted errors on malformed specs
            raise ConfigError(f"data.auto_augment={aa!r} is not a valid timm RandAugment spec ({e}); "
                              "example: 'rand-m9-mstd0.5-inc1'") from None


@dataclass(kw_only=True)
class AugmentConfig:
    """On-device batch augmentation of fine-tuning, in the official order: normalise -> random erasing
    (per image) -> mixup / cutmix (per batch) -> soft-target or label-smoothed CE."""

    re_prob: float = 0.0
    """Random erasing probability (per image, pixel mode, one box)."""
    mixup: float = 0.0
    """Mixup Beta alpha (fine-tuning: 0.8)."""
    cutmix: float = 0.0
    """CutMix Beta alpha (fine-tuning: 1.0)."""
    label_smoothing: float = 0.0
    """Label smoothing (fine-tuning: 0.1)."""

    def __post_init__(self) -> None:
        need(0 <= self.re_prob <= 1, f"augment.re_prob must be in [0, 1], got {self.re_prob}")
        need(self.mixup >= 0 and self.cutmix >= 0,
             f"augment.mixup={self.mixup} / augment.cutmix={self.cutmix} are Beta alphas and must be >= 0")
        need(0 <= self.label_smoothing < 1, f"augment.label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def mixing(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0


@dataclass(kw_only=True)
class OptimConfig:
    base_lr: float = 3e-4
    """Peak LR per 512 images; lr = base_lr * total_batch / 512 (total = per-device x world x accum)."""
    warmup_lr: float = 5e-7
    """LR at the start of warm-up, per 512 images (scaled like base_lr)."""
    min_lr: float = 5e-6
    """Final LR of the cosine, per 512 images (scaled like base_lr)."""
    warmup_epochs: float = 10
    """Linear warm-up length in epochs (converted to iterations)."""
    weight_decay: float = 0.05
    """AdamW weight decay for the decayed group."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: Optional[float] = 3.0
    """Global gradient-norm clip; None = off."""
    decay_rel_pos_bias: bool = True
    """Apply weight decay to the ViT relative position bias table (the official code does)."""
    layer_decay: float = 1.0
    """Layer-wise LR decay (fine-tuning); 1.0 = off."""
    fused: Optional[bool] = None
    """Fused AdamW; None = on when every parameter is on CUDA."""
    optimizer: Literal["adamw", "lars"] = "adamw"
    """adamw (distillation, fine-tuning) or lars (linear probe)."""

    def __post_init__(self) -> None:
        for key in ("base_lr", "warmup_lr", "min_lr", "warmup_epochs", "weight_decay"):
            _finite(getattr(self, key), f"optim.{key}")
        need(self.base_lr > 0, f"optim.base_lr must be > 0, got {self.base_lr}")
        need(self.clip_grad is None or (math.isfinite(self.clip_grad) and self.clip_grad > 0),
             f"optim.clip_grad must be > 0 (or null for no clipping), got {self.clip_grad}")
        need(0 < self.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             f"optim.betas needs two values in [0, 1), got {self.betas}")
        need(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")


@dataclass(kw_only=True)
class TrainConfig:
    task: Literal["distill", "finetune", "linprobe"] = "distill"
    """What to train."""
    epochs: int = 300
    """Training length in epochs."""
    batch_size: int = 128
    """Images per device per optimizer micro-step."""
    accum_steps: int = 1
    """Gradient accumulation micro-steps per optimizer step."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (the schedule still spans `epochs`); None = all."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU; fp16 = autocast + GradScaler (the official mode)."""
    seed: int = 0
    """Seed for init, data order and augmentation."""
    output_dir: str = "runs/fd"
    """Checkpoints, metrics.jsonl and the resolved config go here."""
    resume: bool = True
    """Resume automatically from the latest valid checkpoint in output_dir."""
    channels_last: bool = True
    """Run convolutions on channels-last memory."""
    tf32: bool = True
    """Allow TF32 for fp32 matmuls/convs on CUDA."""
    cudnn_benchmark: bool = True
    """Autotune conv algorithms (patch embedding), as the official recipe does."""
    eval_every: int = 1
    """Evaluate every N epochs (fine-tune / probe)."""
    eval_norm: Literal["imagenet", "clip"] = "imagenet"
    """Eval normalisation; 'clip' reproduces the official fine-tune eval (spec pitfall 1)."""
    probe_drop_path: bool = False
    """Linear probe: keep the backbone's drop path active, as the official code does."""

    def __post_init__(self) -> None:
        need(self.batch_size > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        need(self.accum_steps >= 1, f"train.accum_steps must be >= 1, got {self.accum_steps}")
        need(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, "train.max_steps must be >= 1 or null")
        need(self.eval_every >= 1, f"train.eval_every must be >= 1, got {self.eval_every}")
        need(bool(self.output_dir.strip()), "train.output_dir is empty: name the folder for checkpoints and logs")


@dataclass(kw_only=True)
class CompileConfig:
    """torch.compile of the student and the teacher target, and the teacher's CUDA graph."""

    enabled: bool = False
    """torch.compile the student (and the teacher target)."""
    scope: Literal["whole", "blocks"] = "whole"
    """One graph per model, or each transformer block separately (much faster compile, less fusion)."""
    mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode; CUDA graphs come from compile.cuda_graph_teacher, never from a mode (they must
    not nest inside the teacher's capture and are not safe for the student's backward + optimizer)."""
    cuda_graph_teacher: bool = False
    """Capture the teacher forward in a CUDA graph (CUDA only; distillation only)."""


@dataclass(kw_only=True)
class CheckpointConfig:
    every: int = 500
    """Save a resumable checkpoint every N optimizer steps (and always at the end)."""
    keep: int = 2
    """How many recent checkpoints to keep (>= 1)."""

    def __post_init__(self) -> None:
        need(self.every >= 1, f"checkpoint.every must be >= 1, got {self.every}")
        need(self.keep >= 1, f"checkpoint.keep must be >= 1 (the newest checkpoint is what a rerun resumes "
             f"from), got {self.keep}")


@dataclass(kw_only=True)
class LogConfig:
    every: int = 10
    """Read metrics from the device (a host sync) every N optimizer steps."""
    progress: Literal["auto", "rich", "plain", "none"] = "auto"
    """Progress display on rank 0: rich bar on a terminal, plain lines otherwise."""

    def __post_init__(self) -> None:
        need(self.every >= 1, f"log.every must be >= 1, got {self.every}")


@dataclass(kw_only=True)
class FDConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def __post_init__(self) -> None:
        """Checks that involve more than one section."""
        s, t, tr = self.model.student, self.model.teacher, self.train
        if tr.task == "distill":
            need(s.num_classes == 0, "model.student.num_classes must be 0 for train.task='distill'")
            # the loss is index-aligned, so both token grids must match; checked again on the built models
            need(not (s.arch == "beit" and t.kind == "esvit"),
                 "teacher kind 'esvit' (49 Swin tokens) needs model.student.arch='swinv2'")
            need(not (s.arch == "swinv2" and t.kind != "esvit"),
                 f"student arch 'swinv2' has no CLS token; teacher kind {t.kind!r} needs model.student.arch='beit'")
        else:
            need(s.num_classes > 0, f"train.task={tr.task!r} needs model.student.num_classes > 0")
            need(s.num_classes == self.data.num_classes,
                 f"model.student.num_classes={s.num_classes} but data.num_classes={self.data.num_classes}; the "
                 "classifier and the labels must agree: set both to the number of classes of data.train")
            need(not (self.augment.mixing and tr.batch_size % 2),
                 f"train.batch_size={tr.batch_size} is odd, but mixup/cutmix (augment.mixup={self.augment.mixup}, "
                 f"augment.cutmix={self.augment.cutmix}) pairs each image with its mirror in the batch (timm "
                 "Mixup, mode='batch') and needs an even per-device batch: make train.batch_size even")
        if tr.task == "linprobe":
            need(self.optim.optimizer == "lars", "train.task='linprobe' uses optim.optimizer='lars'")
            need(self.optim.layer_decay == 1.0,
                 f"optim.layer_decay={self.optim.layer_decay} has no effect in a linear probe (only the head "
                 "trains); set optim.layer_decay=1.0")
        if self.compile.cuda_graph_teacher:
            need(tr.task == "distill", "compile.cuda_graph_teacher only applies to train.task='distill'")
        need(not (self.model.attention == "flex" and s.arch != "beit"),
             "model.attention='flex' applies to the Beit (ViT) student; SwinV2's cosine attention has no flex "
             "path: use model.attention=sdpa")
