"""A second, independent implementation of the official FD forward and loss, in plain torch ops.

Written from the official code (SwinTransformer/Feature-Distillation @2115145: ``models/feature_distillation.py``
``FD.forward`` and ``VisionTransformerForFD``, ``models/vision_transformer.py``, ``models/clip/model.py``,
``models/clip/vit.py`` for DINO, ``data/data_fd.py``) and OpenAI's CLIP ``model.py``. It is driven by state
dicts in the official layouts (FD's ``encoder.*`` / ``decoder.0.*``, OpenAI's ``visual.*``, DINO's flat keys)
and imports neither fdfast nor timm, so agreeing with fdfast means two implementations agree.

Everything runs in the dtype of the tensors passed in: the parity tests use float64 as the "exact" answer
and float32 to measure how far plain fp32 rounding alone moves it.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

Tensor = torch.Tensor
StateDict = Mapping[str, Tensor]


# ----------------------------------------------------------------------------------------------
# Elementary ops, written out so that no module class of either codebase is involved
# ----------------------------------------------------------------------------------------------
def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)  # biased variance, as nn.LayerNorm
    y = (x - mean) / torch.sqrt(var + eps)
    return y if weight is None else y * weight + bias


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    y = x @ weight.transpose(0, 1)
    return y if bias is None else y + bias


def softmax(x: Tensor) -> Tensor:
    e = torch.exp(x - x.amax(-1, keepdim=True))
    return e / e.sum(-1, keepdim=True)


def gelu(x: Tensor) -> Tensor:  # nn.GELU() default: the exact erf form
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def quick_gelu(x: Tensor) -> Tensor:  # OpenAI CLIP's QuickGELU
    return x * torch.sigmoid(1.702 * x)


def patchify(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Conv2d(kernel = stride = patch) -> (B, h*w, D), tokens in row-major (h, w) order."""
    p = weight.shape[-1]
    y = F.conv2d(x, weight, bias, stride=p)
    return y.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Shared relative position bias (BEiT / VisionTransformerForFD's RelativePositionBias)
# ----------------------------------------------------------------------------------------------
def relative_position_index(grid_h: int, grid_w: int) -> Tensor:
    """(N, N) int64 index into the ((2h-1)(2w-1)+3, heads) table, N = h*w + 1 (CLS first).

    From the definition: patch query i=(hi,wi), key j=(hj,wj) -> (hi-hj+h-1)*(2w-1) + (wi-wj+w-1); the three
    extra rows R-3 (CLS query -> any key), R-2 (any query -> CLS key), R-1 (CLS -> CLS), R = table rows.
    Row = query, column = key, like the logits q @ k^T it is added to.
    """
    rows = (2 * grid_h - 1) * (2 * grid_w - 1) + 3
    hh = torch.arange(grid_h).repeat_interleave(grid_w)  # row of patch token t (row-major)
    ww = torch.arange(grid_w).repeat(grid_h)
    patch = (hh[:, None] - hh[None, :] + grid_h - 1) * (2 * grid_w - 1) + (ww[:, None] - ww[None, :] + grid_w - 1)
    n = grid_h * grid_w + 1
    index = torch.empty(n, n, dtype=torch.long)
    index[1:, 1:] = patch
    index[0, :] = rows - 3
    index[:, 0] = rows - 2
    index[0, 0] = rows - 1
    return index


def shared_rel_pos_bias(table: Tensor, index: Tensor) -> Tensor:
    n = index.shape[0]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)  # (heads, N, N)


# ----------------------------------------------------------------------------------------------
# Student: VisionTransformerForFD (FD pretrain config: no abs pos emb, shared RPB, CLS, final norm)
# ----------------------------------------------------------------------------------------------
def _depth(sd: StateDict, pattern: str) -> int:
    return len({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def student_tokens(sd: StateDict, x: Tensor, *, index: Optional[Tensor] = None, eps: float = 1e-6,
                   act: Callable[[Tensor], Tensor] = gelu) -> Tensor:
    """``VisionTransformerForFD.forward`` from FD's ``encoder.*`` keys: (B, 1 + h*w, D) after the final norm.

    ``index`` defaults to :func:`relative_position_index` for the input's patch grid (the tests pass
    deliberately wrong ones). The k bias is zero (DEV.VIT_WITHKBIAS False); note that a k bias adds the same
    q.b_k to every logit of a query row, so softmax makes it unobservable either way.
    """
    e = "encoder."
    w_pe = sd[e + "patch_embed.proj.weight"]
    p = w_pe.shape[-1]
    gh, gw = x.shape[-2] // p, x.shape[-1] // p
    x = patchify(x, w_pe, sd[e + "patch_embed.proj.bias"])
    b, _, dim = x.shape
    x = torch.cat([sd[e + "cls_token"].expand(b, -1, -1), x], dim=1)  # no pos_embed: USE_APE False
    table = sd[e + "rel_pos_bias.relative_position_bias_table"]
    heads = table.shape[1]
    bias = shared_rel_pos_bias(table, relative_position_index(gh, gw) if index is None else index)
    scale = (dim // heads) ** -0.5
    n = x.shape[1]
    for i in range(_depth(sd, r"encoder\.blocks\.(\d+)\.")):
        blk = f"{e}blocks.{i}."
        h = layer_norm(x, sd[blk + "norm1.weight"], sd[blk + "norm1.bias"], eps)
        q_bias, v_bias = sd[blk + "attn.q_bias"], sd[blk + "attn.v_bias"]
        qkv_bias = torch.cat([q_bias, torch.zeros_like(v_bias), v_bias])
        qkv = linear(h, sd[blk + "attn.qkv.weight"], qkv_bias).reshape(b, n, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, hd)
        attn = softmax((q * scale) @ k.transpose(-2, -1) + bias)
        a = (attn @ v).transpose(1, 2).reshape(b, n, dim)
        a = linear(a, sd[blk + "attn.proj.weight"], sd[blk + "attn.proj.bias"])
        x = x + sd[blk + "gamma_1"] * a
        h = layer_norm(x, sd[blk + "norm2.weight"], sd[blk + "norm2.bias"], eps)
        h = linear(act(linear(h, sd[blk + "mlp.fc1.weight"], sd[blk + "mlp.fc1.bias"])),
                   sd[blk + "mlp.fc2.weight"], sd[blk + "mlp.fc2.bias"])
        x = x + sd[blk + "gamma_2"] * h
    return layer_norm(x, sd[e + "norm.weight"], sd[e + "norm.bias"], eps)


def projector(sd: StateDict, z: Tensor) -> Tensor:
    """FD's decoder: ``Conv1d(Ds, Dt, 1)`` applied as ``decoder(z.permute(0,2,1)).permute(0,2,1)``."""
    return F.conv1d(z.permute(0, 2, 1), sd["decoder.0.weight"], sd["decoder.0.bias"]).permute(0, 2, 1)


# ----------------------------------------------------------------------------------------------
# Teachers
# ----------------------------------------------------------------------------------------------
def clip_tokens(sd: StateDict, x: Tensor, *, act: Callable[[Tensor], Tensor] = quick_gelu,
                ln_post: bool = True) -> Tensor:
    """``ln_post(visual.forward_featuremap(x))`` from OpenAI's ``visual.*`` keys: every token, no ``proj``.

    Geometry as OpenAI's ``build_model`` reads it: layers = number of ``in_proj_weight`` keys, heads =
    width // 64. Attention follows ``nn.MultiheadAttention`` on (L, N, E) tensors: one in-projection split
    into q, k, v, heads as contiguous chunks of the width, softmax(q k^T / sqrt(hd)) v, out-projection.
    """
    v = "visual."
    x = patchify(x, sd[v + "conv1.weight"], None)  # conv1 has no bias
    b, _, width = x.shape
    cls = sd[v + "class_embedding"].to(x.dtype) + torch.zeros(b, 1, width, dtype=x.dtype)
    x = torch.cat([cls, x], dim=1) + sd[v + "positional_embedding"].to(x.dtype)
    x = layer_norm(x, sd[v + "ln_pre.weight"], sd[v + "ln_pre.bias"], 1e-5)
    x = x.permute(1, 0, 2)  # NLD -> LND
    seq = x.shape[0]
    heads = width // 64
    hd = width // heads
    for i in range(_depth(sd, r"visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_weight$")):
        blk = f"{v}transformer.resblocks.{i}."
        h = layer_norm(x, sd[blk + "ln_1.weight"], sd[blk + "ln_1.bias"], 1e-5)
        q, k, val = linear(h, sd[blk + "attn.in_proj_weight"], sd[blk + "attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, val = (t.reshape(seq, b * heads, hd).transpose(0, 1) for t in (q, k, val))  # (N*heads, L, hd)
        attn = softmax((q @ k.transpose(-2, -1)) / math.sqrt(hd))
        a = (attn @ val).transpose(0, 1).reshape(seq, b, width)
        x = x + linear(a, sd[blk + "attn.out_proj.weight"], sd[blk + "attn.out_proj.bias"])
        h = layer_norm(x, sd[blk + "ln_2.weight"], sd[blk + "ln_2.bias"], 1e-5)
        x = x + linear(act(linear(h, sd[blk + "mlp.c_fc.weight"], sd[blk + "mlp.c_fc.bias"])),
                       sd[blk + "mlp.c_proj.weight"], sd[blk + "mlp.c_proj.bias"])
    x = x.permute(1, 0, 2)  # LND -> NLD
    # FD: PRED_FEAT_AFTERNORM -> feature_model.visual.ln_post on all tokens
    return layer_norm(x, sd[v + "ln_post.weight"], sd[v + "ln_post.bias"], 1e-5) if ln_post else x


def vit_tokens(sd: StateDict, x: Tensor, *, heads: Optional[int] = None) -> Tensor:
    """DINO / DeiT teacher (``models/clip/vit.py``): ``norm(forward_featuremap(x))``, every token.

    patch_embed (conv with bias) -> CLS -> + pos_embed -> pre-norm blocks (qkv with bias, exact GELU,
    LN eps 1e-6) -> final norm. ``heads`` defaults to width // 64, the head size of every released ViT
    (FD's loader hard-codes ViT-B/16: 768 wide, 12 heads).
    """
    x = patchify(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"])
    b, _, dim = x.shape
    heads = heads or dim // 64
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], dim=1) + sd["pos_embed"]
    n = x.shape[1]
    for i in range(_depth(sd, r"blocks\.(\d+)\.")):
        blk = f"blocks.{i}."
        h = layer_norm(x, sd[blk + "norm1.weight"], sd[blk + "norm1.bias"], 1e-6)
        qkv = linear(h, sd[blk + "attn.qkv.weight"], sd[blk + "attn.qkv.bias"]).reshape(b, n, 3, heads, dim // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = softmax((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5)
        a = (attn @ v).transpose(1, 2).reshape(b, n, dim)
        x = x + linear(a, sd[blk + "attn.proj.weight"], sd[blk + "attn.proj.bias"])
        h = layer_norm(x, sd[blk + "norm2.weight"], sd[blk + "norm2.bias"], 1e-6)
        x = x + linear(gelu(linear(h, sd[blk + "mlp.fc1.weight"], sd[blk + "mlp.fc1.bias"])),
                       sd[blk + "mlp.fc2.weight"], sd[blk + "mlp.fc2.bias"])
    return layer_norm(x, sd["norm.weight"], sd["norm.bias"], 1e-6)


# ----------------------------------------------------------------------------------------------
# Input path and objective
# ----------------------------------------------------------------------------------------------
def _per_channel(values, like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=like.dtype).view(1, -1, 1, 1)


def to_tensor_normalize(images: Tensor, dtype: torch.dtype) -> Tensor:
    """data_fd.py: ToTensor (uint8 / 255) then Normalize(ImageNet mean/std): the student's input."""
    x = images.to(dtype) / 255.0
    return (x - _per_channel(IMAGENET_MEAN, x)) / _per_channel(IMAGENET_STD, x)


def clip_renormalize(x: Tensor) -> Tensor:
    """FD.forward for CLIP teachers: ``normalize_clip(unnormalize(x))`` where ``unnormalize`` is
    ``Normalize(mean=-m/s, std=1/s)``, i.e. ``x*s + m``, then Normalize(CLIP mean/std)."""
    m, s = _per_channel(IMAGENET_MEAN, x), _per_channel(IMAGENET_STD, x)
    x = (x - (-m / s)) / (1.0 / s)
    return (x - _per_channel(CLIP_MEAN, x)) / _per_channel(CLIP_STD, x)


def resize_like_torchvision_013(x: Tensor, size: int) -> Tensor:
    """FD's teacher-input resize for CLIP L/14 (``torchvision.transforms.Resize((224, 224))`` on the batch
    tensor) as torchvision 0.13, the version FD pins, computes it: default interpolation BILINEAR,
    ``antialias=None`` -> False for tensors, ``align_corners=False``."""
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def whiten(t: Tensor, eps: float = 1e-5) -> Tensor:
    """FD's ``ln_tgt = nn.LayerNorm(Dt, elementwise_affine=False)`` (eps 1e-5)."""
    return F.layer_norm(t, t.shape[-1:], eps=eps)


def fd_loss(pred: Tensor, target: Tensor, beta: float = 2.0) -> Tensor:
    """``nn.SmoothL1Loss(beta=2.0)`` (mean over batch x tokens x channels), then the no-op ``.mean()``."""
    return F.smooth_l1_loss(pred, target, beta=beta).mean()


def fd_forward_loss(model_sd: StateDict, teacher_sd: StateDict, images: Tensor, teacher: str,
                    teacher_size: Optional[int] = None) -> Tensor:
    """``FD.forward`` for a ViT student: uint8 images -> scalar loss, in the dtype of ``model_sd``.

    ``teacher`` is 'clip' (OpenAI ``visual.*`` keys, CLIP renormalisation) or 'dino' (flat ViT keys, the
    ImageNet-normalised input as is). ``teacher_size``: the CLIP_400M_Large case, where the renormalised
    input is resized to the teacher's resolution (224) when the student's differs. Gradients flow into
    ``model_sd``'s tensors; the teacher side runs under no_grad like the official ``feature_model``.
    """
    dtype = model_sd["encoder.cls_token"].dtype
    x = to_tensor_normalize(images, dtype)
    pred = projector(model_sd, student_tokens(model_sd, x))
    with torch.no_grad():
        if teacher == "clip":
            xt = clip_renormalize(x)
            if teacher_size is not None and xt.shape[-1] != teacher_size:
                xt = resize_like_torchvision_013(xt, teacher_size)
            t = clip_tokens(teacher_sd, xt)
        elif teacher == "dino":
            t = vit_tokens(teacher_sd, x)
        else:
            raise ValueError(f"teacher={teacher!r}: expected 'clip' or 'dino'")
        target = whiten(t)
    return fd_loss(pred, target)
