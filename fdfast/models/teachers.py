"""Frozen FD teachers: timm architectures + loading the original release files through timm's converters.

A teacher maps the *teacher-normalised* image batch to the tokens FD regresses onto: every output token
(CLS included for ViTs) after the teacher's final norm and before any projection / pooling / head
(spec §1.4, ``PRED_FEAT_AFTERNORM: True``). timm's ``forward_features`` is exactly that for all four kinds:

* ``clip``: OpenAI TorchScript ``ViT-B-16.pt`` / ``ViT-L-14.pt`` (``visual.*`` keys) ->
  ``vit_base_patch16_clip_quickgelu_224`` (197 x 768) / ``vit_large_patch14_clip_quickgelu_224`` (257 x 1024).
* ``dino``: ``dino_vitbase16_pretrain.pth`` (flat timm-style keys) -> ``vit_base_patch16_224`` (197 x 768).
* ``deit``: ``deit_base_patch16_224-b5f2ef4d.pth`` (``{'model': ...}`` incl. ``head.*``) ->
  ``deit_base_patch16_224`` (197 x 768).
* ``esvit``: EsViT ``checkpoint_best.pth`` (``{'student': {'module.…'}, 'teacher': …}``) -> Swin v1
  ``swin_base_patch4_window7_224`` with ``model_kwargs={'window_size': 14}`` (7x7 = 49 x 1024).

CLIP's ``ln_pre`` is timm's ``norm_pre`` and ``ln_post`` is timm's final ``norm``; OpenAI's ``proj`` becomes
timm's ``head`` and is dropped (``num_classes=0``). The OpenAI weights need the *quickgelu* model names: the
plain ``*_clip_*`` names use exact GELU and give features that are off by ~4e-2.

Release files are read by :mod:`.teacher_files`: under the one load policy (nothing in a file runs unless
``--trust-pickle`` allows it), with OpenAI's published SHA-256 checked for ``ViT-B-16.pt`` / ``ViT-L-14.pt``,
and strictly (every key of the file must land in the model and every parameter must come from the file, apart
from the keys a teacher does not use). The built :class:`Teacher` records the SHA-256 of its file.

Checked against the FD repo's own model code (random weights, fp32, CPU): CLIP B/16 at 224/256/192 and L/14,
and EsViT Swin-B w14 match exactly; DINO/DeiT ViT-B match to 4e-6, because timm uses fused attention.

Precision: weights are fp32 unless ``fp16_weights`` is set. Then conv/linear weights are stored in fp16, as
CLIP's ``convert_weights`` does, and the forward runs under fp16 autocast. Use it on CUDA only. With random
B/16 weights it stays within the official fp16 CLIP's own fp16 noise (max 1.2e-2). ``bf16`` instead casts
every weight and buffer to bf16 and runs the forward outside autocast, so that activations, LayerNorms and the
residual stream stay bf16 (the caller whitens the output in fp32).
"""
from __future__ import annotations

from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from timm.models import swin_transformer as timm_swin
from timm.models import vision_transformer as timm_vit

from ..errors import ConfigError
from .teacher_files import KINDS, TEACHER_KINDS, read_teacher_file

__all__ = ["Teacher", "build_teacher", "TEACHER_KINDS"]


# ----------------------------------------------------------------------------------------------
# The teacher module
# ----------------------------------------------------------------------------------------------
class Teacher(nn.Module):
    """Frozen teacher: ``forward(x)`` takes the *teacher-normalised* float image batch (B,3,H,W) with
    H = W = ``img_size`` and returns the final-norm output tokens (B, N, D): all tokens, CLS included for
    ViTs; 7x7 = 49 x 1024 for the EsViT Swin-B at 224.

    Attributes: ``kind`` (clip | dino | deit | esvit), ``mean``/``std`` (the normalisation this teacher
    expects: CLIP's for clip, ImageNet's otherwise), ``embed_dim`` (D), ``num_tokens`` (N at ``img_size``),
    ``img_size`` (input size; the step resizes when it differs from the student's), ``fp16_weights``, ``bf16``,
    ``weights`` (the file, or 'random') and ``sha256`` (of that file; None for random weights).

    No parameter requires grad and the module never leaves eval mode (see :meth:`train`).
    """

    def __init__(self, model: nn.Module, *, kind: str, img_size: int, model_name: str = "",
                 weights: str = "random", fp16_weights: bool = False, bf16: bool = False,
                 sha256: Optional[str] = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown teacher kind {kind!r}; expected one of {TEACHER_KINDS}")
        info = KINDS[kind]
        self.model = model
        self.kind = kind
        self.family = info.family
        self.mean = info.mean
        self.std = info.std
        self.img_size = int(img_size)
        self.model_name = model_name
        self.weights = weights
        self.sha256 = sha256
        self.fp16_weights = bool(fp16_weights)
        self.bf16 = bool(bf16)
        if self.bf16:
            model.to(torch.bfloat16)
        self.embed_dim = int(model.num_features)
        self.num_tokens = _num_output_tokens(model, info.family)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "Teacher":
        # The official FD calls feature_model.eval() in every forward: teacher dropout and drop path are never
        # active, whatever mode the surrounding trainer switches to. Ignoring `mode` makes that a property of
        # the module instead of a call every user has to remember.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The teacher never needs gradients; no_grad also keeps a caller that forgot it from building a graph.
        with torch.no_grad():
            if self.fp16_weights:
                # Weights of convs/linears are stored in fp16 (like CLIP's convert_weights); autocast feeds them
                # fp16 activations while LayerNorm runs in fp32, which is what CLIP's fp32 LayerNorm subclass
                # does. This nested autocast deliberately overrides a caller's bf16 autocast.
                with torch.autocast(device_type=x.device.type, dtype=torch.float16):
                    out = self.model.forward_features(x)
            elif self.bf16:
                # outside autocast: under it, LayerNorm would return fp32 and every linear cast it back
                with torch.autocast(device_type=x.device.type, enabled=False):
                    out = self.model.forward_features(x.to(torch.bfloat16))
            else:
                out = self.model.forward_features(x)
        if self.family == "swin":
            out = out.flatten(1, 2)  # timm Swin returns NHWC (B,h,w,C); FD's tokens are row-major h*w
        return out

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, model={self.model_name!r}, weights={self.weights!r}, img_size={self.img_size}, "
                f"tokens={self.num_tokens}x{self.embed_dim}, fp16_weights={self.fp16_weights}, bf16={self.bf16}")


def _num_output_tokens(model: nn.Module, family: str) -> int:
    # Computed from the geometry timm already resolved (patch grid, clamped Swin stages); no forward needed.
    if family == "vit":
        return int(model.patch_embed.num_patches + model.num_prefix_tokens)
    h, w = model.layers[-1].output_resolution
    return int(h * w)


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def build_teacher(cfg: Any, student_img_size: int, *, trust_pickle: bool = False) -> Teacher:
    """Build the frozen teacher described by a ``TeacherConfig``.

    The architecture is ``timm.create_model(cfg.model, pretrained=False, num_classes=0, img_size=...,
    **cfg.model_kwargs)`` at ``cfg.img_size`` (default: the student's size). ``cfg.weights`` is the original
    release file (read with :func:`load_teacher_state_dict` and loaded strictly) or ``'random'`` for timm's
    random init (demos, tests, benchmarks). ``cfg.fp16_weights`` stores conv/linear weights in fp16 and runs
    the forward under fp16 autocast, as the official CLIP teacher does on CUDA; it is pointless on CPU.
    ``trust_pickle`` is the command's ``--trust-pickle`` (see :mod:`fdfast.interop.reading`'s load policy).
    """
    kind = cfg.kind
    img_size = int(cfg.img_size or student_img_size)
    kwargs = dict(cfg.model_kwargs or {})
    try:
        model = timm.create_model(cfg.model, pretrained=False, num_classes=0, img_size=img_size, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"model.teacher.model={cfg.model!r} is not a timm model name ({e})") from None
        raise
    _check_family(model, kind, cfg.model)
    weights, sha256 = str(cfg.weights), None
    if weights != "random":
        file = read_teacher_file(kind, weights, model=model, model_name=cfg.model, trust_pickle=trust_pickle)
        model.load_state_dict(file.state_dict, strict=True)  # keys and shapes were checked, with clear errors
        sha256 = file.sha256
    if cfg.fp16_weights:
        _convert_weights_to_fp16(model)
    return Teacher(model, kind=kind, img_size=img_size, model_name=cfg.model, weights=weights,
                   fp16_weights=cfg.fp16_weights, bf16=cfg.bf16, sha256=sha256)


def _check_family(model: nn.Module, kind: str, name: str) -> None:
    info = KINDS[kind]
    if info.family == "vit" and not isinstance(model, timm_vit.VisionTransformer):
        raise ConfigError(f"model.teacher.kind={kind!r} needs a timm VisionTransformer, but model.teacher.model="
                         f"{name!r} builds {type(model).__name__}")
    if info.family == "swin" and not isinstance(model, timm_swin.SwinTransformer):
        raise ConfigError(f"model.teacher.kind='esvit' needs a timm Swin v1 SwinTransformer (e.g. "
                         f"'swin_base_patch4_window7_224' with model_kwargs window_size: 14), but "
                         f"model.teacher.model={name!r} builds {type(model).__name__}")


def _convert_weights_to_fp16(model: nn.Module) -> None:
    # Mirrors CLIP's convert_weights: conv/linear weights and biases only; LayerNorm affine, cls token and
    # position embeddings stay fp32 (timm's attention uses nn.Linear for qkv/proj, so those are covered).
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.half()
            if m.bias is not None:
                m.bias.data = m.bias.data.half()


