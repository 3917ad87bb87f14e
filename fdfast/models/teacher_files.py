"""Reading the ORIGINAL teacher release files into timm state dicts, verified and under the load policy.

The file layouts are the ones FD's loaders read (spec §4); the conversion is timm's own. Every file is read
by :func:`fdfast.interop.reading.load_torch_file` (weights-only; OpenAI's TorchScript archives without
``torch.jit.load``), and its SHA-256 is computed once (cached by size and mtime, see
:mod:`.release_hashes`): a file named like a release whose hash is published (OpenAI's ``ViT-B-16.pt`` /
``ViT-L-14.pt``) must match it, and the hash of any file is handed to the caller for the run's records.

Loading is strict: after timm's converters every key of the file must land in the model and every model
parameter must come from the file, except an explicit per-kind list of keys the teacher does not use (the
CLIP projection, the DeiT classifier, the EsViT DINO heads, Swin's recomputed buffers). Anything else raises
:class:`TeacherLoadError` naming the file, the kind and the offending keys.
"""
from __future__ import annotations

import math
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Optional

import timm
import torch
import torch.nn as nn
from timm.layers import QuickGELU
from timm.models import swin_transformer as timm_swin
from timm.models import vision_transformer as timm_vit

from ..constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from ..interop.conversion import shape_mismatches, state_dict_mismatch
from ..interop.reading import (CheckpointReadError, UnsafePickleError, is_torchscript_archive, load_torch_file,
                               strip_wrapper_prefixes)
from .release_hashes import KNOWN_SHA256, file_sha256

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


KINDS = {
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
# Reading release files
# ----------------------------------------------------------------------------------------------
class TeacherFile(NamedTuple):
    state_dict: dict  # timm keys, checked against the model
    sha256: str  # of the file as read


def load_teacher_state_dict(kind: str, path: str | os.PathLike, model: Optional[nn.Module] = None,
                            model_name: str = "", *, trust_pickle: bool = False) -> dict:
    """The timm-keyed state dict of :func:`read_teacher_file`."""
    return read_teacher_file(kind, path, model, model_name, trust_pickle=trust_pickle).state_dict


def read_teacher_file(kind: str, path: str | os.PathLike, model: Optional[nn.Module] = None,
                      model_name: str = "", *, trust_pickle: bool = False) -> TeacherFile:
    """Read an ORIGINAL teacher release file: its timm-keyed state dict and its SHA-256.

    The conversion is timm's own (``vision_transformer._convert_openai_clip`` + ``checkpoint_filter_fn``,
    ``swin_transformer.checkpoint_filter_fn``). Keys the teacher does not use are dropped: CLIP's ``proj``
    (timm ``head``), DeiT's ``head.*``, EsViT's ``head.*``/``head_dense.*`` and Swin's
    ``relative_position_index``/``attn_mask`` buffers (recomputed by timm).

    With ``model`` (the timm model about to be loaded) the result is adapted and checked against it: absolute
    position embeddings are resampled bicubically to its patch grid when ``img_size`` differs from the
    file's (as FD's CLIP loader does for B/16), and every key and shape must match, so
    ``model.load_state_dict(sd, strict=True)`` succeeds. Without ``model`` the file's own geometry is kept
    (nothing is resampled) and the keys are checked against a meta-device model of that geometry.

    CLIP's fp16 tensors are returned as fp32. ``trust_pickle`` is the command's ``--trust-pickle``. Raises
    :class:`TeacherLoadError` for a missing file, a release file whose hash differs from the published one,
    a file of another kind, an architecture mismatch or leftover/missing keys, and
    :class:`~fdfast.interop.reading.UnsafePickleError` for a file the load policy refuses.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown teacher kind {kind!r}; expected one of {TEACHER_KINDS}")
    info = KINDS[kind]
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "not found"
        raise TeacherLoadError(
            f"teacher weights file {what}: {path} (config key {_WEIGHTS_KEY}; point it at {info.expected} for "
            f"teacher kind {kind!r}, or set it to 'random' for an untrained teacher)")
    sha256 = verified_sha256(path)
    obj, is_jit = read_release_object(path, trust_pickle)
    layout, description = _identify(obj, is_jit)
    if layout != kind:
        raise TeacherLoadError(
            f"{path}: this looks like {description}, but model.teacher.kind={kind!r} expects {info.expected}. "
            + (f"Set model.teacher.kind={layout!r} (and a matching model.teacher.model), or point "
               f"{_WEIGHTS_KEY} at the right file." if layout in KINDS else
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
    return TeacherFile(sd, sha256)


def verified_sha256(path: Path) -> str:
    try:
        digest = file_sha256(path)
    except OSError as e:
        raise TeacherLoadError(f"{path}: cannot read the teacher weights file ({e})") from None
    expected = KNOWN_SHA256.get(path.name)
    if expected is not None and digest != expected:
        damaged = ("" if zipfile.is_zipfile(path) else
                   " It is not a readable PyTorch checkpoint either: an interrupted or failed download?")
        raise TeacherLoadError(
            f"{path}: SHA-256 {digest} differs from {expected}, the hash OpenAI publishes for {path.name}.{damaged}"
            f" Download the file again, or, if it is deliberately another checkpoint, rename it so that its name "
            f"does not claim to be {path.name}.")
    return digest


def read_release_object(path: Path, trust_pickle: bool) -> tuple[Any, bool]:
    """(object, is_torchscript) under the load policy; mmap leaves a training checkpoint's optimizer and EMA
    parts unread. TorchScript archives (OpenAI CLIP) come back as their state dict."""
    try:
        return load_torch_file(path, trust_pickle=trust_pickle, mmap=True), is_torchscript_archive(path)
    except UnsafePickleError:
        raise
    except CheckpointReadError as e:
        raise TeacherLoadError(f"{e} (config key {_WEIGHTS_KEY})") from None


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
        s = strip_wrapper_prefixes(student)
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
        if _is_swin(strip_wrapper_prefixes(model)):
            return "swin", ("a Swin classifier checkpoint ({'model': Swin keys}); the EsViT teacher reads "
                            "{'student': ...} from an EsViT checkpoint")
    if _is_vit(obj):
        return "dino", "a DINO backbone checkpoint (flat timm-style ViT keys)"
    if _is_swin(strip_wrapper_prefixes(obj)):
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
        sd = strip_wrapper_prefixes(obj["student"])
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
        if KINDS[kind].family == "vit":
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
    family = KINDS[kind].family
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
        have = "has a" if fp["pre_norm"] else "has no"
        raise TeacherLoadError(
            f"{path}: the file {have} pre-transformer LayerNorm (CLIP's ln_pre = timm norm_pre) but "
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
            f"{'; '.join(parts)}. Expected {KINDS[kind].expected}.")
    bad = list(shape_mismatches(sd, model_sd, keys=[k for k in model_sd if torch.is_tensor(sd[k])]).values())
    if bad:
        raise TeacherLoadError(
            f"{path}: {len(bad)} tensors have the wrong shape for model.teacher.model={model_name!r} "
            f"(e.g. {'; '.join(bad[:4])}); the file was trained with a different architecture.")
