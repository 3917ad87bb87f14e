"""Student weights across the layouts FD users meet: read, convert for fine-tuning, load loudly, export.

Layouts read by :func:`read_student_state_dict`:

* ``fdfast-train``: fdfast's own training checkpoint (``step_XXXXXXXX/state.pt``, its folder, or the run
  folder, whose newest complete checkpoint is taken). The student is ``state['student']`` (timm key names);
  ``state['projector']`` is the ``nn.Linear`` projector.
* ``fd-official``: a file written by the official ``main_fd.py``: ``{'model': {'encoder.*', 'decoder.*',
  'feature_model.*'}, 'config': <yacs CfgNode>, ...}``. Only ``encoder.*`` is kept, as the official
  ``load_pretrained`` does.
* ``student-key``: EsViT-style files whose weights sit under ``['student']``.
* ``timm-safetensors`` / ``state-dict``: plain timm weights (``.safetensors``, or a ``.pth`` holding a state
  dict, possibly under ``'model'`` / ``'state_dict'``), e.g. what :func:`export_timm` writes.

Converting (:func:`convert_vit_for_finetune`, :func:`convert_swin_for_finetune`) reproduces the official
fine-tune loader (``utils.py:load_pretrained``): the ViT's shared relative position bias is copied into every
block, tables are resized when the patch grid changes, the distillation ``norm`` is discarded in favour of a
fresh ``fc_norm``; official SwinV2 names are mapped to timm's through timm's own ``checkpoint_filter_fn``.
Unlike the official ``load_state_dict(strict=False)`` (spec §6 pitfall 7), :func:`load_student_weights` raises
:class:`CheckpointKeyError` when anything besides the expected fresh head is missing or left over.

Exporting: :func:`export_timm` writes timm / Hugging Face layout (``model.safetensors`` + ``config.json``);
:func:`export_official` writes the official FD layout. Every file is written to a temporary name in the
destination folder and renamed into place, so a reader never sees half a file.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..checkpoint import atomic_write, find_latest
from ..errors import UserError

log = logging.getLogger(__name__)

# Layout names returned by read_student_state_dict (and recorded in LoadReport.layout).
LAYOUT_FDFAST = "fdfast-train"
LAYOUT_OFFICIAL = "fd-official"
LAYOUT_STUDENT_KEY = "student-key"
LAYOUT_SAFETENSORS = "timm-safetensors"
LAYOUT_STATE_DICT = "state-dict"

FDFAST_FORMAT = "fdfast-train"  # the 'format' value fdfast/checkpoint.py writes into state.pt
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_MAX_LISTED = 12  # keys named in an error message before "... and N more"


class CheckpointReadError(UserError, ValueError):
    """The file is missing, unreadable, not a checkpoint, or needs an unsafe unpickle we refused."""


class CheckpointKeyError(UserError, ValueError):
    """The file's keys do not fit the model (beyond the expected fresh head); names file and keys."""


class CheckpointShapeError(CheckpointKeyError):
    """A key exists in file and model with different shapes: usually a different architecture."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
class _CfgNodeAsDict:
    """Stand-in for ``yacs.config.CfgNode`` while unpickling official FD files.

    ``torch.load(weights_only=True)`` only creates allowlisted classes, and its SETITEMS opcode only fills
    plain dicts / OrderedDicts, so a dict *subclass* cannot be rebuilt even when allowlisted. Mapping the
    name to a class whose ``__new__`` returns an ``OrderedDict`` lets the weights-only unpickler rebuild the
    config as plain data (items via SETITEMS, CfgNode's bookkeeping attributes via BUILD into ``__dict__``).
    No yacs code is imported or run, and nothing else in the file gains any extra permission.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "collections.OrderedDict":  # type: ignore[misc]
        return collections.OrderedDict()


# Known data-only classes that release checkpoints pickle next to their weights: the official FD files
# carry a yacs CfgNode under 'config', EsViT files an argparse.Namespace under 'args'. Neither has a
# __setstate__ or __reduce__ that could run code when rebuilt by torch's weights-only unpickler.
_DATA_ONLY_GLOBALS: list = [(_CfgNodeAsDict, "yacs.config.CfgNode"), argparse.Namespace]


def _strip_wrapper_prefixes(sd: Mapping[str, Any]) -> dict:
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:  # 'module._orig_mod.x' (DDP around a compiled module) needs both stripped
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _newest_fdfast_checkpoint(folder: Path) -> Optional[Path]:
    """The newest complete ``step_*`` folder of a run folder (or of its ``checkpoints`` folder)."""
    for candidate in (folder, folder.parent):  # <output_dir> or <output_dir>/checkpoints
        latest = find_latest(candidate)
        if latest is not None:
            return latest
    return None


def resolve_checkpoint_file(path: str | os.PathLike) -> Path:
    """The weights file a user means by ``path``: the file itself, or inside a folder ``state.pt``
    (an fdfast step folder), ``model.safetensors`` / ``pytorch_model.bin`` (timm / HF layout), or the
    newest complete fdfast checkpoint of a run folder."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointReadError(f"{p}: no such file or folder")
    if p.is_dir():
        for name in ("state.pt", "model.safetensors", "pytorch_model.bin"):
            if (p / name).is_file():
                return p / name
        latest = _newest_fdfast_checkpoint(p)
        if latest is not None:
            log.info("using the newest complete checkpoint %s", latest)
            return latest / "state.pt"
        raise CheckpointReadError(
            f"{p}: folder holds no state.pt, model.safetensors or pytorch_model.bin and no complete "
            "step_* checkpoint; pass the weights file (or an fdfast step_XXXXXXXX folder) instead")
    raise CheckpointReadError(f"{p}: not a regular file or folder")


def _unsafe_globals(path: Path) -> list[str]:
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files cannot be scanned; the error text still says what to do
        return []
    allowed = {name if isinstance(name, str) else f"{name.__module__}.{name.__qualname__}"
               for name in (g[1] if isinstance(g, tuple) else g for g in _DATA_ONLY_GLOBALS)}
    return [g for g in found if g not in allowed]


def torch_load_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False) -> Any:
    """``torch.load`` on CPU, safely by default.

    The file is read with ``weights_only=True`` (tensors, containers and primitive values only), plus the
    data-only stand-ins in ``_DATA_ONLY_GLOBALS`` so that official FD files (yacs ``CfgNode`` config) and
    EsViT files (``argparse.Namespace``) load without yacs installed and without running their pickles.
    Anything else that needs a real unpickle is refused with :class:`CheckpointReadError` naming the
    classes; ``trust_pickle=True`` then loads with ``weights_only=False``, which
    executes whatever code the file contains, so use it only for files from a source you trust.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_DATA_ONLY_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            log.warning("%s: loading with weights_only=False because trust_pickle=True; this runs code "
                        "stored in the file", path)
            try:
                return torch.load(path, map_location="cpu", weights_only=False)
            except Exception as e2:
                raise CheckpointReadError(f"{path}: cannot read even with trust_pickle=True: {e2}") from None
        # torch wraps every weights-only failure in one long message; the cause follows this marker
        text = str(e)
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n", 1)[0].strip() or _first_line(e)
        names = _unsafe_globals(path) or re.findall(r"GLOBAL (\S+) was not an allowed global", text)
        if not names and not re.search(r"global|unrecognized function|Can only (build|create)", reason):
            raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
        what = f"it pickles {', '.join(names)}" if names else f"the safe loader refused it ({reason})"
        raise CheckpointReadError(
            f"{path}: refusing to unpickle: {what}. Only tensors, plain values and the known data-only "
            "classes (yacs CfgNode, argparse.Namespace) are read by default. If you trust where the file "
            "came from, set model.pretrained_trust_pickle=true (Python: trust_pickle=True); "
            "that runs code stored in the file.") from None
    except Exception as e:
        raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file  # noqa: PLC0415 - only needed for .safetensors input
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointReadError(f"{path}: not a readable safetensors file ({_first_line(e)})") from None


def _check_state_dict(sd: Any, path: Path, what: str) -> dict:
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointReadError(f"{path}: {what} is not a non-empty mapping of tensors "
                                  f"(got {type(sd).__name__}); is this a model checkpoint?")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointReadError(
            f"{path}: {what} is not a state dict: {_fmt_keys(bad)} hold non-tensor values "
            f"(e.g. {bad[0]!r}: {type(sd[bad[0]]).__name__})")
    return dict(sd)


def _split_fdfast_state(state: Mapping, path: Path) -> tuple[dict, Optional[dict]]:
    """(student state dict, projector ``{'weight': [Dt, Ds], 'bias'}`` or None) of an fdfast checkpoint.

    The documented keys are ``student`` and ``projector``; a ``model`` entry holding the
    ``DistillModel`` state (``encoder.*`` + ``decoder.*``) is accepted too, so either trainer layout reads.
    """
    if "student" in state:
        student = _check_state_dict(state["student"], path, "['student']")
        projector = state.get("projector")
        projector = _check_state_dict(projector, path, "['projector']") if projector is not None else None
    elif "model" in state:
        model = _strip_wrapper_prefixes(_check_state_dict(state["model"], path, "['model']"))
        student = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
        if not student:
            student, projector = model, None
        else:
            projector = {k[len("decoder."):]: v for k, v in model.items() if k.startswith("decoder.")} or None
    else:
        raise CheckpointReadError(f"{path}: fdfast checkpoint without a 'student' (or 'model') entry; "
                                  f"it has {sorted(state)}")
    if projector is not None:
        projector = _normalise_projector(projector, path)
    return _strip_wrapper_prefixes(student), projector


def _normalise_projector(sd: Mapping[str, torch.Tensor], path: Path) -> dict:
    """Linear-style ``{'weight': [Dt, Ds], 'bias': [Dt]}`` from Linear or official Conv1d keys."""
    sd = {k[2:] if k.startswith("0.") else k: v for k, v in _strip_wrapper_prefixes(sd).items()}
    if set(sd) != {"weight", "bias"}:
        raise CheckpointReadError(f"{path}: projector keys {sorted(sd)} are not weight/bias of one layer")
    w = sd["weight"]
    if w.ndim == 3 and w.shape[-1] == 1:  # official Conv1d(Ds, Dt, 1)
        w = w.squeeze(-1)
    if w.ndim != 2:
        raise CheckpointReadError(f"{path}: projector weight has shape {tuple(sd['weight'].shape)}, "
                                  "expected [Dt, Ds] or [Dt, Ds, 1]")
    return {"weight": w, "bias": sd["bias"]}


@dataclass
class FdfastCheckpoint:
    """What :func:`read_fdfast_checkpoint` returns."""
    path: Path
    student: dict
    projector: Optional[dict]
    config: dict
    step: Optional[int] = None


def read_fdfast_checkpoint(path: str | os.PathLike) -> FdfastCheckpoint:
    """Read an fdfast training checkpoint (state.pt, its step folder, or the run folder).

    fdfast checkpoints hold tensors and plain values only, so this never needs ``trust_pickle``.
    """
    file = resolve_checkpoint_file(path)
    state = torch_load_checkpoint(file)
    if not isinstance(state, Mapping) or state.get("format") != FDFAST_FORMAT:
        fmt = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointReadError(
            f"{file}: not an fdfast training checkpoint (format={fmt!r}); pass a "
            "<output_dir>/checkpoints/step_XXXXXXXX folder or its state.pt written by fdfast-train")
    student, projector = _split_fdfast_state(state, file)
    config = state.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointReadError(f"{file}: fdfast checkpoint has no 'config' mapping, so the student "
                                  "architecture is unknown")
    step = state.get("step")
    return FdfastCheckpoint(path=file, student=student, projector=projector, config=dict(config),
                            step=int(step) if isinstance(step, (int, float)) else None)


def read_student_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[dict, str]:
    """(student state dict with timm-or-official key names, detected layout) from any supported file.

    Selection follows the official loader: take ``['model']`` if present, then ``['student']`` if present;
    if any key starts with ``encoder.`` keep only those and remove the prefix (dropping the projector
    ``decoder.*`` and the teacher ``feature_model.*``); strip ``module.`` / ``_orig_mod.`` wrappers. (The
    wrappers are stripped first, so a DDP-wrapped FD state ``module.encoder.*`` also works.) Key names of
    official SwinV2 files stay official (``rpe_mlp``, downsample at the end of a stage):
    :func:`convert_swin_for_finetune` maps them. See :func:`torch_load_checkpoint` for ``trust_pickle``.
    """
    file = resolve_checkpoint_file(path)
    if file.suffix == ".safetensors":
        sd = _load_safetensors(file)
        return _strip_wrapper_prefixes(_check_state_dict(sd, file, "the file")), LAYOUT_SAFETENSORS
    obj = torch_load_checkpoint(file, trust_pickle=trust_pickle)
    if isinstance(obj, Mapping) and obj.get("format") == FDFAST_FORMAT:
        student, _ = _split_fdfast_state(obj, file)
        return student, LAYOUT_FDFAST
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{file}: holds a {type(obj).__name__}, not a checkpoint dict / state dict")
    layout, what = LAYOUT_STATE_DICT, "the file"
    sd: Any = obj
    for key in ("model", "state_dict"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd, what = sd[key], f"['{key}']"
            break
    if isinstance(sd, Mapping) and isinstance(sd.get("student"), Mapping):
        sd, what, layout = sd["student"], f"{what}['student']", LAYOUT_STUDENT_KEY
    sd = _strip_wrapper_prefixes(_check_state_dict(sd, file, what))
    if any(k.startswith("encoder.") for k in sd):
        dropped = sorted({k.split(".", 1)[0] for k in sd if not k.startswith("encoder.")})
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        if layout == LAYOUT_STATE_DICT:
            layout = LAYOUT_OFFICIAL
        if dropped:
            log.info("%s: kept encoder.* (the student), skipped %s", file, ", ".join(f"{d}.*" for d in dropped))
    return sd, layout


# ----------------------------------------------------------------------------------------------
# Converting for fine-tuning
# ----------------------------------------------------------------------------------------------
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
    from timm.models.beit import Beit  # noqa: PLC0415
    from timm.models.swin_transformer_v2 import SwinTransformerV2  # noqa: PLC0415
    model = unwrap_model(model)
    if isinstance(model, Beit):
        return "beit"
    if isinstance(model, SwinTransformerV2):
        return "swinv2"
    raise ValueError(f"cannot tell the student family of a {type(model).__name__}; pass arch='beit' or "
                     "arch='swinv2' (timm Beit / SwinTransformerV2)")


def convert_vit_for_finetune(sd: Mapping[str, torch.Tensor], model: nn.Module) -> Conversion:
    """Map a BEiT-style ViT state dict onto ``model`` the way the official fine-tune loader does.

    * shared ``rel_pos_bias.relative_position_bias_table`` → a copy in every
      ``blocks.{i}.attn.relative_position_bias_table`` (only when ``model`` has per-block tables; a
      shared-bias model, e.g. the distillation student, keeps the shared table);
    * ``*relative_position_index`` / ``*relative_coords_table`` buffers dropped (timm rebuilds them);
    * tables resized with timm's ``resize_rel_pos_bias_table`` (BEiT's geometric interpolation of the
      (2Wh-1)x(2Ww-1) grid; the last 3 CLS rows are carried over unchanged) when the patch grid differs;
    * ``pos_embed`` resampled (bicubic, CLS kept) if both have one and the grids differ;
    * the distillation's final ``norm.*`` dropped when ``model`` pools into a fresh ``fc_norm`` (its
      ``norm`` is Identity), as the official loader discards it; reported in ``Conversion.dropped``.

    The patch embedding is never resampled: a different patch size means a different student.
    """
    from timm.layers import resample_abs_pos_embed, resize_rel_pos_bias_table  # noqa: PLC0415

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
            new = resize_rel_pos_bias_table(v, new_window_size=module.window_size, new_bias_shape=target.shape)
        except (ValueError, AssertionError) as e:
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
    from timm.models.swin_transformer_v2 import checkpoint_filter_fn  # noqa: PLC0415

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
    buffers = ("relative_position_index", "relative_coords_table", "attn_mask")
    for k in src:
        if any(b in k for b in buffers):
            conv.dropped[k] = "buffer, rebuilt by the model"
    conv.state_dict = checkpoint_filter_fn(src, model)
    return conv


# ----------------------------------------------------------------------------------------------
# Loading with a report
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    """What :func:`load_student_weights` did. ``missing`` holds only expected keys (else it raises)."""
    source: str
    layout: str
    arch: str
    loaded: int
    missing: list[str]
    unexpected: list[str]
    dropped: dict[str, str]
    resized: dict[str, tuple[tuple, tuple]]

    def summary(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.source} ({self.layout}, {self.arch})"]
        if self.missing:
            lines.append(f"  starting fresh (expected): {_fmt_keys(self.missing)}")
        for k, why in self.dropped.items():
            lines.append(f"  not loaded from the file: {k}: {why}")
        for k, (a, b) in self.resized.items():
            lines.append(f"  resized: {k}: {a} -> {b}")
        return "\n".join(lines)


def _fmt_keys(keys: Sequence[str], limit: int = _MAX_LISTED) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def state_dict_mismatch(file_sd: Mapping[str, Any], model_sd: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """``(missing, unexpected)``: the model's keys absent from the file (model order) and the file's keys
    absent from the model (file order). Shared by the student loaders here and the teacher loader."""
    return [k for k in model_sd if k not in file_sd], [k for k in file_sd if k not in model_sd]


def shape_mismatches(file_sd: Mapping[str, Any], model_sd: Mapping[str, Any],
                     keys: Optional[Iterable[str]] = None) -> dict[str, str]:
    """``{key: "key: file (shape) vs model (shape)"}`` for each of ``keys`` (default: the file's, in its
    order) that both hold with different shapes."""
    return {k: f"{k}: file {tuple(file_sd[k].shape)} vs model {tuple(model_sd[k].shape)}"
            for k in (file_sd if keys is None else keys)
            if k in model_sd and tuple(file_sd[k].shape) != tuple(model_sd[k].shape)}


def _describe_key_mismatch(missing: Sequence[str], unexpected: Sequence[str], file_sd: Mapping[str, Any],
                           model_sd: Mapping[str, Any]) -> str:
    """The key lists of a failed load (either may be empty, not both) and what the keys suggest."""
    parts = []
    if missing:
        parts.append(f"missing from the file ({len(missing)}): {_fmt_keys(missing)}")
    if unexpected:
        parts.append(f"in the file but not in the model ({len(unexpected)}): {_fmt_keys(unexpected)}")
    return "; ".join(parts) + "." + _prefix_hint(unexpected, set(model_sd)) + _block_hint(file_sd, model_sd)


def _matches(key: str, prefixes: Iterable[str]) -> bool:
    return any(key.startswith(p) for p in prefixes)


def _prefix_hint(unexpected: Sequence[str], model_keys: set) -> str:
    """Say so when the unexpected keys are model keys behind one extra prefix (e.g. 'backbone.')."""
    prefixes = collections.Counter(k.split(".", 1)[0] + "." for k in unexpected if "." in k)
    for prefix, n in prefixes.most_common(2):
        fits = sum(1 for k in unexpected if k.startswith(prefix) and k[len(prefix):] in model_keys)
        if fits >= max(1, n // 2):
            return (f" {fits} unexpected keys become model keys without the prefix '{prefix}'; strip it from "
                    "the file (or re-save the inner module's state_dict).")
    return ""


def _block_hint(file_keys: Iterable[str], model_keys: Iterable[str]) -> str:
    def depth(keys: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in keys:
            m = re.match(r"^((?:layers\.\d+\.)?blocks)\.(\d+)\.", k)
            if m:
                out[m.group(1)] = max(out.get(m.group(1), -1), int(m.group(2)) + 1)
        return out
    f, m = depth(file_keys), depth(model_keys)
    diffs = [f"{k}: file {f.get(k, 0)} vs model {m.get(k, 0)}" for k in sorted(set(f) | set(m))
             if f.get(k, 0) != m.get(k, 0)]
    return f" Block counts differ ({'; '.join(diffs)})." if diffs else ""


def load_converted_state_dict(
    model: nn.Module,
    sd: Mapping[str, torch.Tensor],
    *,
    source: str = "<state dict>",
    layout: str = LAYOUT_STATE_DICT,
    arch: Optional[str] = None,
    expected_missing: Sequence[str] = ("head.", "fc_norm."),
) -> LoadReport:
    """Convert ``sd`` for ``model`` and load it, or raise before touching the model.

    Keys under ``expected_missing`` may be absent (the fresh classifier head and ``fc_norm`` of fine-tuning
    and linear probing); a file tensor under those prefixes whose shape differs (e.g. a 1000-class head
    loaded for a 10-class task) is skipped and reported, since that part starts fresh anyway. Any other
    missing or unexpected key raises :class:`CheckpointKeyError`, any other shape difference
    :class:`CheckpointShapeError`; both name the file and the keys. Pass ``expected_missing=()`` for an
    exact load.
    """
    model = unwrap_model(model)
    arch = arch or detect_arch(model)
    if arch == "beit":
        conv = convert_vit_for_finetune(sd, model)
    elif arch == "swinv2":
        conv = convert_swin_for_finetune(sd, model)
    else:
        raise ValueError(f"arch={arch!r}: expected 'beit' or 'swinv2'")
    file_sd = conv.state_dict
    model_sd = model.state_dict()
    expected = tuple(expected_missing)

    bad_shapes = []
    for k, diff in shape_mismatches(file_sd, model_sd).items():
        if _matches(k, expected):
            conv.dropped[k] = (f"shape {tuple(file_sd[k].shape)} differs from the model's "
                               f"{tuple(model_sd[k].shape)}; starts fresh like the rest of the head")
            del file_sd[k]
        else:
            bad_shapes.append(diff)
    if bad_shapes:
        raise CheckpointShapeError(
            f"{source} ({layout}) does not fit this {arch} model: {len(bad_shapes)} tensor(s) differ in shape: "
            f"{_fmt_keys(bad_shapes)}. The file was written for another architecture: make the student "
            "settings (model.student.embed_dim / depth / num_heads / patch_size / heads / depths) match the "
            "distillation run that wrote it.")

    missing, unexpected = state_dict_mismatch(file_sd, model_sd)
    bad_missing = [k for k in missing if not _matches(k, expected)]
    if bad_missing or unexpected:
        raise CheckpointKeyError(
            f"{source} ({layout}) does not fit this {arch} model; "
            + _describe_key_mismatch(bad_missing, unexpected, file_sd, model_sd) + " Check that the file is a student of this architecture (model.student.*) and, if a part of the "
            "model is meant to start fresh, list its prefix in expected_missing.")

    result = model.load_state_dict(file_sd, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) == set(missing), result  # checked above
    report = LoadReport(source=source, layout=layout, arch=arch, loaded=len(file_sd), missing=missing,
                        unexpected=[], dropped=conv.dropped, resized=conv.resized)
    log.info("%s", report.summary())
    return report


def load_student_weights(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: Optional[str] = None,
    expected_missing: Sequence[str] = ("head.", "fc_norm."),
    trust_pickle: bool = False,
) -> LoadReport:
    """Read ``path`` (any layout of :func:`read_student_state_dict`), convert, load into ``model``.

    ``arch`` ('beit' / 'swinv2') defaults to the model's class. Raises :class:`CheckpointReadError`,
    :class:`CheckpointKeyError` or :class:`CheckpointShapeError` (all ``ValueError``) with the file and keys
    named; on success the report is logged at INFO and returned.
    """
    sd, layout = read_student_state_dict(path, trust_pickle=trust_pickle)
    return load_converted_state_dict(model, sd, source=str(path), layout=layout, arch=arch,
                                     expected_missing=expected_missing)


# ----------------------------------------------------------------------------------------------
# Building a timm student from config fields
# ----------------------------------------------------------------------------------------------
_REQUIRED_FIELDS = {
    "beit": ("img_size", "patch_size", "embed_dim", "depth", "num_heads"),
    "swinv2": ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "window_size"),
}


def timm_student_kwargs(fields: Mapping[str, Any], num_classes: int = 0, finetune: bool = False) -> tuple[str, dict]:
    """(arch, JSON-serialisable constructor kwargs) of the timm student described by ``model.student``.

    Distillation ViT: shared relative position bias (unless ``shared_rel_pos_bias`` is false), no pooling,
    no head. Fine-tune ViT: one table per block, mean pooling + ``fc_norm`` + head. SwinV2 is the same
    network in both. Training-only knobs (drop path) are left out; :func:`build_timm_student_from_fields`
    adds them.
    """
    arch = fields.get("arch")
    if arch not in _REQUIRED_FIELDS:
        raise ValueError(f"model.student.arch={arch!r}: expected one of {sorted(_REQUIRED_FIELDS)}")
    lacking = [f for f in _REQUIRED_FIELDS[arch] if fields.get(f) is None]
    if lacking:
        raise ValueError(f"the student config lacks {', '.join('model.student.' + f for f in lacking)}, "
                         f"needed to rebuild the {arch} student")
    if arch == "beit":
        shared = bool(fields.get("shared_rel_pos_bias", True)) and not finetune
        return arch, dict(
            img_size=int(fields["img_size"]), patch_size=int(fields["patch_size"]),
            embed_dim=int(fields["embed_dim"]), depth=int(fields["depth"]), num_heads=int(fields["num_heads"]),
            mlp_ratio=float(fields.get("mlp_ratio", 4.0)), qkv_bias=True,
            init_values=float(fields.get("init_values", 0.1)), use_abs_pos_emb=False,
            use_rel_pos_bias=not shared, use_shared_rel_pos_bias=shared,
            num_classes=int(num_classes), global_pool="avg" if finetune else "",
        )
    return arch, dict(
        img_size=int(fields["img_size"]), patch_size=int(fields["patch_size"]), embed_dim=int(fields["embed_dim"]),
        depths=[int(d) for d in fields["depth"]], num_heads=[int(h) for h in fields["num_heads"]],
        window_size=int(fields["window_size"]), mlp_ratio=float(fields.get("mlp_ratio", 4.0)), qkv_bias=True,
        num_classes=int(num_classes),
    )


def build_timm_student_from_fields(fields: Mapping[str, Any], num_classes: int = 0,
                                   finetune: bool = False) -> nn.Module:
    """The timm student for ``config['model']['student']`` (a plain dict), with timm's default init.

    Built by ``fdfast.models.student.build_student`` (the trainer's own builder) without FD's init (the
    weights are loaded afterwards anyway), from the values :func:`timm_student_kwargs` records; ``drop_path``
    defaults to 0. ``num_classes`` sizes the head: a ViT has one only in the fine-tune layout, while SwinV2 is
    the same network in both layouts, so its head follows ``num_classes`` alone.
    """
    from ..config import StudentConfig  # noqa: PLC0415 - keeps interop importable without the trainer's modules
    from ..models.student import build_student  # noqa: PLC0415

    arch, kwargs = timm_student_kwargs(fields, num_classes=num_classes, finetune=finetune)
    common = dict(arch=arch, img_size=kwargs["img_size"], patch_size=kwargs["patch_size"],
                  embed_dim=kwargs["embed_dim"], mlp_ratio=kwargs["mlp_ratio"],
                  drop_path=float(fields.get("drop_path", 0.0)), num_classes=kwargs["num_classes"])
    if arch == "beit":
        if kwargs["num_classes"] and not finetune:
            raise ValueError(f"num_classes={num_classes}: a ViT student has a class head only in the fine-tune "
                             "layout; pass finetune=True")
        cfg = StudentConfig(**common, depth=kwargs["depth"], num_heads=kwargs["num_heads"],
                            init_values=kwargs["init_values"],
                            shared_rel_pos_bias=bool(fields.get("shared_rel_pos_bias", True)))
    else:
        cfg = StudentConfig(**common, depth=kwargs["depths"], num_heads=kwargs["num_heads"],
                            window_size=kwargs["window_size"])
        finetune = True  # SwinV2: one network in both layouts; build_student sizes its head only here
    return build_student(cfg, finetune=finetune, fd_init=False)


def default_timm_model_name(arch: str, model_args: Mapping[str, Any]) -> str:
    """A registered timm name of the same family and width; ``model_args`` (which the export records and
    ``timm.create_model`` applies on top of the name's defaults) pin every size-related argument."""
    if arch == "beit":
        sizes = (model_args.get("patch_size"), model_args.get("embed_dim"), model_args.get("depth"))
        return {(16, 1024, 24): "beit_large_patch16_224"}.get(sizes, "beit_base_patch16_224")
    if arch == "swinv2":
        names = {96: "swinv2_tiny_window8_256", 128: "swinv2_base_window8_256", 192: "swinv2_large_window12_192"}
        depths = tuple(model_args.get("depths") or ())
        if model_args.get("embed_dim") == 96 and depths == (2, 2, 18, 2):
            return "swinv2_small_window8_256"
        return names.get(model_args.get("embed_dim"), "swinv2_tiny_window8_256")
    raise ValueError(f"arch={arch!r}: expected 'beit' or 'swinv2'")


def infer_timm_model_args(model: nn.Module) -> dict:
    """Constructor kwargs that rebuild ``model`` (a timm Beit / SwinTransformerV2) with the same weights.

    Best effort for models built elsewhere: ``init_values`` is recorded as 0.1 whenever layer scale exists
    (the stored gammas overwrite it). Prefer passing the kwargs you built the model with.
    """
    model = unwrap_model(model)
    arch = detect_arch(model)
    if arch == "beit":
        attn = model.blocks[0].attn
        return dict(
            img_size=list(model.patch_embed.img_size), patch_size=list(model.patch_embed.patch_size),
            embed_dim=model.embed_dim, depth=len(model.blocks), num_heads=attn.num_heads,
            mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim, qkv_bias=attn.q_bias is not None,
            init_values=0.1 if getattr(model.blocks[0], "gamma_1", None) is not None else None,
            use_abs_pos_emb=model.pos_embed is not None,
            use_rel_pos_bias=getattr(attn, "relative_position_bias_table", None) is not None,
            use_shared_rel_pos_bias=model.rel_pos_bias is not None,
            num_classes=model.num_classes, global_pool=model.global_pool,
        )
    first = model.layers[0].blocks[0]
    return dict(
        img_size=list(model.patch_embed.img_size), patch_size=model.patch_embed.patch_size[0],
        embed_dim=model.embed_dim, depths=[len(s.blocks) for s in model.layers],
        num_heads=[s.blocks[0].num_heads for s in model.layers],
        # stage 0's window is only clamped when it covers the whole stage, in which case every later stage
        # is covered as well, so the stage-0 value rebuilds identical windows everywhere
        window_size=first.window_size[0], mlp_ratio=first.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=first.attn.q_bias is not None, num_classes=model.num_classes,
    )


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _export_tensors(sd: Mapping[str, torch.Tensor]) -> dict:
    """Detached, contiguous CPU tensors; safetensors refuses tensors that share storage, so a tensor whose
    storage was already seen is cloned."""
    out, seen = {}, set()
    for k, v in _strip_wrapper_prefixes(sd).items():
        t = v.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def default_pretrained_cfg(student: nn.Module) -> dict:
    """timm ``pretrained_cfg`` of an fdfast student: ImageNet mean/std (the normalisation FD trains with),
    bicubic resize 256 / center-crop 224 at 224 px (crop_pct 0.875), the model's input size and head."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: PLC0415
    student = unwrap_model(student)
    arch = detect_arch(student)
    h, w = student.patch_embed.img_size
    return {
        "input_size": [3, int(h), int(w)], "fixed_input_size": True, "interpolation": "bicubic",
        "crop_pct": 0.875, "crop_mode": "center", "mean": list(IMAGENET_DEFAULT_MEAN),
        "std": list(IMAGENET_DEFAULT_STD), "num_classes": int(student.num_classes),
        "first_conv": "patch_embed.proj", "classifier": "head" if arch == "beit" else "head.fc",
    }


def _check_rebuild(model_name: str, model_args: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Build ``timm.create_model(model_name, **model_args)`` on the meta device (no memory, no init cost)
    and compare key sets and shapes, so an export always loads with the recipe it records."""
    import timm  # noqa: PLC0415
    try:
        with torch.device("meta"):
            ref = timm.create_model(model_name, pretrained=False, **model_args)
    except Exception as e:
        raise ValueError(f"timm.create_model({model_name!r}, **model_args) fails ({_first_line(e)}); "
                         f"model_args={dict(model_args)}") from None
    ref_sd = ref.state_dict()
    problems = [f"missing {k}" for k in ref_sd if k not in tensors]
    problems += [f"extra {k}" for k in tensors if k not in ref_sd]
    problems += [f"{k}: {tuple(tensors[k].shape)} vs {tuple(ref_sd[k].shape)}" for k in tensors
                 if k in ref_sd and tuple(tensors[k].shape) != tuple(ref_sd[k].shape)]
    if problems:
        raise ValueError(f"the exported weights do not match timm.create_model({model_name!r}, **model_args): "
                         f"{_fmt_keys(problems)}; pass the model_args the student was built with")


def export_timm(
    student: nn.Module,
    path: str | os.PathLike,
    model_name: Optional[str] = None,
    pretrained_cfg: Optional[Mapping[str, Any]] = None,
    *,
    model_args: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``student`` as timm weights; returns the ``.safetensors`` path.

    ``path`` is a folder (written in the timm / Hugging Face hub layout: ``model.safetensors`` +
    ``config.json``) or a ``.safetensors`` file (``config.json`` is written next to it). Keys are the timm
    names, without ``module.`` / ``_orig_mod.``. ``model_name`` is a registered timm architecture
    (default: one of the same family, see :func:`default_timm_model_name`); ``model_args`` the constructor
    kwargs on top of it (default: inferred from the module). The export is checked to rebuild exactly with
    them. Loading it back, any of::

        timm.create_model("local-dir:<folder>", pretrained=True)
        timm.create_model(model_name, checkpoint_path="<folder>/model.safetensors", **model_args)
        timm.create_model(model_name, pretrained=True,
                          pretrained_cfg_overlay=dict(file="<folder>/model.safetensors"), **model_args)

    The safetensors metadata (str -> str) records ``timm_model_name`` and JSON-encoded ``timm_model_args``
    and ``pretrained_cfg``; ``config.json`` has ``architecture``, ``num_classes``, ``num_features``,
    ``global_pool``, ``model_args`` and ``pretrained_cfg`` as timm's ``save_config_for_hf`` writes them.
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    student = unwrap_model(student)
    arch = detect_arch(student)
    args = dict(model_args) if model_args is not None else infer_timm_model_args(student)
    name = model_name or default_timm_model_name(arch, args)
    cfg = default_pretrained_cfg(student)
    cfg.update(dict(pretrained_cfg or {}))
    cfg["architecture"] = name
    tensors = _export_tensors(student.state_dict())
    _check_rebuild(name, args, tensors)

    out = Path(path)
    weights = out if out.suffix == ".safetensors" else out / "model.safetensors"
    metadata = {
        "format": "pt",  # what transformers / timm hub files carry
        "timm_model_name": name,
        "timm_model_args": json.dumps(args, sort_keys=True),
        "pretrained_cfg": json.dumps(cfg, sort_keys=True),
        "producer": "fdfast",
    }
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    hf_config = {
        "architecture": name,
        "num_classes": int(student.num_classes),
        "num_features": int(student.num_features),
        "global_pool": getattr(student, "global_pool", "") or "",
        "model_args": args,
        "pretrained_cfg": {k: v for k, v in cfg.items() if k != "architecture"},
    }
    if not hf_config["global_pool"]:
        del hf_config["global_pool"]
    atomic_write(weights.parent / "config.json",
                 lambda tmp: tmp.write_text(json.dumps(hf_config, indent=2) + "\n"))
    log.info("wrote %s (%d tensors, timm %s) and %s", weights, len(tensors), name, weights.parent / "config.json")
    return weights


def official_state_dict(student: nn.Module, projector: Optional[nn.Module | Mapping[str, torch.Tensor]] = None,
                        arch: Optional[str] = None) -> dict:
    """The official FD ``model`` dict of a timm student (+ projector): see :func:`export_official`."""
    student = unwrap_model(student)
    arch = arch or detect_arch(student)
    if int(getattr(student, "num_classes", 0) or 0) > 0:
        raise ValueError("the official FD layout holds a distilled encoder without a classifier; this student "
                         f"has a {student.num_classes}-class head. Export fine-tuned models with format 'timm'")
    sd = _export_tensors(student.state_dict())
    out: dict[str, torch.Tensor] = {}
    if arch == "beit":
        for k, v in sd.items():
            out["encoder." + k] = v
        # timm keeps the index buffers non-persistent; the official module saves them. The official
        # fine-tune loader deletes them, but a strict load of the official encoder needs them, and they are
        # exact (timm and BEiT build the same index, CLS rows included), so they are written.
        for name, module in student.named_modules():
            idx = getattr(module, "relative_position_index", None)
            if isinstance(idx, torch.Tensor):
                out[f"encoder.{name + '.' if name else ''}relative_position_index"] = idx.detach().cpu().clone()
    elif arch == "swinv2":
        moved = re.compile(r"^layers\.(\d+)\.downsample\.")
        for k, v in sd.items():
            m = moved.match(k)
            if m:  # timm: PatchMerging starts stage i+1; official: it ends stage i
                i = int(m.group(1))
                if i == 0:
                    raise ValueError(f"{k}: a downsample before stage 0 has no official equivalent")
                k = f"layers.{i - 1}.downsample." + k[m.end():]
            out["encoder." + k.replace(".cpb_mlp.", ".rpe_mlp.")] = v
        # relative_coords_table / relative_position_index / attn_mask are not written: the official loader
        # deletes them and rebuilds them for its resolution (spec §3, "minimal file").
    else:
        raise ValueError(f"arch={arch!r}: expected 'beit' or 'swinv2'")
    if projector is not None:
        psd = projector.state_dict() if isinstance(projector, nn.Module) else dict(projector)
        psd = _normalise_projector(psd, Path("<projector>"))
        w = psd["weight"].detach().cpu()
        if w.shape[1] != student.num_features:
            raise ValueError(f"projector input width {w.shape[1]} != student width {student.num_features}")
        out["decoder.0.weight"] = w.unsqueeze(-1).contiguous()  # Conv1d(Ds, Dt, kernel_size=1)
        out["decoder.0.bias"] = psd["bias"].detach().cpu().contiguous()
    return out


def export_official(
    student: nn.Module,
    projector: Optional[nn.Module | Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    arch: Optional[str] = None,
    *,
    extra: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write ``{'model': {'encoder.<name>': ..., 'decoder.0.weight': W[..., None], 'decoder.0.bias': b}}``.

    This is what the official ``load_pretrained`` (fine-tuning / linear probe) reads; the teacher
    (``feature_model.*``), optimizer and yacs config are not written, so the file also loads with
    ``weights_only=True``. Names: ViT keys are timm's with ``encoder.`` in front, plus the (exact)
    ``relative_position_index`` buffers; SwinV2 keys get ``cpb_mlp`` → ``rpe_mlp`` and ``layers.{i}.downsample``
    → ``layers.{i-1}.downsample`` (timm's order back to the official one), without the rebuildable buffers.
    ``projector`` (``nn.Linear(Ds, Dt)`` or its state dict) may be None: the fine-tune loader ignores it.
    ``extra`` adds plain top-level entries (e.g. provenance) next to ``model``.
    """
    obj: dict[str, Any] = {"model": official_state_dict(student, projector, arch)}
    if extra:
        obj.update({k: v for k, v in extra.items() if k != "model"})
    out = Path(path)
    atomic_write(out, lambda tmp: torch.save(obj, tmp))
    log.info("wrote %s (official FD layout, %d tensors)", out, len(obj["model"]))
    return out


# ----------------------------------------------------------------------------------------------
# Official FD training state <-> DistillModel (student + projector), for resuming / parity checks
# ----------------------------------------------------------------------------------------------
# Buffers the official modules save but timm rebuilds from the geometry (non-persistent in timm).
_OFFICIAL_REBUILT_BUFFERS = ("relative_position_index", "relative_coords_table", "attn_mask")


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
    :func:`official_state_dict` (``official_state_dict(model.encoder, model.decoder)``).
    """
    if isinstance(sd.get("model"), Mapping):
        sd = sd["model"]
    sd = _strip_wrapper_prefixes(sd)
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
            if k.rsplit(".", 1)[-1] in _OFFICIAL_REBUILT_BUFFERS:
                continue
            if swin:
                k = k.replace(".rpe_mlp.", ".cpb_mlp.")
                m = moved.match(k)
                if m:
                    k = f"encoder.layers.{int(m.group(1)) + 1}.downsample." + k[m.end():]
        out[k] = v
    if decoder:
        proj = _normalise_projector(decoder, Path("<official state dict>"))
        out["decoder.weight"], out["decoder.bias"] = proj["weight"], proj["bias"]
    return out


def load_official_distill_checkpoint(model: nn.Module, path: str | os.PathLike, *,
                                     trust_pickle: bool = False) -> LoadReport:
    """Load a file written by the official ``main_fd.py`` (``{'model': {'encoder.*', 'decoder.*',
    'feature_model.*'}, 'config': <yacs CfgNode>, ...}``) into a ``DistillModel``: student AND projector.

    The file is read by :func:`torch_load_checkpoint` (weights-only, with the yacs config rebuilt as plain
    data), mapped by :func:`official_to_distill_state_dict` and loaded strictly: any missing or unexpected
    key raises :class:`CheckpointKeyError`, any shape difference :class:`CheckpointShapeError` (e.g. a
    projector distilled from a teacher of another width), before the model is touched. For the encoder
    alone (fine-tuning, a stripped file without ``decoder.*``) use :func:`load_student_weights`.
    """
    file = resolve_checkpoint_file(path)
    obj = torch_load_checkpoint(file, trust_pickle=trust_pickle)
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{file}: holds a {type(obj).__name__}, not an official FD checkpoint")
    what = "['model']" if isinstance(obj.get("model"), Mapping) else "the file"
    sd = _strip_wrapper_prefixes(_check_state_dict(obj["model"] if what == "['model']" else obj, file, what))
    if not any(k.startswith("encoder.") for k in sd):
        raise CheckpointReadError(
            f"{file}: {what} has no 'encoder.*' keys, so it is not an official FD training checkpoint; "
            "use load_student_weights for fdfast / timm student files")
    mapped = official_to_distill_state_dict(sd)
    dropped: dict[str, str] = {}
    n_teacher = sum(1 for k in sd if k.startswith("feature_model."))
    if n_teacher:
        dropped["feature_model.*"] = (f"the frozen teacher ({n_teacher} tensors); fdfast builds it from "
                                      "model.teacher.weights")
    for k in sd:
        if k.startswith("encoder.") and k.rsplit(".", 1)[-1] in _OFFICIAL_REBUILT_BUFFERS:
            dropped[k] = "buffer, rebuilt by the model"

    target = unwrap_model(model)
    arch = getattr(target, "arch", None) or detect_arch(getattr(target, "encoder", target))
    model_sd = target.state_dict()
    bad_shapes = list(shape_mismatches(mapped, model_sd).values())
    if bad_shapes:
        hint = ""
        if any(s.startswith("decoder.") for s in bad_shapes):
            hint = (" The projector maps the student width to the teacher width: the run that wrote the file "
                    "used another teacher (model.teacher.*) or student width (model.student.embed_dim).")
        raise CheckpointShapeError(f"{file} (fd-official) does not fit this {arch} DistillModel: "
                                   f"{_fmt_keys(bad_shapes)}.{hint}")
    missing, unexpected = state_dict_mismatch(mapped, model_sd)
    if missing or unexpected:
        hint = ""
        if any(k.startswith("decoder.") for k in missing):
            hint = (" The file holds no projector (decoder.*): it is a stripped distilled encoder; load it "
                    "with load_student_weights instead.")
        raise CheckpointKeyError(f"{file} (fd-official) does not fit this {arch} DistillModel; "
                                 + _describe_key_mismatch(missing, unexpected, mapped, model_sd) + hint)
    target.load_state_dict(mapped, strict=True)
    report = LoadReport(source=str(path), layout=LAYOUT_OFFICIAL, arch=arch, loaded=len(mapped), missing=[],
                        unexpected=[], dropped=dropped, resized={})
    log.info("%s", report.summary())
    return report
