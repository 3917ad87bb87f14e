"""How a run trains: ``optim``, ``train`` (the loop), ``compile``, ``checkpoint`` and ``log``."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from .checks import finite, need


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
            finite(getattr(self, key), f"optim.{key}")
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
    """Gradient accumulation: micro-batches of batch_size per optimizer step (total batch = batch_size x
    world size x accum_steps, which scales the LR). The LR schedule counts micro-batches, as the official
    one does: warm-up and cosine span the loader's micro-batches, and optimizer step k runs at micro-batch
    k x accum_steps - 1 (the last one of the step before)."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (the schedule still spans `epochs`); None = all."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU; fp16 = autocast + GradScaler (the official mode)."""
    seed: int = 0
    """Seed for init, data order and augmentation."""
    output_dir: str = "runs/fd"
    """Checkpoints, metrics.jsonl and the resolved config go here."""
    resume: Union[bool, str] = True
    """true: continue from the newest valid checkpoint in output_dir; false: start fresh; a path (a
    step_XXXXXXXX folder or a run folder): start from it when output_dir has no checkpoint yet."""
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
    knn_every: int = 0
    """Distillation: weighted k-NN accuracy of the student's features every N epochs and at the last step
    (data.knn_train classifies data.val); 0 = off."""
    knn_k: int = 20
    """k-NN monitor: neighbours that vote (DINO: 20)."""
    knn_temperature: float = 0.07
    """k-NN monitor: a neighbour's vote is exp(cosine similarity / T) (DINO: 0.07)."""
    knn_feature: Literal["cls", "mean"] = "cls"
    """k-NN monitor: the final-norm CLS token, or the mean of the patch tokens (SwinV2 has no CLS)."""

    def __post_init__(self) -> None:
        need(self.batch_size > 0, f"train.batch_size must be > 0, got {self.batch_size}")
        need(self.accum_steps >= 1, f"train.accum_steps must be >= 1, got {self.accum_steps}")
        need(self.epochs >= 1, f"train.epochs must be >= 1, got {self.epochs}")
        need(self.max_steps is None or self.max_steps >= 1, "train.max_steps must be >= 1 or null")
        need(self.eval_every >= 1, f"train.eval_every must be >= 1, got {self.eval_every}")
        need(self.knn_every >= 0, f"train.knn_every must be >= 0 (0 = no k-NN monitor), got {self.knn_every}")
        need(self.knn_k >= 1, f"train.knn_k must be >= 1, got {self.knn_k}")
        need(math.isfinite(self.knn_temperature) and self.knn_temperature > 0,
             f"train.knn_temperature must be > 0, got {self.knn_temperature}")
        need(bool(self.output_dir.strip()), "train.output_dir is empty: name the folder for checkpoints and logs")
        need(self.resume is not None and self.resume != "", "train.resume is true, false or a checkpoint path")


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
    flex_kernel_options: Literal["auto", "default", "sm90_fit", "small"] = "auto"
    """Triton tiles of model.attention=flex (models/attention.py): auto = sm90_fit on H100/H200, torch's
    choice elsewhere; small = the fallback with smaller tiles and fewer stages."""


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
    tensorboard: bool = True
    """Write every numeric metric as a TensorBoard scalar under <output_dir>/tensorboard."""
    wandb: bool = False
    """Also log to Weights & Biases (needs the wandb package); the run is named after output_dir."""
    wandb_project: str = "fdfast"
    """W&B project of the run."""
    wandb_entity: Optional[str] = None
    """W&B entity (user or team) that owns the project; null: W&B's own default (WANDB_ENTITY, your login)."""
    wandb_name: Optional[str] = None
    """W&B run name; null: the name of train.output_dir."""
    wandb_group: Optional[str] = None
    """W&B group, to show related runs together (e.g. the distillation and its fine-tunes); null: none."""
    wandb_tags: list[str] = field(default_factory=list)
    """W&B tags of the run."""
    wandb_mode: Literal["online", "offline"] = "online"
    """offline: write the W&B run under <output_dir>/wandb only, for `wandb sync` later (no network)."""

    def __post_init__(self) -> None:
        need(self.every >= 1, f"log.every must be >= 1, got {self.every}")
        need(not self.wandb or bool(self.wandb_project.strip()),
             "log.wandb_project is empty: name the W&B project, or set log.wandb=false")
