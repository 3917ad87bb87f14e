"""``model`` section: the student, the teacher, the objective and the weights a run starts from."""
from __future__ import annotations

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
    bf16: bool = False
    """Run the whole frozen teacher in bf16: weights, activations and the residual stream, with no
    autocast casts or fp32 LayerNorm round trips (only the whitening is fp32). Off by default: the
    default runs fp32 weights under the step's autocast. A speed option whose target fidelity
    (cosine with the default target) ``bench/throughput.py --mode teacher`` reports."""

    def __post_init__(self) -> None:
        for reserved in ("img_size", "num_classes", "pretrained"):
            need(reserved not in self.model_kwargs,
                 f"model.teacher.model_kwargs must not set {reserved!r}: "
                 + ("use model.teacher.img_size" if reserved == "img_size" else
                    "the teacher is always headless (num_classes=0) and loads model.teacher.weights itself"))
        need(self.weights != "", "model.teacher.weights is empty: give the release file's path, or 'random'")
        need(not (self.bf16 and self.fp16_weights),
             "model.teacher.bf16 and model.teacher.fp16_weights are two different teacher precisions: set one")


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
    attention: Literal["sdpa", "flex", "eager"] = "sdpa"
    """Student attention kernel with the relative position bias (models/attention.py)."""
    grad_checkpointing: bool = False
    """Recompute each student block's activations in the backward pass instead of storing them
    (timm's set_grad_checkpointing; the official TRAIN.USE_CHECKPOINT): less memory, ~30 % more compute,
    same loss and gradients."""

    def __post_init__(self) -> None:
        finite(self.whiten_eps, "model.whiten_eps")
        need(self.loss_beta > 0, f"model.loss_beta must be > 0, got {self.loss_beta}")
