"""The FD objective as pure tensor functions (official ``models/feature_distillation.py``).

target = LayerNorm_nonaffine(teacher_final_norm_tokens)      (eps 1e-5: "whitening")
loss   = mean_{b,n,c} SmoothL1_beta(student_proj_tokens - target), beta = 2

Both run in fp32 whatever the autocast dtype, as layer_norm and smooth_l1 do under the official
fp16 autocast.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B,3,H,W) pixels -> float32 ``(x/255 - mean) / std``, keeping the memory format.

    Equal, up to fp32 rounding, to ToTensor + Normalize of the official pipeline (and, for CLIP
    teachers, to its ImageNet -> CLIP re-normalisation of the same pixels).
    """
    m, s = pixel_constants(tuple(mean), tuple(std), images.device)
    return (images.float() - m) / s


@lru_cache(maxsize=16)
def pixel_constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(255 * mean, 255 * std) as (1, C, 1, 1) float32 tensors on ``device``, built once per device: a
    host->device copy of a Python list in every step would be a pageable-memory copy (a host sync)
    and would break CUDA-graph capture."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1).mul(255.0).to(device)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1).mul(255.0).to(device)
    return m, s


def whiten(features: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Per-token, parameter-free LayerNorm over channels (``nn.LayerNorm(D, elementwise_affine=False)``)."""
    features = features.float()
    return F.layer_norm(features, features.shape[-1:], eps=eps)


def fd_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """SmoothL1 (beta) averaged over batch x tokens x channels; index-aligned tokens (CLS included)."""
    if pred.shape != target.shape:
        raise ValueError(f"student tokens {tuple(pred.shape)} and teacher tokens {tuple(target.shape)} "
                         "differ: student and teacher must produce the same token grid")
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)
