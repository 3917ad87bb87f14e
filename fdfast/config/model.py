"""``model`` section: the student, the teacher, the objective and the weights a run starts from."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from .checks import finite, need


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
    def has_cls(self) -> bool:
        """The distillation output starts with a CLS token (ViT), or is the last stage's grid only (Swin)."""
        return self.arch == "beit"

    @property
    def grid(self) -> int:
        """Side of the distillation output's patch grid."""
        if self.arch == "beit":
            return self.img_size // self.patch_size
        return self.img_size // (self.patch_size * 2 ** (len(self.stages) - 1))

    @property
    def num_tokens(self) -> int:
        """Tokens of the distillation output: patches + CLS (ViT) or the last stage's grid (Swin)."""
        return self.grid ** 2 + int(self.has_cls)


@dataclass(kw_only=True)
class TeacherConfig:
    kind: Literal["clip", "dino", "deit", "esvit", "timm"] = "clip"
    """FD's four release files (clip, dino, deit, esvit: their layout and normalisation), or 'timm': any timm
    ViT-family model (VisionTransformer, Eva, Swin) from a timm/Hugging Face folder, a hub-cache folder, a
    safetensors/.bin/.pth file or an original release timm's checkpoint_filter_fn converts."""
    model: str = "vit_base_patch16_clip_quickgelu_224"
    """timm model name of the teacher architecture; for kind 'timm' with its pretrained tag
    (e.g. 'vit_large_patch14_clip_224.openai'), which sets the normalisation."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm.create_model arguments (e.g. a tiny width for tests, window_size=14 for EsViT)."""
    weights: str = "random"
    """The weights: a release file (CLIP .pt, DINO .pth, DeiT .pth, EsViT .pth); for kind 'timm' also a
    folder (config.json + model.safetensors), a hub cache; or 'random'."""
    img_size: Optional[int] = None
    """Teacher input size; None = from model.teacher.grid (resize_input: the student's grid x the teacher's
    patch, e.g. 196 px for a patch-14 teacher under a 224 px patch-16 student; resize_features: the student's
    img_size)."""
    mean: Optional[list[float]] = None
    """Pixel mean of the teacher's normalisation; None = the kind's (CLIP / ImageNet), for kind 'timm' the
    folder's config.json or the model's pretrained_cfg."""
    std: Optional[list[float]] = None
    """Pixel std of the teacher's normalisation; None as for mean."""
    tokens: Literal["no_registers", "all", "patches"] = "no_registers"
    """Target tokens: CLS (if the teacher has one) + patches, registers dropped; all (every output token);
    patches (no CLS: the student's CLS token leaves the loss)."""
    grid: Literal["resize_input", "resize_features"] = "resize_input"
    """When the teacher's patch grid differs from the student's: resize the teacher's input so that they
    match, or run it at img_size and resize its patch-token map to the student's grid (bilinear)."""
    fp16_weights: bool = False
    """Keep the teacher's weights in fp16 as the official CLIP loader does (CUDA only)."""
    bf16: bool = False
    """Run the whole frozen teacher in bf16: weights, activations and the residual stream, with no
    autocast casts or fp32 LayerNorm round trips (only the whitening is fp32). Off by default: the
    default runs fp32 weights under the step's autocast. A speed option whose target fidelity
    (cosine with the default target) ``bench/throughput.py --mode teacher`` reports."""

    @property
    def key(self) -> str:
        """Where this teacher sits in the config, for messages: ``model.teacher``."""
        return "model.teacher"

    def __post_init__(self) -> None:
        p = self.key
        for reserved in ("img_size", "num_classes", "pretrained"):
            need(reserved not in self.model_kwargs,
                 f"{p}.model_kwargs must not set {reserved!r}: "
                 + (f"use {p}.img_size" if reserved == "img_size" else
                    f"the teacher is always headless (num_classes=0) and loads {p}.weights itself"))
        need(self.weights != "", f"{p}.weights is empty: give the release file's path, or 'random'")
        need(not (self.bf16 and self.fp16_weights),
             f"{p}.bf16 and {p}.fp16_weights are two different teacher precisions: set one")
        for key in ("mean", "std"):
            value = getattr(self, key)
            need(value is None or (len(value) == 3 and all(math.isfinite(v) for v in value)),
                 f"{p}.{key}={value} must be three finite numbers (R, G, B in [0, 1] units)")
        need(self.std is None or min(self.std) > 0, f"{p}.std={self.std} must be > 0")


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(kw_only=True)
class TeacherEntry(TeacherConfig):
    """One teacher of ``model.teachers``: every field of ``model.teacher``, plus its name, loss weight, head and
    whitening."""
    name: str = ""
    """Names the head (``heads.<name>`` in checkpoints), the logged loss (``loss_<name>``) and the override key
    (``model.teachers.<name>.weights=...``): a letter, then letters, digits or '_'."""
    weight: float = 1.0
    """Weight of this teacher's SmoothL1 in the total loss."""
    head: Literal["linear", "mlp"] = "linear"
    """Projector from the student's tokens to this teacher's width: FD's linear layer, or a 2-layer MLP
    (``fdfast.models.heads.MLPHead``)."""
    whiten: Literal["layernorm", "phi_s"] = "layernorm"
    """Standardisation of this teacher's tokens: FD's per-token non-affine LayerNorm, or PHI-S (one affine
    map estimated from the first model.phi_s_batches batches; ``fdfast.models.phi_s``)."""

    @property
    def key(self) -> str:
        return f"model.teachers.{self.name}"

    def __post_init__(self) -> None:
        need(bool(_NAME.fullmatch(self.name)),
             f"model.teachers: name={self.name!r} must start with a letter and hold only letters, digits and "
             "'_' (it names the head, the logged loss_<name> and the override model.teachers.<name>.KEY)")
        super().__post_init__()
        need(math.isfinite(self.weight) and self.weight > 0,
             f"{self.key}.weight={self.weight} must be a finite number > 0")


@dataclass(kw_only=True)
class ModelConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: list[TeacherEntry] = field(default_factory=list)
    """Several teachers at once, instead of model.teacher: each entry has model.teacher's fields plus name,
    weight, head and whiten; the loss is the weighted sum of one FD loss per teacher."""
    phi_s_batches: int = 16
    """PHI-S teachers (whiten: phi_s): batches per rank whose teacher tokens estimate the statistics at the start
    of a run (all ranks' batches together; a resumed run reads them from its checkpoint)."""
    whiten_eps: float = 1e-5
    """eps of the non-affine LayerNorm that whitens the teacher's features."""
    loss_beta: float = 2.0
    """SmoothL1 beta."""
    pretrained: str = ""
    """Fine-tune / probe: distilled student file (fdfast checkpoint, official FD .pth, timm weights)."""
    attention: Literal["sdpa", "flex", "eager"] = "sdpa"
    """Student attention kernel with the relative position bias (models/attention.py)."""
    grad_checkpointing: bool = False
    """Recompute each student block's activations in the backward pass instead of storing them
    (timm's set_grad_checkpointing; the official TRAIN.USE_CHECKPOINT): less memory, ~30 % more compute,
    same loss and gradients."""

    def __post_init__(self) -> None:
        finite(self.whiten_eps, "model.whiten_eps")
        need(self.loss_beta > 0, f"model.loss_beta must be > 0, got {self.loss_beta}")
        need(self.phi_s_batches >= 1, f"model.phi_s_batches must be >= 1, got {self.phi_s_batches}")
        if self.teachers:
            # the resolved config of a run holds both keys: model.teacher at its defaults means "not set"
            need(self.teacher == TeacherConfig(),
                 "model.teacher and model.teachers are both set: distil from one teacher (model.teacher) or from "
                 "the list model.teachers; move model.teacher's settings into an entry of model.teachers")
            names = [t.name for t in self.teachers]
            for name in names:
                need(names.count(name) == 1,
                     f"model.teachers: the name {name!r} is used more than once: give every teacher its own name")

    @property
    def teacher_configs(self) -> list[TeacherConfig]:
        """The teachers of a run: the entries of model.teachers, else model.teacher alone."""
        return list(self.teachers) or [self.teacher]
