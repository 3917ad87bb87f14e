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

Loading is strict: after timm's converters every key of the file must land in the model and every model
parameter must come from the file, except an explicit per-kind list of keys the teacher does not use (the
CLIP projection, the DeiT classifier, the EsViT DINO heads, Swin's recomputed buffers). Anything else raises
:class:`TeacherLoadError` naming the file, the kind and the offending keys.

Checked against the FD repo's own model code (random weights, fp32, CPU): CLIP B/16 at 224/256/192 and L/14,
and EsViT Swin-B w14 match exactly; DINO/DeiT ViT-B match to 4e-6, because timm uses fused attention.

Precision: weights are fp32 unless ``fp16_weights`` is set. Then conv/linear weights are stored in fp16, as
CLIP's ``convert_weights`` does, and the forward runs under fp16 autocast. Use it on CUDA only. With random
B/16 weights it stays within the official fp16 CLIP's own fp16 noise (max 1.2e-2).
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from timm.layers import QuickGELU
from timm.models import swin_transformer as timm_swin
from timm.models import vision_transformer as timm_vit

from ..constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError, UserError
from ..interop import shape_mismatches, state_dict_mismatch

__all__ = ["Teacher", "TeacherLoadError", "build_teacher", "load_teacher_state_dict", "TEACHER_KINDS"]

TEACHER_KINDS = ("clip", "dino", "deit", "esvit")
_WEIGHTS_KEY = "model.teacher.weights"


class TeacherLoadError(UserError, ValueError):
    """A teacher weights file that cannot be used as configured; the message names the file and the fix."""


@dataclass(frozen=True)
class _KindInfo:
    family: str  # "vit" (timm VisionTransformer) or "swin" (timm SwinTransformer v1)
    mean: tuple
    std: tuple
    expected: str  # what the release file looks like, for error messages


_KINDS = {
    "clip": _KindInfo("vit", CLIP_MEAN, CLIP_STD,
                      "an OpenAI CLIP TorchScript archive (ViT-B-16.pt / ViT-L-14.pt) whose state dict has "
                      "'visual.*' keys (class_embedding, conv1, ln_pre, transformer.resblocks.*, ln_post, proj)"),
    "dino": _KindInfo("vit", IMAGENET_MEAN, IMAGENET_STD,
                      "the DINO backbone file dino_vitbase16_pretrain.pth: a flat state dict of timm-style ViT "
                      "keys (cls_token, pos_embed, patch_embed.proj.*, blocks.*, norm.*), no head"),
    "deit": _KindInfo("vit", IMAGENET_MEAN, IMAGENET_STD,
                      "the DeiT release file deit_base_patch16_224-b5f2ef4d.pth: {'model': {ViT keys + head.*}}"),
    "esvit": _KindInfo("swin", IMAGENET_MEAN, IMAGENET_STD,
                       "an EsViT training checkpoint (checkpoint_best.pth): {'student': {'module.' + Swin v1 "
                       "keys, head.*, head_dense.*}, 'teacher': ..., ...}"),
}

# timm architectures of the official teachers, keyed by what the file reveals; used for error hints.
_KNOWN_ARCHS = {
    ("clip", 768, 16, 12): "vit_base_patch16_clip_quickgelu_224",
    ("clip", 768, 32, 12): "vit_base_patch32_clip_quickgelu_224",
    ("clip", 1024, 14, 24): "vit_large_patch14_clip_quickgelu_224",
    ("dino", 768, 16, 12): "vit_base_patch16_224",
    ("dino", 768, 8, 12): "vit_base_patch8_224",
    ("dino", 384, 16, 12): "vit_small_patch16_224",
    ("deit", 768, 16, 12): "deit_base_patch16_224",
    ("deit", 384, 16, 12): "deit_small_patch16_224",
    ("esvit", 128, 4, (2, 2, 18, 2)): "swin_base_patch4_window7_224 with model_kwargs {window_size: 14}",
}


# ----------------------------------------------------------------------------------------------
# The teacher module
# ----------------------------------------------------------------------------------------------
class Teacher(nn.Module):
    """Frozen teacher: ``forward(x)`` takes the *teacher-normalised* float image batch (B,3,H,W) with
    H = W = ``img_size`` and returns the final-norm output tokens (B, N, D): all tokens, CLS included for
    ViTs; 7x7 = 49 x 1024 for the EsViT Swin-B at 224.

    Attributes: ``kind`` (clip | dino | deit | esvit), ``mean``/``std`` (the normalisation this teacher
    expects: CLIP's for clip, ImageNet's otherwise), ``embed_dim`` (D), ``num_tokens`` (N at ``img_size``),
    ``img_size`` (input size; the step resizes when it differs from the student's), ``fp16_weights``.

    No parameter requires grad and the module never leaves eval mode (see :meth:`train`).
    """

    def __init__(self, model: nn.Module, *, kind: str, img_size: int, model_name: str = "",
                 weights: str = "random", fp16_weights: bool = False):
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"unknown teacher kind {kind!r}; expected one of {TEACHER_KINDS}")
        info = _KINDS[kind]
        self.model = model
        self.kind = kind
        self.family = info.family
        self.mean = info.mean
        self.std = info.std
        self.img_size = int(img_size)
        self.model_name = model_name
        self.weights = weights
        self.fp16_weights = bool(fp16_weights)
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
            else:
                out = self.model.forward_features(x)
        if self.family == "swin":
            out = out.flatten(1, 2)  # timm Swin returns NHWC (B,h,w,C); FD's tokens are row-major h*w
        return out

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, model={self.model_name!r}, weights={self.weights!r}, img_size={self.img_size}, "
                f"tokens={self.num_tokens}x{self.embed_dim}, fp16_weights={self.fp16_weights}")


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
    ``trust_pickle`` is ``model.trust_pickle`` (see :mod:`fdfast.interop`'s load policy).
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
    weights = str(cfg.weights)
    if weights != "random":
        state_dict = load_teacher_state_dict(kind, weights, model=model, model_name=cfg.model)
        model.load_state_dict(state_dict, strict=True)  # keys and shapes were checked above, with clear errors
    if cfg.fp16_weights:
        _convert_weights_to_fp16(model)
    return Teacher(model, kind=kind, img_size=img_size, model_name=cfg.model, weights=weights,
                   fp16_weights=cfg.fp16_weights)


def _check_family(model: nn.Module, kind: str, name: str) -> None:
    info = _KINDS[kind]
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


# ----------------------------------------------------------------------------------------------
# Reading release files
# ----------------------------------------------------------------------------------------------
def load_teacher_state_dict(kind: str, path: str | os.PathLike, model: Optional[nn.Module] = None,
                            model_name: str = "") -> dict:
    """Read an ORIGINAL teacher release file and return a timm-keyed state dict.

    The file layouts are the ones FD's loaders read (spec §4); the conversion is timm's own
    (``vision_transformer._convert_openai_clip`` + ``checkpoint_filter_fn``, ``swin_transformer.
    checkpoint_filter_fn``). Keys the teacher does not use are dropped: CLIP's ``proj`` (timm ``head``),
    DeiT's ``head.*``, EsViT's ``head.*``/``head_dense.*`` and Swin's ``relative_position_index``/
    ``attn_mask`` buffers (recomputed by timm).

    With ``model`` (the timm model about to be loaded) the result is adapted and checked against it: absolute
    position embeddings are resampled bicubically to its patch grid when ``img_size`` differs from the
    file's (as FD's CLIP loader does for B/16), and every key and shape must match, so
    ``model.load_state_dict(sd, strict=True)`` succeeds. Without ``model`` the file's own geometry is kept
    (nothing is resampled) and the keys are checked against a meta-device model of that geometry.

    CLIP's fp16 tensors are returned as fp32. Raises :class:`TeacherLoadError` for a missing file, a file of
    another kind, an architecture mismatch or leftover/missing keys.
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown teacher kind {kind!r}; expected one of {TEACHER_KINDS}")
    info = _KINDS[kind]
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise TeacherLoadError(
            f"teacher weights file {what}: {path} (config key {_WEIGHTS_KEY}; point it at {info.expected} for "
            f"teacher kind {kind!r}, or set it to 'random' for an untrained teacher)")
    obj, is_jit = _read_file(path)
    layout, description = _identify(obj, is_jit)
    if layout != kind:
        raise TeacherLoadError(
            f"{path}: this looks like {description}, but model.teacher.kind={kind!r} expects {info.expected}. "
            + (f"Set model.teacher.kind={layout!r} (and a matching model.teacher.model), or point "
               f"{_WEIGHTS_KEY} at the right file." if layout in _KINDS else
               f"Point {_WEIGHTS_KEY} at the original {kind!r} release file."))

    sd = _unwrap(kind, obj)
    fp = _fingerprint(info.family, sd)
    if model is None:
        model = _reference_model(kind, fp)
        model_name = model_name or "(geometry of the file)"
    model_name = model_name or type(model).__name__
    _check_architecture(kind, path, fp, model, model_name, is_jit)

    if info.family == "vit":
        # FD's CLIP loader interpolates pos embeddings with F.interpolate(bicubic, align_corners=False) and no
        # antialias. timm's filter defaults to antialias=True, whose bicubic kernel differs (a=-0.5 vs -0.75),
        # so growing the grid would differ too, not only shrinking it.
        sd = timm_vit.checkpoint_filter_fn(sd, model, interpolation="bicubic", antialias=False)
    else:
        # Maps Microsoft/EsViT Swin v1 (downsample at the end of stage s) onto timm (start of stage s+1) and
        # drops the relative_position_index / attn_mask buffers, which timm recomputes.
        sd = timm_swin.checkpoint_filter_fn(sd, model)

    model_sd = model.state_dict()
    if kind == "clip":
        # OpenAI's visual.proj (width -> joint embedding) is the image-text projection; FD's target is
        # ln_post(tokens) without it. timm maps it to head.weight/head.bias, absent from a headless model.
        for k in ("head.weight", "head.bias"):
            if k not in model_sd:
                sd.pop(k, None)
    _check_keys(kind, path, sd, model_sd, model_name)
    return sd


def _read_file(path: Path) -> tuple[Any, bool]:
    """Returns (object, is_torchscript). TorchScript archives (OpenAI CLIP) are read with torch.jit.load."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        # torch.save zips hold data.pkl + data/; TorchScript archives additionally hold code/ and constants.pkl
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            with warnings.catch_warnings():
                # torch >= 2.9 flags torch.jit as deprecated; it is still the only reader of OpenAI's .pt files
                warnings.simplefilter("ignore", FutureWarning)
                try:
                    module = torch.jit.load(str(path), map_location="cpu")
                except RuntimeError as e:
                    raise TeacherLoadError(f"{path}: cannot read this TorchScript archive ({e})") from None
            return dict(module.state_dict()), True
    mmap = zipfile.is_zipfile(path)  # mmap avoids reading the optimizer/EMA parts of training checkpoints

    def load(weights_only: bool):
        return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=mmap)

    try:
        try:
            return load(True), False
        except pickle.UnpicklingError as e:
            if "Unsupported global" not in str(e):  # torch wraps every weights_only failure, garbage included
                raise
        # EsViT/DINO training checkpoints pickle their argparse.Namespace next to the tensors.
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return load(True), False
        except pickle.UnpicklingError as e:
            if "Unsupported global" not in str(e):
                raise
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            reason = f"it pickles {m.group(1)}" if m else "it pickles non-tensor objects"
    except Exception as e:  # corrupt / truncated / not a torch file at all
        raise TeacherLoadError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from None
    warnings.warn(f"{path}: {reason}, so it is loaded with weights_only=False, which can run arbitrary code from "
                  "the file: only use files from a trusted source (the official FD loaders do the same)",
                  stacklevel=3)
    return load(False), False


def _strip_module(d: dict) -> dict:
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in d.items()}


def _is_vit(d: dict) -> bool:
    return "cls_token" in d and "patch_embed.proj.weight" in d and any(k.startswith("blocks.") for k in d)


def _is_swin(d: dict) -> bool:
    return "patch_embed.proj.weight" in d and any(re.match(r"layers\.\d+\.blocks\.\d+\.", k) for k in d)


def _identify(obj: Any, is_jit: bool) -> tuple[str, str]:
    """Recognise a file's layout; returns (tag, human description). Tags equal to a kind are release files."""
    if not isinstance(obj, dict):
        return "unknown", f"a pickled {type(obj).__name__}, not a state dict"
    if "visual.class_embedding" in obj or "module.visual.class_embedding" in obj:
        return "clip", "an OpenAI CLIP checkpoint ('visual.*' keys)"
    if is_jit:
        return "unknown", "a TorchScript archive without CLIP 'visual.*' keys"
    student = obj.get("student")
    if isinstance(student, dict):
        s = _strip_module(student)
        if _is_swin(s):
            return "esvit", "an EsViT checkpoint ({'student': Swin keys})"
        if any(k.startswith("backbone.") for k in s):
            return "ssl", ("a DINO/EsViT *training* checkpoint ({'student': {'module.backbone.*'}}); the DINO "
                           "teacher reads the backbone-only release file dino_vitbase16_pretrain.pth")
    model = obj.get("model")
    if isinstance(model, dict):
        if any(k.startswith("encoder.") for k in model):
            return "fd", "an FD training checkpoint / distilled student ('encoder.*' keys), not a teacher file"
        if _is_vit(model):
            return "deit", "a DeiT checkpoint ({'model': ViT keys})"
        if _is_swin(_strip_module(model)):
            return "swin", ("a Swin classifier checkpoint ({'model': Swin keys}); the EsViT teacher reads "
                            "{'student': ...} from an EsViT checkpoint")
    if _is_vit(obj):
        return "dino", "a DINO backbone checkpoint (flat timm-style ViT keys)"
    if _is_swin(_strip_module(obj)):
        return "swin", ("a bare Swin state dict; the EsViT teacher reads EsViT's {'student': {...}} layout "
                        "(wrap it as {'student': state_dict} if it is EsViT's online network)")
    if any(k.startswith("encoder.") for k in obj):
        return "fd", "an FD student state dict ('encoder.*' keys), not a teacher file"
    keys = ", ".join(list(map(str, obj))[:6])
    return "unknown", f"an unrecognised checkpoint (top-level keys: {keys})"


def _unwrap(kind: str, obj: dict) -> dict:
    """Release-file object -> flat state dict for timm's filter, minus keys the teacher never uses."""
    if kind == "clip":
        prefix = "visual." if "visual.class_embedding" in obj else "module.visual."
        # timm's converter; it keeps only `prefix` keys, so the text tower and the scalar entries
        # (input_resolution, context_length, vocab_size, logit_scale) are left behind here.
        sd = timm_vit._convert_openai_clip(obj, None, prefix=prefix)
    elif kind == "dino":
        sd = dict(obj)  # FD loads it strict: nothing to drop
    elif kind == "deit":
        sd = dict(obj["model"])  # FD: torch.load(...)['model'], strict=False to skip the classifier
    else:
        # FD: torch.load(...)['student'] (the online network, not the EMA teacher), 'module.' stripped,
        # strict=False to skip the DINO projection heads.
        sd = _strip_module(obj["student"])
    if kind in ("deit", "esvit"):
        sd = {k: v for k, v in sd.items() if not (k.startswith("head.") or k.startswith("head_dense."))}
    # Release files store fp16 (CLIP) or fp32; work in fp32 so resampling is exact and fp16_weights is a
    # separate, explicit choice.
    return {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------
# Architecture checks (before timm's filter, which would otherwise silently resample mismatched shapes)
# ----------------------------------------------------------------------------------------------
def _fingerprint(family: str, sd: dict) -> dict:
    """What the file says about its architecture, read from tensor shapes (timm key names)."""
    w = sd.get("patch_embed.proj.weight")
    if w is None or w.ndim != 4:
        return {}
    fp: dict = {"embed_dim": int(w.shape[0]), "patch_size": int(w.shape[-1])}
    if family == "vit":
        fp["depth"] = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
        fp["pre_norm"] = "norm_pre.weight" in sd
        pos = sd.get("pos_embed")
        if pos is not None:
            n_prefix = 1 + int("dist_token" in sd)
            fp["grid"] = int(round(math.sqrt(pos.shape[1] - n_prefix)))
        fc1 = sd.get("blocks.0.mlp.fc1.weight")
        fp["mlp_ratio"] = fc1.shape[0] / fp["embed_dim"] if fc1 is not None else 4.0
        fp["qkv_bias"] = "blocks.0.attn.qkv.bias" in sd
    else:
        stages: dict = {}
        for k, v in sd.items():
            m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table$", k)
            if m:
                s, b = int(m.group(1)), int(m.group(2))
                side = int(round(math.sqrt(v.shape[0])))
                stages.setdefault(s, {})[b] = ((side + 1) // 2, int(v.shape[1]))  # (window, heads)
        order = sorted(stages)
        fp["depths"] = tuple(len(stages[s]) for s in order)
        fp["windows"] = tuple(stages[s][0][0] for s in order)
        fp["heads"] = tuple(stages[s][0][1] for s in order)
        fc1 = sd.get("layers.0.blocks.0.mlp.fc1.weight")
        fp["mlp_ratio"] = fc1.shape[0] / fp["embed_dim"] if fc1 is not None else 4.0
    return fp


def _model_fingerprint(family: str, model: nn.Module) -> dict:
    fp: dict = {"embed_dim": int(model.patch_embed.proj.weight.shape[0]),
                "patch_size": int(model.patch_embed.proj.weight.shape[-1])}
    if family == "vit":
        fp["depth"] = len(model.blocks)
        fp["pre_norm"] = not isinstance(model.norm_pre, nn.Identity)
    else:
        fp["depths"] = tuple(len(stage.blocks) for stage in model.layers)
        fp["windows"] = tuple(int(stage.blocks[0].window_size[0]) for stage in model.layers)
        fp["heads"] = tuple(int(stage.blocks[0].attn.num_heads) for stage in model.layers)
    return fp


def _reference_model(kind: str, fp: dict) -> nn.Module:
    """A meta-device timm model with the file's own geometry (for timm's filters when no model is given)."""
    if not fp:
        raise TeacherLoadError("cannot read the architecture from the file (no 4-D patch_embed.proj.weight)")
    with torch.device("meta"):
        if _KINDS[kind].family == "vit":
            p, grid = fp["patch_size"], fp.get("grid", 14)
            return timm_vit.VisionTransformer(
                img_size=p * grid, patch_size=p, embed_dim=fp["embed_dim"], depth=fp["depth"], num_heads=1,
                mlp_ratio=fp["mlp_ratio"], qkv_bias=fp["qkv_bias"], pre_norm=fp["pre_norm"], num_classes=0,
                act_layer="quick_gelu" if kind == "clip" else None)
        windows, n = fp["windows"], len(fp["windows"])
        big = max(windows)
        # Swin v1 clamps the window to the feature map when the map is not larger; choose the input size that
        # reproduces the file's per-stage windows (no clamping at all if every stage uses the full window).
        img = fp["patch_size"] * 2 ** (n - 1) * big
        for s, w in enumerate(windows):
            if w < big:
                img = fp["patch_size"] * 2 ** s * w
                break
        return timm_swin.SwinTransformer(
            img_size=img, patch_size=fp["patch_size"], embed_dim=fp["embed_dim"], depths=fp["depths"],
            num_heads=fp["heads"], window_size=big, mlp_ratio=fp["mlp_ratio"], num_classes=0)


def _suggest(kind: str, fp: dict) -> str:
    key = (kind, fp.get("embed_dim"), fp.get("patch_size"),
           fp.get("depth") if "depth" in fp else fp.get("depths"))
    name = _KNOWN_ARCHS.get(key)
    return f" This file matches timm '{name}'." if name else ""


def _check_architecture(kind: str, path: Path, fp: dict, model: nn.Module, model_name: str, is_jit: bool) -> None:
    family = _KINDS[kind].family
    if not fp:
        return  # the key check below reports the missing patch embedding
    mfp = _model_fingerprint(family, model)
    fields = ("embed_dim", "patch_size", "depth") if family == "vit" else (
        "embed_dim", "patch_size", "depths", "heads")
    diffs = [f"{f}: file {fp[f]} vs model {mfp[f]}" for f in fields if f in fp and fp[f] != mfp[f]]
    if diffs:
        raise TeacherLoadError(
            f"{path}: the {kind!r} file does not fit model.teacher.model={model_name!r} "
            f"(with model.teacher.model_kwargs): {'; '.join(diffs)}.{_suggest(kind, fp)}")
    if family == "vit" and fp.get("pre_norm") != mfp["pre_norm"]:
        have = "has" if fp["pre_norm"] else "has no"
        raise TeacherLoadError(
            f"{path}: the file {have} a pre-transformer LayerNorm (CLIP's ln_pre = timm norm_pre) but "
            f"model.teacher.model={model_name!r} {'does not' if fp['pre_norm'] else 'does'}; "
            f"use a '*_clip_quickgelu_*' model for CLIP files and a plain ViT for DINO/DeiT.{_suggest(kind, fp)}")
    if family == "swin" and fp["windows"] != mfp["windows"]:
        # timm's filter would interpolate the relative position bias tables to the model's windows, which
        # changes a frozen teacher's features; FD's EsViT teacher runs at the file's own window (14 at 224).
        raise TeacherLoadError(
            f"{path}: per-stage attention windows differ: file {fp['windows']} vs model {mfp['windows']} "
            f"(Swin clamps the window to the feature map, so this depends on model.teacher.img_size too). Set "
            f"model.teacher.model_kwargs window_size to {max(fp['windows'])} and model.teacher.img_size to the "
            f"size the file was trained at (224 for EsViT).{_suggest(kind, fp)}")
    if kind == "clip" and is_jit and hasattr(model, "blocks") and len(model.blocks):
        act = getattr(getattr(model.blocks[0], "mlp", None), "act", None)
        if act is not None and not isinstance(act, QuickGELU):
            better = model_name.replace("_clip_", "_clip_quickgelu_") if "_clip_" in model_name else ""
            hint = f" Use {better!r}." if better and better in timm.list_models(better) else (
                " Use a '*_clip_quickgelu_*' timm model.")
            raise TeacherLoadError(
                f"{path}: OpenAI CLIP weights were trained with QuickGELU, but model.teacher.model="
                f"{model_name!r} uses {type(act).__name__}; its features would be wrong by ~4e-2.{hint}")


def _check_keys(kind: str, path: Path, sd: dict, model_sd: dict, model_name: str) -> None:
    missing, unexpected = state_dict_mismatch(sd, model_sd)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} model keys missing from the file (e.g. {', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} file keys the model does not have (e.g. {', '.join(unexpected[:5])})")
        raise TeacherLoadError(
            f"{path}: does not load into teacher kind={kind!r}, model.teacher.model={model_name!r}: "
            f"{'; '.join(parts)}. Expected {_KINDS[kind].expected}.")
    bad = list(shape_mismatches(sd, model_sd, keys=[k for k in model_sd if torch.is_tensor(sd[k])]).values())
    if bad:
        raise TeacherLoadError(
            f"{path}: {len(bad)} tensors have the wrong shape for model.teacher.model={model_name!r} "
            f"(e.g. {'; '.join(bad[:4])}); the file was trained with a different architecture.")
