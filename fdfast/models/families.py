"""Teacher families: the timm classes a teacher may be, how their output tokens are laid out, and which of
timm's own ``checkpoint_filter_fn`` turns foreign key layouts into theirs. The one place that knows a class.

* ``vit``: :class:`timm.models.vision_transformer.VisionTransformer` and its subclasses: OpenAI / OpenCLIP /
  DFN / MetaCLIP CLIP, DINO, DeiT, DINOv2 (with or without registers), SigLIP / SigLIP2 (no class token:
  a MAP attention-pool head reads the patch tokens), AIMv2. Filter: ``vision_transformer.checkpoint_filter_fn``
  (OpenAI / OpenCLIP ``visual.*`` keys, OpenCLIP timm trunks ``visual.trunk.*``, DINOv2's original keys).
* ``eva``: :class:`timm.models.eva.Eva`, the RoPE ViTs: EVA-02 (CLIP), DINOv3 (4 storage tokens = registers),
  Perception Encoder. Filter: ``eva.checkpoint_filter_fn`` (DINOv3's original keys, OpenCLIP ``visual.trunk.*``,
  EVA-CLIP ``visual.*``, PE's ``visual.conv1 ...`` release).
* ``swin``: :class:`timm.models.swin_transformer.SwinTransformer` (v1, EsViT's teacher): no prefix tokens, the
  last stage's grid, NHWC output. Filter: ``swin_transformer.checkpoint_filter_fn``.

Token layout of a ViT-family output (``forward_features``: every token after the final norm, before any
pooling or head): ``[CLS]`` if the model has a class token, then the other prefix tokens (registers, DINOv3's
storage tokens, DeiT's distillation token), then the patch grid row-major. timm builds both classes in that
order (``_pos_embed``: class token, then register tokens).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from timm.models import eva as timm_eva
from timm.models import swin_transformer as timm_swin
from timm.models import vision_transformer as timm_vit

from ..errors import ConfigError

__all__ = ["TokenLayout", "Family", "FAMILIES", "family_of"]


@dataclass(frozen=True)
class TokenLayout:
    """Where each output token of a teacher comes from."""
    num_cls: int
    """1 when the first token is a class token, else 0."""
    num_registers: int
    """Prefix tokens after the class token (registers, storage tokens, a distillation token)."""
    grid: tuple[int, int]
    """Patch grid (rows, columns) of the output, row-major after the prefix tokens."""
    stride: int
    """Input pixels per output token along a side (the patch size; Swin: patch * 2^(stages - 1))."""

    @property
    def num_prefix(self) -> int:
        return self.num_cls + self.num_registers

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix + self.num_patches

    def describe(self) -> str:
        parts = (["CLS"] if self.num_cls else []) + ([f"{self.num_registers} registers"] if self.num_registers else [])
        return " + ".join(parts + [f"{self.grid[0]}x{self.grid[1]} patches (stride {self.stride})"])


def _prefixed_layout(model: nn.Module) -> TokenLayout:
    # VisionTransformer and Eva share these attributes: cls_token is None without a class token.
    num_cls = int(getattr(model, "cls_token", None) is not None)
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    return TokenLayout(num_cls=num_cls, num_registers=int(model.num_prefix_tokens) - num_cls, grid=grid,
                       stride=int(model.patch_embed.patch_size[0]))


def _swin_layout(model: nn.Module) -> TokenLayout:
    h, w = (int(v) for v in model.layers[-1].output_resolution)
    return TokenLayout(num_cls=0, num_registers=0, grid=(h, w), stride=int(model.patch_embed.img_size[0]) // h)


def _tokens(out: torch.Tensor) -> torch.Tensor:
    return out


def _flatten_nhwc(out: torch.Tensor) -> torch.Tensor:
    return out.flatten(1, 2)  # timm Swin returns NHWC (B,h,w,C); FD's tokens are row-major h*w


@dataclass(frozen=True)
class Family:
    name: str
    classes: tuple[type, ...]
    filter_fn: Callable[..., dict]
    """timm's converter of foreign checkpoints to this class's keys: ``filter_fn(state_dict, model)``."""
    layout: Callable[[nn.Module], TokenLayout]
    tokens: Callable[[torch.Tensor], torch.Tensor]
    """``forward_features`` output -> (B, N, D) tokens."""


FAMILIES = (
    Family("vit", (timm_vit.VisionTransformer,), timm_vit.checkpoint_filter_fn, _prefixed_layout, _tokens),
    Family("eva", (timm_eva.Eva,), timm_eva.checkpoint_filter_fn, _prefixed_layout, _tokens),
    Family("swin", (timm_swin.SwinTransformer,), timm_swin.checkpoint_filter_fn, _swin_layout, _flatten_nhwc),
)


def family_of(model: nn.Module, name: str = "") -> Family:
    """The family of a built timm model; a class of none of them is a :class:`ConfigError` naming them."""
    for family in FAMILIES:
        if isinstance(model, family.classes):
            return family
    supported = ", ".join(f"{c.__module__}.{c.__name__}" for f in FAMILIES for c in f.classes)
    raise ConfigError(f"model.teacher.model={name or type(model).__name__!r} builds {type(model).__name__}, "
                      f"which is not a teacher family fdfast knows ({supported})")
