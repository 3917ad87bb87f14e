"""The one place that chooses an attention kernel (student and teacher).

* ``sdpa`` — timm's fused path (``fused_attn=True``): ``F.scaled_dot_product_attention``. The teacher
  has no bias, so under bf16/fp16 SDPA picks FlashAttention; the Beit student passes its relative
  position bias as ``attn_mask``, which FlashAttention and cuDNN refuse when the bias needs a gradient,
  so it runs on the memory-efficient kernel.
* ``eager`` — explicit ``softmax(q k^T + bias) v`` (``fused_attn=False``), as the official code.
* ``flex`` — FlexAttention with the bias as a ``score_mod`` (:class:`FlexBeitAttention`), Beit only.

:func:`set_attention_kernel` is the only function that touches ``fused_attn`` or swaps classes.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.beit import Attention as BeitAttention

KERNELS = ("sdpa", "flex", "eager")

_compiled_flex: Optional[Callable] = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod, scale: float) -> torch.Tensor:
    """FlexAttention only runs fast when compiled. Inside a compiled student it is traced as is;
    an eager CUDA student calls a compiled ``flex_attention`` (compiled once per shape); on CPU the
    eager reference implementation runs."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if torch.compiler.is_compiling() or not q.is_cuda:
        return flex_attention(q, k, v, score_mod=score_mod, scale=scale)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, score_mod=score_mod, scale=scale)


class FlexBeitAttention(BeitAttention):
    """timm Beit attention with FlexAttention. The bias (shared table gathered once per forward by
    ``Beit.rel_pos_bias()``, plus this block's own table if it has one) enters as a ``score_mod``
    on the fp32 scores inside the fused kernel; its gradient flows back through the captured
    (heads, N, N) tensor and then, by ordinary autograd, through the gather into the table.

    Capturing the gathered (heads, N, N) tensor rather than the (732, heads) table keeps the
    backward's atomic adds spread over N*N addresses instead of 732 hot ones."""

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.training and self.attn_drop.p > 0:
            return super().forward(x, shared_rel_pos_bias)  # FlexAttention has no attention dropout
        B, N, C = x.shape
        if self.q_bias is None:
            qkv = self.qkv(x)
        else:
            qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
            if self.qkv_bias_separate:
                qkv = self.qkv(x) + qkv_bias
            else:
                qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

        bias = None
        if self.relative_position_bias_table is not None:
            bias = self._get_rel_pos_bias()[0]
        if shared_rel_pos_bias is not None:
            shared = shared_rel_pos_bias.reshape(-1, N, N)
            bias = shared if bias is None else bias + shared
        score_mod = None
        if bias is not None:
            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias[h, q_idx, kv_idx]
        x = _flex(q, k, v, score_mod, self.scale)
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))


def _retype_modules(model: nn.Module, old: type, new: type) -> None:
    """Give every module of exactly class ``old`` the class ``new`` (same parameters, buffers and keys)."""
    for m in model.modules():
        if type(m) is old:
            m.__class__ = new


def set_attention_kernel(model: nn.Module, kind: str) -> int:
    """Switch every attention module of ``model`` to ``kind`` (``sdpa``, ``flex`` or ``eager``); returns
    how many modules have that kernel now. Only the class or the ``fused_attn`` flag changes: parameters,
    buffers and state-dict keys stay. ``flex`` applies to timm Beit attention only and raises for a model
    without any (SwinV2's cosine attention has no flex path here)."""
    if kind not in KERNELS:
        raise ValueError(f"model.attention={kind!r}: choose one of {list(KERNELS)}")
    if kind == "flex":
        _retype_modules(model, BeitAttention, FlexBeitAttention)
        if not any(type(m) is FlexBeitAttention for m in model.modules()):
            raise ValueError(f"model.attention='flex' applies to the Beit (ViT) student; {type(model).__name__} "
                             "has no timm Beit attention. Use model.attention=sdpa")
    else:
        _retype_modules(model, FlexBeitAttention, BeitAttention)
    count = 0
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = kind != "eager"
            count += 1
    return count


@contextlib.contextmanager
def only_sdpa_backends(*names: str) -> Iterator[None]:
    """Restrict SDPA to the named backends (e.g. "FLASH_ATTENTION"): a call that cannot use them
    raises instead of silently falling back, which is how the device script proves the teacher
    runs on FlashAttention and finds the kernel the student's biased attention uses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([getattr(SDPBackend, n) for n in names]):
        yield
