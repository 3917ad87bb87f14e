"""Attention probabilities of real timm models, read with forward hooks (no second implementation).

:func:`capture_attention` switches the model to explicit-softmax attention with
:func:`fdfast.models.attention.set_attention_kernel` (``eager``) and hooks every attention module's
``attn_drop``: in the eager path of timm Beit (shared or per-block relative position bias), ViT (CLIP,
DINO, DeiT, DINOv2, SigLIP teachers), Eva (EVA-02, DINOv3, PE: RoPE on q / k first), Swin v1 (EsViT teacher)
and SwinV2 (cosine attention, always eager), ``attn_drop``
receives exactly the softmax output, bias and shifted-window mask included. The kernel the model had is
restored afterwards, so training code paths are untouched.

What a "distance" is inside a Swin window: each map spans one window of ``w x w`` tokens, in window-local
coordinates; one token covers ``img_size / stage resolution`` pixels (4, 8, 16, 32 for a patch-4 Swin), so
distances are pixels in the input image. Shifted windows are cyclically rolled, and the -100 mask gives
pairs that wrap around the image edge ~0 weight, so every pair that carries attention is at its true
image-plane offset.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
from timm.layers import Attention as VitAttention
from timm.layers import AttentionRope
from timm.models.beit import Attention as BeitAttention
from timm.models.eva import EvaAttention
from timm.models.swin_transformer import WindowAttention as SwinAttention
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2Attention

from ..errors import UserError
from ..models.attention import FlexBeitAttention, set_attention_kernel
from .metrics import LayerGeometry

# Eva (EVA-02, DINOv3: EvaAttention; PE: AttentionRope) applies RoPE to q / k before the same eager softmax
ATTENTION_TYPES = (BeitAttention, VitAttention, EvaAttention, AttentionRope, SwinAttention, SwinV2Attention)
_TOKEN_ATTENTION = (BeitAttention, VitAttention, EvaAttention, AttentionRope)


class UnsupportedModel(UserError, TypeError):
    """A model whose attention this tool cannot read; the message names the supported families."""


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def attention_layers(model: nn.Module) -> list[tuple[nn.Module, LayerGeometry]]:
    """(attention module, geometry) of every attention layer in forward order: ``blocks.i.attn`` of a
    ViT / Beit, ``layers.s.blocks.b.attn`` of a Swin (numbered globally across stages)."""
    layers = []
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        grid = _pair(model.patch_embed.grid_size)
        patch = _pair(model.patch_embed.patch_size)
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        for i, blk in enumerate(model.blocks):
            if isinstance(getattr(blk, "attn", None), _TOKEN_ATTENTION):
                layers.append((blk.attn, LayerGeometry(f"blocks.{i}", grid, (float(patch[0]), float(patch[1])),
                                                       prefix=prefix)))
    elif hasattr(model, "layers") and hasattr(model, "patch_embed"):
        img = _pair(model.patch_embed.img_size)
        for s, stage in enumerate(model.layers):
            for b, blk in enumerate(stage.blocks):
                if not isinstance(getattr(blk, "attn", None), (SwinAttention, SwinV2Attention)):
                    continue
                res = _pair(blk.input_resolution)
                layers.append((blk.attn, LayerGeometry(
                    f"layers.{s}.blocks.{b}", _pair(blk.window_size), (img[0] / res[0], img[1] / res[1]),
                    windowed=True)))
    if not layers:
        raise UnsupportedModel(
            f"{type(model).__name__}: no attention layer this tool can read; supported are timm Beit, "
            "VisionTransformer (CLIP / DINO / DeiT / DINOv2 / SigLIP), Eva (EVA-02 / DINOv3 / PE), SwinTransformer "
            "and SwinTransformerV2")
    return layers


def _current_kernel(module: nn.Module) -> str:
    if isinstance(module, FlexBeitAttention):
        return "flex"
    return "sdpa" if getattr(module, "fused_attn", False) else "eager"


@contextlib.contextmanager
def capture_attention(model: nn.Module, sink: Callable[[int, torch.Tensor], None]) -> Iterator[list]:
    """Within the block, every forward of ``model`` calls ``sink(layer_index, probabilities)`` once per
    attention layer with its (B, heads, N, N) softmax output (B = images x windows for Swin). Yields the
    layers' geometries. Each attention module gets its own kernel back afterwards."""
    layers = attention_layers(model)
    previous = [_current_kernel(module) for module, _ in layers]
    handles = []
    try:
        for index, (module, _) in enumerate(layers):
            set_attention_kernel(module, "eager")

            def hook(_mod, inputs, _output, index=index):
                sink(index, inputs[0].detach())
            handles.append(module.attn_drop.register_forward_hook(hook))
        yield [geometry for _, geometry in layers]
    finally:
        for h in handles:
            h.remove()
        for (module, _), kind in zip(layers, previous):
            set_attention_kernel(module, kind)
