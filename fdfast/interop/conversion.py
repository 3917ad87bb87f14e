"""Student state dicts between layouts: official FD <-> timm keys, relative position biases for fine-tuning.

:func:`convert_vit_for_finetune` and :func:`convert_swin_for_finetune` reproduce the official fine-tune loader
(``utils.py:load_pretrained``): the ViT's shared relative position bias is copied into every block, tables
are resized when the patch grid changes, the distillation ``norm`` is discarded in favour of a fresh
``fc_norm``; official SwinV2 names are mapped to timm's through timm's own ``checkpoint_filter_fn``.
:func:`official_to_distill_state_dict` maps a whole official FD training state onto ``DistillModel``.

Table resizing (:func:`resize_rel_pos_table`) is the official BEiT recipe: source offsets on a geometric
progression, scipy's cubic spline through them, the 3 CLS rows carried over. scipy is optional; without it
timm's linear resize of the same geometry is used, and a warning says so.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table
from timm.models.beit import Beit
from timm.models.swin_transformer_v2 import SwinTransformerV2, checkpoint_filter_fn

from ..errors import UserError
from .reading import CheckpointReadError, strip_wrapper_prefixes

log = logging.getLogger(__name__)

# Buffers the official modules save but timm rebuilds from the geometry (non-persistent in timm).
OFFICIAL_REBUILT_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")
CLS_ROWS = 3  # cls->token, token->cls, cls->cls: the non-spatial rows at the end of a BEiT table


class CheckpointKeyError(UserError, ValueError):
    """The file's keys do not fit the model (beyond the expected fresh head); names file and keys."""


class CheckpointShapeError(CheckpointKeyError):
    """A key exists in file and model with different shapes: usually a different architecture."""


@dataclass
class Conversion:
    """A converted state dict plus what the conversion did, for the load report."""
    state_dict: dict
    dropped: dict[str, str] = field(default_factory=dict)  # file key -> why it is deliberately not loaded
    resized: dict[str, tuple[tuple, tuple]] = field(default_factory=dict)  # key -> (file shape, new shape)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain timm module inside torch.compile (``_orig_mod``) and DDP / DataParallel (``module``)
    wrappers, so keys never carry the wrapper prefixes."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def detect_arch(model: nn.Module) -> str:
    model = unwrap_model(model)
    if isinstance(model, Beit):
        return "beit"
    if isinstance(model, SwinTransformerV2):
        return "swinv2"
    raise ValueError(f"cannot tell the student family of a {type(model).__name__}; pass arch='beit' or "
                     "arch='swinv2' (timm Beit / SwinTransformerV2)")


def state_dict_mismatch(file_sd: Mapping[str, Any], model_sd: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)``: the model's keys absent from the file (model order) and the file's keys
    absent from the model (file order). Shared by the student loaders and the teacher loader."""
    return [k for k in model_sd if k not in file_sd], [k for k in file_sd if k not in model_sd]


def shape_mismatches(file_sd: Mapping[str, Any], model_sd: Mapping[str, Any],
                     keys: Optional[Iterable[str]] = None) -> dict[str, str]:
    """``{key: "key: file (shape) vs model (shape)"}`` for each of ``keys`` (default: the file's, in its
    order) that both hold with different shapes."""
    return {k: f"{k}: file {tuple(file_sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
            for k in (file_sd if keys is None else keys)
            if k in model_sd and tuple(file_sd[k].shape) != tuple(model_sd[k].shape)}


# ----------------------------------------------------------------------------------------------
# Relative position bias tables
# ----------------------------------------------------------------------------------------------
def beit_source_offsets(src: int, dst: int) -> np.ndarray:
    """BEiT's coordinates of the ``src`` table entries along one axis when resizing to ``dst`` entries:
    0, +-1, +-(1+q), +-(1+q+q^2), ... with q found by bisection so that the outermost lands near dst // 2
    (the last bisection midpoint is used, as in the official code)."""
    left, right = 1.01, 1.5
    while right - left > 1e-6:
        q = (left + right) / 2.0
        if (1.0 - q ** (src // 2)) / (1.0 - q) > dst // 2:
            right = q
        else:
            left = q
    dis = np.cumsum([q ** i for i in range(src // 2)])
    return np.concatenate([-dis[::-1], [0.0], dis])


def resize_rel_pos_table(table: torch.Tensor, new_window: Sequence[int], new_shape: Sequence[int]) -> torch.Tensor:
    """Resize a BEiT ``(rows, heads)`` table to ``new_shape`` for a ``new_window`` patch grid.

    The spatial part is a square ``(2W-1)^2`` grid of offsets; the trailing CLS rows are carried over. Cubic:
    ``RectBivariateSpline(kx=3, ky=3, s=0)`` per head, which computes what the official
    ``interp2d(kind='cubic')`` did (that function is gone from current scipy); evaluated at the integer
    offsets ``arange(-t, t + 0.1)`` with ``t = (2W'-1) // 2``. Without scipy: timm's linear resize.
    """
    dst = (2 * int(new_window[0]) - 1, 2 * int(new_window[1]) - 1)
    extra = int(new_shape[0]) - dst[0] * dst[1]
    side = math.isqrt(max(table.shape[0] - extra, 0))
    if extra < 0 or side * side != table.shape[0] - extra:
        raise ValueError(f"a table of {table.shape[0]} rows is not a square grid plus {extra} CLS rows")
    if (side, side) == dst:
        return table
    if table.is_meta:
        return table.new_empty(tuple(new_shape))
    try:
        from scipy.interpolate import RectBivariateSpline  # noqa: PLC0415 - optional dependency
    except ImportError:
        log.warning("scipy is not installed: resizing relative position bias tables with timm's linear "
                    "interpolation instead of the official cubic one (pip install scipy for the official one)")
        return resize_rel_pos_bias_table(table, new_window_size=tuple(new_window), new_bias_shape=tuple(new_shape))
    ys, xs = beit_source_offsets(side, dst[0]), beit_source_offsets(side, dst[1])
    dy = np.arange(-(dst[0] // 2.0), dst[0] // 2.0 + 0.1, 1.0)
    dx = np.arange(-(dst[1] // 2.0), dst[1] // 2.0 + 0.1, 1.0)
    grid = table[: side * side].detach().float().cpu().numpy().reshape(side, side, -1)
    heads = [RectBivariateSpline(ys, xs, grid[:, :, h], kx=3, ky=3, s=0)(dy, dx).reshape(-1)
             for h in range(grid.shape[2])]
    # float32 like the official torch.Tensor(f(dx, dy)), then the table's own dtype
    spatial = torch.tensor(np.stack(heads, axis=1), dtype=torch.float32).to(table.dtype)
    return torch.cat([spatial, table[side * side:].detach().cpu()]).to(table.device)


# ----------------------------------------------------------------------------------------------
# Converting for fine-tuning
# ----------------------------------------------------------------------------------------------
def convert_vit_for_finetune(sd: Mapping[str, torch.Tensor], model: nn.Module) -> Conversion:
    """Map a BEiT-style ViT state dict onto ``model`` the way the official fine-tune loader does.

    * shared ``rel_pos_bias.relative_position_bias_table`` → a copy in every
      ``blocks.{i}.attn.relative_position_bias_table`` (only when ``model`` has per-block tables; a
      shared-bias model, e.g. the distillation student, keeps the shared table);
    * ``*relative_position_index`` / ``*relative_coords_table`` buffers dropped (timm rebuilds them);
    * tables resized by :func:`resize_rel_pos_table` when the patch grid differs (CLS rows carried over);
    * ``pos_embed`` resampled (bicubic, CLS kept) if both have one and the grids differ;
    * the distillation's final ``norm.*`` dropped when ``model`` pools into a fresh ``fc_norm`` (its
      ``norm`` is Identity), as the official loader discards it; reported in ``Conversion.dropped``.

    The patch embedding is never resampled: a different patch size means a different student.
    """
    out = dict(sd)
    conv = Conversion(out)
    model_sd = model.state_dict()
    for k in [k for k in out if k.endswith(("relative_position_index", "relative_coords_table"))]:
        del out[k]
        conv.dropped[k] = "index/coordinate buffer, rebuilt by the model"

    def resize_table(key: str, v: torch.Tensor, module: nn.Module) -> torch.Tensor:
        target = module.relative_position_bias_table
        if v.shape == target.shape or v.ndim != 2 or v.shape[1] != target.shape[1]:
            return v  # same grid, or a head-count mismatch that the shape check reports
        try:
            new = resize_rel_pos_table(v, module.window_size, target.shape)
        except ValueError as e:
            raise CheckpointShapeError(f"{key}: cannot resize the relative position bias table "
                                       f"{tuple(v.shape)} to {tuple(target.shape)} ({e})") from None
        conv.resized[key] = (tuple(v.shape), tuple(new.shape))
        return new

    shared_key = "rel_pos_bias.relative_position_bias_table"
    blocks = getattr(model, "blocks", [])
    per_block = [getattr(b.attn, "relative_position_bias_table", None) is not None for b in blocks]
    if shared_key in out and getattr(model, "rel_pos_bias", None) is None and blocks and all(per_block):
        # resize once, then copy: identical tables in every block reproduce the shared bias exactly
        table = resize_table(shared_key, out.pop(shared_key), blocks[0].attn)
        for i in range(len(blocks)):
            out[f"blocks.{i}.attn.relative_position_bias_table"] = table.clone()
        conv.dropped[shared_key] = f"copied into blocks.{{0..{len(blocks) - 1}}}.attn.relative_position_bias_table"
        if shared_key in conv.resized:
            conv.resized["blocks.*.attn.relative_position_bias_table"] = conv.resized.pop(shared_key)

    for k in list(out):
        if k.endswith("relative_position_bias_table") and k in model_sd and out[k].shape != model_sd[k].shape:
            out[k] = resize_table(k, out[k], model.get_submodule(k[: -len(".relative_position_bias_table")]))

    pos = out.get("pos_embed")
    if pos is not None and getattr(model, "pos_embed", None) is not None and pos.shape != model.pos_embed.shape:
        new = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=1)
        conv.resized["pos_embed"] = (tuple(pos.shape), tuple(new.shape))
        out["pos_embed"] = new

    if "norm.weight" not in model_sd and "fc_norm.weight" in model_sd:
        for k in ("norm.weight", "norm.bias"):
            if k in out:
                del out[k]
                conv.dropped[k] = ("final LayerNorm of the distilled student; the fine-tune model pools into "
                                   "a fresh fc_norm (the official loader discards it too)")
    return conv


def convert_swin_for_finetune(sd: Mapping[str, torch.Tensor], model: nn.Module) -> Conversion:
    """Map an official-FD or timm SwinV2 state dict onto a timm ``SwinTransformerV2``.

    * ``rpe_mlp`` → ``cpb_mlp`` (same MLP: Linear(2,512)+ReLU+Linear(512,heads, no bias));
    * shared-CPB variant (``layers.{l}.rel_pos_bias.rpe_mlp.*``, not used by the released configs): copied
      into every block of stage ``l``, as the official loader does;
    * then timm's ``swin_transformer_v2.checkpoint_filter_fn``: drops the ``relative_position_index``,
      ``relative_coords_table`` and ``attn_mask`` buffers (the model regenerates them for its own window and
      resolution; the continuous position bias is an MLP, so nothing needs resizing), and, when
      ``layers.0.downsample`` exists (the official layout, where PatchMerging ends stage i), moves
      ``layers.{i}.downsample`` to ``layers.{i+1}.downsample`` and ``head.`` to ``head.fc.``. A file already in
      timm layout passes through unchanged.

    The patch embedding is checked rather than resampled (timm's filter would silently resample it).
    """
    src = {k.replace(".rpe_mlp.", ".cpb_mlp."): v for k, v in sd.items()}
    conv = Conversion({})
    shared = re.compile(r"^layers\.(\d+)\.rel_pos_bias\.cpb_mlp\.(.+)$")
    for k in [k for k in src if shared.match(k)]:
        stage, rest = shared.match(k).groups()
        v = src.pop(k)
        n_blocks = len(model.layers[int(stage)].blocks) if int(stage) < len(model.layers) else 0
        for b in range(n_blocks):
            src.setdefault(f"layers.{stage}.blocks.{b}.attn.cpb_mlp.{rest}", v.clone())
        conv.dropped[k] = f"shared CPB copied into the {n_blocks} blocks of stage {stage}"
    for k in [k for k in src if k.startswith("layers.") and ".rel_pos_bias." in k]:
        conv.dropped[k] = "shared-CPB buffer, rebuilt by the model"
        del src[k]

    pe = "patch_embed.proj.weight"
    if pe in src and pe in model.state_dict() and src[pe].shape != model.state_dict()[pe].shape:
        raise CheckpointShapeError(
            f"{pe}: file {tuple(src[pe].shape)} vs model {tuple(model.state_dict()[pe].shape)}: the file was "
            "written for another patch size / width; match model.student.patch_size and embed_dim to it")
    for k in src:
        if any(b in k for b in OFFICIAL_REBUILT_BUFFERS):
            conv.dropped[k] = "buffer, rebuilt by the model"
    conv.state_dict = checkpoint_filter_fn(src, model)
    return conv


# ----------------------------------------------------------------------------------------------
# Official FD training state <-> DistillModel (student + projector)
# ----------------------------------------------------------------------------------------------
def normalise_projector(sd: Mapping[str, torch.Tensor], path: Path) -> dict:
    """Linear-style ``{'weight': [Dt, Ds], 'bias': [Dt]}`` from Linear or official Conv1d keys."""
    sd = {k[2:] if k.startswith("0.") else k: v for k, v in strip_wrapper_prefixes(sd).items()}
    if set(sd) != {"weight", "bias"}:
        raise CheckpointReadError(f"{path}: projector keys {sorted(sd)} are not weight/bias of one layer")
    w = sd["weight"]
    if w.ndim == 3 and w.shape[-1] == 1:  # official Conv1d(Ds, Dt, 1)
        w = w.squeeze(-1)
    if w.ndim != 2:
        raise CheckpointReadError(f"{path}: projector weight has shape {tuple(sd['weight'].shape)}, "
                                  "expected [Dt, Ds] or [Dt, Ds, 1]")
    return {"weight": w, "bias": sd["bias"]}


def official_to_distill_state_dict(sd: Mapping[str, Any]) -> dict:
    """Map an official FD ``model`` state dict onto ``DistillModel.state_dict()`` keys.

    ``sd`` is ``FD.state_dict()`` as ``main_fd.py`` saves it under ``'model'`` (the whole checkpoint dict is
    accepted too): ``encoder.*`` (the student), ``decoder.0.{weight [Dt, Ds, 1], bias}`` (the Conv1d
    projector) and ``feature_model.*`` (the frozen teacher). Returns:

    * ``encoder.*`` unchanged for the ViT (BEiT) student, which has timm's key names already; for SwinV2,
      ``rpe_mlp`` → ``cpb_mlp`` and ``layers.{i}.downsample`` → ``layers.{i+1}.downsample`` (the official
      PatchMerging ends stage i, timm's starts stage i+1);
    * ``decoder.weight [Dt, Ds]`` / ``decoder.bias``: a 1x1 Conv1d is the same map as ``nn.Linear``;
    * without ``feature_model.*`` (the teacher is built from its release file) and without the index /
      coordinate / mask buffers, which timm rebuilds for its geometry.

    ``module.`` / ``_orig_mod.`` wrappers are stripped. Keys outside ``encoder.`` / ``decoder.`` /
    ``feature_model.`` are passed through unchanged, so a strict load names them. The inverse is
    ``export.official_state_dict(model.encoder, model.decoder)``.
    """
    if isinstance(sd.get("model"), Mapping):
        sd = sd["model"]
    sd = strip_wrapper_prefixes(sd)
    swin = any(k.startswith("encoder.layers.") for k in sd)
    moved = re.compile(r"^encoder\.layers\.(\d+)\.downsample\.")
    out: dict = {}
    decoder: dict = {}
    for k, v in sd.items():
        if k.startswith("feature_model."):
            continue
        if k.startswith("decoder."):
            decoder[k[len("decoder."):]] = v
            continue
        if k.startswith("encoder."):
            if k.rsplit(".", 1)[-1] in OFFICIAL_REBUILT_BUFFERS:
                continue
            if swin:
                k = k.replace(".rpe_mlp.", ".cpb_mlp.")
                m = moved.match(k)
                if m:
                    k = f"encoder.layers.{int(m.group(1)) + 1}.downsample." + k[m.end():]
        out[k] = v
    if decoder:
        proj = normalise_projector(decoder, Path("<official state dict>"))
        out["decoder.weight"], out["decoder.bias"] = proj["weight"], proj["bias"]
    return out
