"""The one place that chooses an attention kernel (student and teacher).

* ``sdpa`` — timm's fused path (``fused_attn=True``): ``F.scaled_dot_product_attention``. The teacher
  has no bias, so under bf16/fp16 SDPA picks FlashAttention; the Beit student passes its relative
  position bias as ``attn_mask``, which FlashAttention and cuDNN refuse when the bias needs a gradient,
  so it runs on the memory-efficient kernel.
* ``eager`` — explicit ``softmax(q k^T + bias) v`` (``fused_attn=False``), as the official code.
* ``flex`` — FlexAttention with the bias as a ``score_mod`` (:class:`FlexBeitAttention`), Beit only,
  with Triton tile sizes from :data:`FLEX_KERNEL_OPTIONS` (``compile.flex_kernel_options``).

:func:`set_attention_kernel` is the only function that touches ``fused_attn`` or swaps classes.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.beit import Attention as BeitAttention
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention

KERNELS = ("sdpa", "flex", "eager")

# FlexAttention's Triton tiles for the student (head dim 64, 197 tokens, a bias that needs a gradient).
# With torch's own tiles the student's flex backward failed to compile on an H200 ("No valid triton
# configs", bench/results/h200-2026-11-26.md), the symptom of tiles that need more shared memory than an
# SM has. ``sm90_fit``: forward 128x64 tiles, backward 32/64 tiles, 3 pipeline stages, 4 warps, sized for
# the sm90 shared-memory budget; ``small``: the fallback with 64x64 forward tiles and 2 stages (less
# shared memory still, less overlap). ``default`` leaves the choice to torch (and, under
# compile.mode=max-autotune-no-cudagraphs, to autotuning, which drops configs that overflow).
FLEX_KERNEL_OPTIONS: dict[str, Optional[dict[str, int]]] = {
    "default": None,
    "sm90_fit": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_stages": 3, "fwd_num_warps": 4,
                 "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                 "bwd_num_stages": 3, "bwd_num_warps": 4},
    "small": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 2, "fwd_num_warps": 4,
              "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
              "bwd_num_stages": 2, "bwd_num_warps": 4},
}


def flex_kernel_options(name: str, device: torch.device) -> Optional[dict[str, int]]:
    """The ``kernel_options`` of preset ``name`` for ``device``. ``auto``: ``sm90_fit`` on a compute
    capability 9.x GPU (H100/H200, the shared-memory budget the preset was sized for), torch's own
    choice elsewhere. CPU runs ignore them (the reference path has no tiles)."""
    if name == "auto":
        sm90 = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        name = "sm90_fit" if sm90 else "default"
    if name not in FLEX_KERNEL_OPTIONS:
        raise ValueError(f"compile.flex_kernel_options={name!r}: choose one of {['auto', *FLEX_KERNEL_OPTIONS]}")
    options = FLEX_KERNEL_OPTIONS[name]
    return dict(options) if options is not None else None


@functools.cache
def _compiled_flex_attention() -> Callable:
    # One compiled wrapper per process; torch._dynamo.reset() empties its cache like any other.
    return torch.compile(flex_attention, dynamic=False)


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod, scale: float,
          kernel_options: Optional[dict[str, int]]) -> torch.Tensor:
    """FlexAttention only runs fast when compiled. Inside a compiled student it is traced as is;
    an eager CUDA student calls a compiled ``flex_attention`` (compiled once per shape); on CPU the
    eager reference implementation runs."""
    if torch.compiler.is_compiling() or not q.is_cuda:
        return flex_attention(q, k, v, score_mod=score_mod, scale=scale, kernel_options=kernel_options)
    return _compiled_flex_attention()(q, k, v, score_mod=score_mod, scale=scale, kernel_options=kernel_options)


class FlexBeitAttention(BeitAttention):
    """timm Beit attention with FlexAttention. The bias (shared table gathered once per forward by
    ``Beit.rel_pos_bias()``, plus this block's own table if it has one) enters as a ``score_mod``
    on the fp32 scores inside the fused kernel; its gradient flows back through the captured
    (heads, N, N) tensor and then, by ordinary autograd, through the gather into the table.

    Capturing the gathered (heads, N, N) tensor rather than the (732, heads) table keeps the
    backward's atomic adds spread over N*N addresses instead of 732 hot ones. Under bf16 the captured
    tensor is bf16 too (half the bytes each tile loads and holds in shared memory); the score_mod casts
    each element to the score dtype before adding it.

    ``kernel_options`` (set by :func:`set_attention_kernel`) are FlexAttention's Triton tile sizes."""

    kernel_options: Optional[dict[str, int]] = None

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
            if q.dtype == torch.bfloat16:
                bias = bias.to(torch.bfloat16)

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + bias[h, q_idx, kv_idx].to(score.dtype)
        x = _flex(q, k, v, score_mod, self.scale, self.kernel_options)
        x = x.transpose(1, 2).reshape(B, N, -1)
        return self.proj_drop(self.proj(x))


def _retype_modules(model: nn.Module, old: type, new: type) -> None:
    """Give every module of exactly class ``old`` the class ``new`` (same parameters, buffers and keys)."""
    for m in model.modules():
        if type(m) is old:
            m.__class__ = new


def set_attention_kernel(model: nn.Module, kind: str, kernel_options: Optional[dict[str, int]] = None) -> int:
    """Switch every attention module of ``model`` to ``kind`` (``sdpa``, ``flex`` or ``eager``); returns
    how many modules have that kernel now. Only the class, the ``fused_attn`` flag and, for ``flex``, the
    ``kernel_options`` (see :func:`flex_kernel_options`) change: parameters, buffers and state-dict keys
    stay. ``flex`` applies to timm Beit attention only and raises for a model without any (SwinV2's
    cosine attention has no flex path here)."""
    if kind not in KERNELS:
        raise ValueError(f"model.attention={kind!r}: choose one of {list(KERNELS)}")
    if kind == "flex":
        _retype_modules(model, BeitAttention, FlexBeitAttention)
        flex = [m for m in model.modules() if type(m) is FlexBeitAttention]
        if not flex:
            raise ValueError(f"model.attention='flex' applies to the Beit (ViT) student; {type(model).__name__} "
                             "has no timm Beit attention. Use model.attention=sdpa")
        for m in flex:
            m.kernel_options = kernel_options
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
    with sdpa_kernel([getattr(SDPBackend, n) for n in names]):
        yield
