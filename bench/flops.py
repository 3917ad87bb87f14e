"""Analytic matmul FLOP count of one FD step, per image (the MFU denominator of bench/throughput.py).

Method: count the multiply-adds of every matmul / conv as 2 FLOPs; LayerNorm, softmax, GELU, bias
adds and the loss are not counted (they are memory-bound and < 1 % of the matmul count). For a ViT
with N tokens (patches + CLS), width D, MLP hidden H and L blocks, per image:

    patch embed      2 * P * (3 p^2) * D               (P patches, a strided conv = a matmul)
    per block        2 * N * D * 3D   (qkv)  +  2 * N * D * D   (proj)
                   + 2 * N * N * D    (q k^T) + 2 * N * N * D   (attn v)
                   + 2 * N * D * H * 2                 (fc1 + fc2)

Backward costs two matmuls per forward matmul (input grad + weight grad), except where the input
needs no gradient: the patch embedding (pixels) and SwinV2's position-bias MLP input (a constant
table) only get their weight grad. So student fwd+bwd = 3 * fwd - (those terms); the frozen teacher
is forward only; the projector (Linear Ds -> Dt on every token) is fwd+bwd.

ViT-B/16 student + CLIP ViT-B/16 teacher at 224 (N = 197): student fwd 35.13, student fwd+bwd 105.15,
projector 0.70, teacher fwd 35.13 -> **140.97 GFLOP/img** (design.md: 141). The per-module counts equal
``torch.utils.flop_counter.FlopCounterMode`` on the eager models (tests/test_bench.py checks that).
Swin stages are counted the same way per window (attention over M^2 tokens of each window) plus the
patch-merging reductions. Any timm ViT-family teacher (DINOv2 with registers, SigLIP without a CLS token,
EVA-02's separate q/k/v and SwiGLU MLP, DINOv3, PE) is counted from its built blocks (:func:`transformer_count`),
at the input size its token rules give it (DINOv2-B/14 under a 224 px B/16 student: 196 px, 201 tokens).
Several teachers (:func:`distill_step_flops`): the student once, every teacher's forward and every head.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any, Sequence

import torch.nn as nn


@dataclass
class Count:
    """Forward FLOPs per image as terms; ``no_input_grad`` terms only get a weight grad in backward."""

    terms: dict[str, float] = field(default_factory=dict)
    no_input_grad: set = field(default_factory=set)

    def add(self, name: str, flops: float, input_grad: bool = True) -> None:
        self.terms[name] = self.terms.get(name, 0.0) + float(flops)
        if not input_grad:
            self.no_input_grad.add(name)

    @property
    def fwd(self) -> float:
        return sum(self.terms.values())

    @property
    def fwd_bwd(self) -> float:
        return sum(v * (2 if k in self.no_input_grad else 3) for k, v in self.terms.items())


def vit_count(*, img_size: int, patch_size: int, embed_dim: int, depth: int, mlp_hidden: int,
              prefix_tokens: int = 1, in_chans: int = 3) -> Count:
    """ViT / Beit (CLS + patches, global attention)."""
    patches = (img_size // patch_size) ** 2
    n, d = patches + prefix_tokens, embed_dim
    c = Count()
    c.add("patch_embed", 2 * patches * in_chans * patch_size ** 2 * d, input_grad=False)
    c.add("qkv", depth * 2 * n * d * 3 * d)
    c.add("attn_proj", depth * 2 * n * d * d)
    c.add("attn_matmuls", depth * 2 * 2 * n * n * d)
    c.add("mlp", depth * 2 * 2 * n * d * mlp_hidden)
    return c


def _term(name: str) -> str:
    """The term a block's linear layer counts under: q/k/v projections, the attention output, or the MLP."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("qkv", "q_proj", "k_proj", "v_proj", "q", "k", "v", "kv"):
        return "qkv"
    if name.startswith("attn.") and leaf == "proj":
        return "attn_proj"
    return "mlp"


def transformer_count(model: nn.Module) -> Count:
    """Any timm ViT-family backbone (VisionTransformer, Beit, Eva: CLS / registers / no prefix, fused or separate
    q/k/v, GELU or SwiGLU MLPs) read from the built module: every ``nn.Linear`` of every block on all N tokens,
    plus q k^T and attn v over the attention's inner width, plus the patch embedding. Position encodings (RoPE,
    relative bias) and pooling heads outside the blocks (SigLIP's MAP head: ``forward_features`` never runs it)
    add no matmul of the step."""
    pe = model.patch_embed
    patches = prod(pe.grid_size)
    prefix = getattr(model, "num_prefix_tokens", None)
    if prefix is None:  # timm Beit: CLS token only
        prefix = 1 if getattr(model, "cls_token", None) is not None else 0
    n = patches + int(prefix)
    c = Count()
    conv = pe.proj
    c.add("patch_embed", 2 * patches * conv.in_channels * prod(conv.kernel_size) * conv.out_channels, input_grad=False)
    for blk in model.blocks:
        for name, m in blk.named_modules():
            if isinstance(m, nn.Linear):
                c.add(_term(name), 2 * n * m.in_features * m.out_features)
        c.add("attn_matmuls", 2 * 2 * n * n * blk.attn.proj.in_features)
    return c


def swin_count(model: nn.Module) -> Count:
    """timm SwinTransformer (v1) / SwinTransformerV2, read from the built module's geometry (stage
    resolutions and windows after timm's clamping)."""
    c = Count()
    pe = model.patch_embed
    grid = prod(pe.grid_size)
    patch = pe.patch_size[0] if isinstance(pe.patch_size, (tuple, list)) else pe.patch_size
    c.add("patch_embed", 2 * grid * pe.proj.in_channels * patch ** 2 * pe.proj.out_channels, input_grad=False)
    for layer in model.layers:
        ds = layer.downsample
        if not isinstance(ds, nn.Identity):
            red = ds.reduction
            c.add("patch_merging", 2 * prod(layer.blocks[0].input_resolution) * red.in_features * red.out_features)
        for blk in layer.blocks:
            attn = blk.attn
            tokens = prod(blk.input_resolution)
            win = prod(blk.window_size)
            d = attn.qkv.in_features
            c.add("qkv", 2 * tokens * d * attn.qkv.out_features)
            c.add("attn_proj", 2 * tokens * attn.proj.in_features * attn.proj.out_features)
            c.add("attn_matmuls", 2 * 2 * tokens * win * d)
            c.add("mlp", 2 * tokens * (blk.mlp.fc1.in_features * blk.mlp.fc1.out_features
                                        + blk.mlp.fc2.in_features * blk.mlp.fc2.out_features))
            cpb = getattr(attn, "cpb_mlp", None)
            if cpb is not None:  # SwinV2 continuous position bias: an MLP over the (2M-1)^2 offset table
                entries = prod(attn.relative_coords_table.shape[:-1])
                linears = [m for m in cpb.modules() if isinstance(m, nn.Linear)]
                c.add("cpb_mlp_in", 2 * entries * linears[0].in_features * linears[0].out_features,
                      input_grad=False)
                for lin in linears[1:]:
                    c.add("cpb_mlp", 2 * entries * lin.in_features * lin.out_features)
    return c


def model_count(model: nn.Module) -> Count:
    """Forward count of a timm ViT / Beit / Eva / Swin (v1, v2) backbone, or of an fdfast Teacher."""
    model = getattr(model, "model", model)  # fdfast Teacher wraps the timm model
    if hasattr(model, "layers") and hasattr(model.layers[0], "blocks"):
        return swin_count(model)
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return transformer_count(model)
    raise TypeError(f"no FLOP formula for {type(model).__name__}")


def head_count(head: nn.Module, tokens: int) -> Count:
    """A projector head (FD's linear layer, an MLP adaptor) on every student token; its input needs a grad."""
    c = Count()
    for m in head.modules():
        if isinstance(m, nn.Linear):
            c.add("head", 2 * tokens * m.in_features * m.out_features)
    return c


def fd_step_flops(student: Count, teacher: Count, *, tokens: int, student_dim: int, teacher_dim: int) -> dict[str, Any]:
    """FLOPs per image of one FD step (student fwd+bwd, projector fwd+bwd, teacher fwd)."""
    proj = Count()
    proj.add("projector", 2 * tokens * student_dim * teacher_dim)
    out = {
        "student_fwd": student.fwd,
        "student_fwd_bwd": student.fwd_bwd,
        "projector_fwd_bwd": proj.fwd_bwd,
        "teacher_fwd": teacher.fwd,
    }
    out["total"] = out["student_fwd_bwd"] + out["projector_fwd_bwd"] + out["teacher_fwd"]
    out["method"] = ("analytic matmul count (2 FLOP/MAC): student fwd x3 (x2 for layers whose input needs no "
                     "grad) + projector x3 + teacher fwd; see bench/flops.py")
    return out


def fd_flops_from_models(student_backbone: nn.Module, teacher: nn.Module, tokens: int,
                         teacher_dim: int) -> dict[str, Any]:
    s = model_count(student_backbone)
    t = model_count(teacher)
    return fd_step_flops(s, t, tokens=tokens, student_dim=int(student_backbone.num_features), teacher_dim=teacher_dim)


def distill_step_flops(student_backbone: nn.Module, tokens: int,
                       teachers: Sequence[tuple[str, nn.Module, nn.Module]]) -> dict[str, Any]:
    """FLOPs per image of one FD step with several teachers: the student fwd+bwd once, and per teacher
    ``(name, teacher, head)`` its forward and its head's fwd+bwd on all ``tokens`` student tokens. The keys of
    :func:`fd_step_flops` hold the sums (``projector_fwd_bwd``: every head); ``teachers`` the parts by name."""
    s = model_count(student_backbone)
    parts = {name: {"teacher_fwd": model_count(t).fwd, "head_fwd_bwd": head_count(h, tokens).fwd_bwd}
             for name, t, h in teachers}
    out: dict[str, Any] = {
        "student_fwd": s.fwd, "student_fwd_bwd": s.fwd_bwd,
        "projector_fwd_bwd": sum(p["head_fwd_bwd"] for p in parts.values()),
        "teacher_fwd": sum(p["teacher_fwd"] for p in parts.values()),
    }
    out["total"] = out["student_fwd_bwd"] + out["projector_fwd_bwd"] + out["teacher_fwd"]
    out["teachers"] = parts
    out["method"] = ("analytic matmul count (2 FLOP/MAC): student fwd x3 (x2 for layers whose input needs no grad) "
                     "+ every head x3 + every teacher fwd; see bench/flops.py")
    return out


def vit_pair_flops(img_size: int = 224, *, student=(16, 768, 12), teacher=(16, 768, 12),
                   teacher_img_size: int | None = None) -> dict[str, Any]:
    """Instant count for a ViT student (patch, dim, depth) + ViT teacher at ``img_size`` (MLP ratio 4)."""
    sp, sd, sl = student
    tp, td, tl = teacher
    s = vit_count(img_size=img_size, patch_size=sp, embed_dim=sd, depth=sl, mlp_hidden=4 * sd)
    t = vit_count(img_size=teacher_img_size or img_size, patch_size=tp, embed_dim=td, depth=tl, mlp_hidden=4 * td)
    tokens = (img_size // sp) ** 2 + 1
    return fd_step_flops(s, t, tokens=tokens, student_dim=sd, teacher_dim=td)


# Dense bf16 tensor-core peak per card (vendor spec, no sparsity), for MFU. The benchmark also
# measures a large bf16 matmul and reports MFU against that (design.md quotes 790 TFLOP/s on H100).
SPEC_PEAK_BF16_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "GH200": 989.4,
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def spec_peak_tflops(device_name: str) -> float | None:
    for key, val in SPEC_PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return val
    return None


if __name__ == "__main__":
    f = vit_pair_flops()
    print({k: (round(v / 1e9, 2) if isinstance(v, float) else v) for k, v in f.items()})
