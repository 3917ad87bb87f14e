"""Exporting students: timm weights that describe themselves, or the official FD layout.

:func:`export_timm` writes the timm / Hugging Face hub layout (``model.safetensors`` + ``config.json`` with
the architecture, its exact constructor arguments, ``num_classes`` and a ``pretrained_cfg`` holding the
real eval preprocessing), so ``timm.create_model("local-dir:<folder>", pretrained=True)`` rebuilds the
network, its head and its data config exactly. :func:`export_official` writes what the official fine-tune
loader reads. :func:`export_checkpoint` does either for an fdfast training checkpoint, rebuilding the
student from the checkpoint's own config with the trainer's builder. Files are written atomically.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional

import timm
import torch
import torch.nn as nn

from .. import checkpoint as ckpt
from ..files import atomic_write
from ..config import FDConfig, config_from_dict
from ..config.load import MOVED_KEYS, pop_key, without_command_line_keys
from ..constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from ..errors import ConfigError, UserError
from ..models.student import build_student, timm_kwargs
from .conversion import detect_arch, normalise_projector, unwrap_model
from .heads_export import export_heads
from .loading import LAYOUT_FDFAST, FdfastCheckpoint, load_converted_state_dict, read_fdfast_checkpoint
from .reading import CheckpointReadError, first_line, fmt_keys, strip_wrapper_prefixes

log = logging.getLogger(__name__)

# Student config fields without which a checkpoint's architecture cannot be trusted to be the default one.
_ARCH_FIELDS = {"beit": ("img_size", "patch_size", "embed_dim", "depth", "num_heads"),
                "swinv2": ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "window_size")}


class ExportError(UserError, ValueError):
    """The student cannot be written in the requested layout; the message says which layout fits."""


# ----------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------
def export_tensors(sd: Mapping[str, torch.Tensor]) -> dict:
    """Detached, contiguous CPU tensors; safetensors refuses tensors that share storage, so a tensor whose
    storage was already seen is cloned."""
    out, seen = {}, set()
    for k, v in strip_wrapper_prefixes(sd).items():
        t = v.detach().cpu().contiguous()
        ptr = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


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

    For models built outside fdfast; fdfast's own students record :func:`fdfast.models.student.timm_kwargs`.
    ``init_values`` is recorded as 0.1 whenever layer scale exists (the stored gammas overwrite it).
    """
    model = unwrap_model(model)
    if detect_arch(model) == "beit":
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


def eval_crop_pct(img_size: int, eval_resize: int) -> float:
    """timm's ``crop_pct`` for resize-to-``eval_resize`` + center-crop-``img_size``. timm resizes to
    ``floor(img_size / crop_pct)``, so the ratio is nudged down where float rounding would land below."""
    crop_pct = img_size / eval_resize
    while math.floor(img_size / crop_pct) < eval_resize:
        crop_pct = math.nextafter(crop_pct, 0.0)
    return crop_pct


def eval_preprocessing(cfg: FDConfig) -> dict:
    """``pretrained_cfg`` entries of fdfast's evaluation: shorter side resized to ``data.eval_resize``
    (bicubic), center crop to the student size, ImageNet's mean/std or CLIP's (``train.eval_norm=clip``)."""
    size = cfg.model.student.img_size
    mean, std = (CLIP_MEAN, CLIP_STD) if cfg.train.eval_norm == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
    return {"input_size": [3, size, size], "interpolation": "bicubic", "crop_mode": "center",
            "crop_pct": eval_crop_pct(size, cfg.data.eval_resize), "mean": list(mean), "std": list(std)}


def default_pretrained_cfg(student: nn.Module) -> dict:
    """timm ``pretrained_cfg`` of a student: its input size and head, and fdfast's default eval
    preprocessing (ImageNet mean/std, bicubic resize by 1/0.875 and center crop)."""
    student = unwrap_model(student)
    h, w = student.patch_embed.img_size
    return {
        "input_size": [3, int(h), int(w)], "fixed_input_size": True, "interpolation": "bicubic",
        "crop_pct": 0.875, "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
        "num_classes": int(student.num_classes), "first_conv": "patch_embed.proj",
        "classifier": "head" if detect_arch(student) == "beit" else "head.fc",
    }


def _check_rebuild(model_name: str, model_args: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    """Build ``timm.create_model(model_name, **model_args)`` on the meta device (no memory, no init cost)
    and compare key sets and shapes, so an export always loads with the recipe it records."""
    try:
        with torch.device("meta"):
            ref = timm.create_model(model_name, pretrained=False, **model_args)
    except Exception as e:
        raise ExportError(f"timm.create_model({model_name!r}, **model_args) fails ({first_line(e)}); "
                          f"model_args={dict(model_args)}") from None
    ref_sd = ref.state_dict()
    problems = [f"missing {k}" for k in ref_sd if k not in tensors]
    problems += [f"extra {k}" for k in tensors if k not in ref_sd]
    problems += [f"{k}: {tuple(tensors[k].shape)} vs {tuple(ref_sd[k].shape)}" for k in tensors
                 if k in ref_sd and tuple(tensors[k].shape) != tuple(ref_sd[k].shape)]
    if problems:
        raise ExportError(f"the exported weights do not match timm.create_model({model_name!r}, **model_args): "
                          f"{fmt_keys(problems)}; pass the model_args the student was built with")


def export_timm(student: nn.Module, path: str | os.PathLike, model_name: Optional[str] = None,
                pretrained_cfg: Optional[Mapping[str, Any]] = None, *,
                model_args: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``student`` as timm weights; returns the ``.safetensors`` path.

    ``path`` is a folder (written in the timm / Hugging Face hub layout: ``model.safetensors`` +
    ``config.json``) or a ``.safetensors`` file (``config.json`` is written next to it). Keys are the timm
    names, without ``module.`` / ``_orig_mod.``. ``model_name`` is a registered timm architecture (default:
    one of the same family); ``model_args`` the constructor kwargs on top of it (default: inferred from the
    module); the export is checked to rebuild exactly with them. ``pretrained_cfg`` overrides entries of
    :func:`default_pretrained_cfg` (e.g. :func:`eval_preprocessing`). Load it back exactly with::

        timm.create_model("local-dir:<folder>", pretrained=True)

    which applies the recorded arguments, head size and preprocessing. The safetensors metadata records
    ``timm_model_name`` and JSON-encoded ``timm_model_args`` and ``pretrained_cfg`` as well.
    """
    from safetensors.torch import save_file  # noqa: PLC0415 - optional writer

    student = unwrap_model(student)
    arch = detect_arch(student)
    args = dict(model_args) if model_args is not None else infer_timm_model_args(student)
    name = model_name or default_timm_model_name(arch, args)
    cfg = default_pretrained_cfg(student)
    cfg.update(dict(pretrained_cfg or {}))
    tensors = export_tensors(student.state_dict())
    _check_rebuild(name, args, tensors)

    out = Path(path)
    weights = out if out.suffix == ".safetensors" else out / "model.safetensors"
    metadata = {"format": "pt", "timm_model_name": name, "timm_model_args": json.dumps(args, sort_keys=True),
                "pretrained_cfg": json.dumps(dict(cfg, architecture=name), sort_keys=True), "producer": "fdfast"}
    atomic_write(weights, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    hf_config = {"architecture": name, "num_classes": int(student.num_classes),
                 "num_features": int(student.num_features), "model_args": args, "pretrained_cfg": cfg}
    if getattr(student, "global_pool", ""):
        hf_config["global_pool"] = student.global_pool
    atomic_write(weights.parent / "config.json",
                 lambda tmp: tmp.write_text(json.dumps(hf_config, indent=2) + "\n"))
    log.info("wrote %s (%d tensors, timm %s) and %s", weights, len(tensors), name, weights.parent / "config.json")
    return weights


# ----------------------------------------------------------------------------------------------
# Official FD layout
# ----------------------------------------------------------------------------------------------
def official_state_dict(student: nn.Module, projector: Optional[nn.Module | Mapping[str, torch.Tensor]] = None,
                        arch: Optional[str] = None) -> dict:
    """The official FD ``model`` dict of a timm student (+ projector): see :func:`export_official`."""
    student = unwrap_model(student)
    arch = arch or detect_arch(student)
    if int(getattr(student, "num_classes", 0) or 0) > 0:
        raise ExportError("the official FD layout holds a distilled encoder without a classifier; this student "
                          f"has a {student.num_classes}-class head. Export fine-tuned models with format 'timm'")
    sd = export_tensors(student.state_dict())
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
                    raise ExportError(f"{k}: a downsample before stage 0 has no official equivalent")
                k = f"layers.{i - 1}.downsample." + k[m.end():]
            out["encoder." + k.replace(".cpb_mlp.", ".rpe_mlp.")] = v
        # relative_coords_table / relative_position_index / attn_mask are not written: the official loader
        # deletes them and rebuilds them for its resolution (spec §3, "minimal file").
    else:
        raise ValueError(f"arch={arch!r}: expected 'beit' or 'swinv2'")
    if projector is not None:
        psd = projector.state_dict() if isinstance(projector, nn.Module) else dict(projector)
        psd = normalise_projector(psd, Path("<projector>"))
        w = psd["weight"].detach().cpu()
        if w.shape[1] != student.num_features:
            raise ExportError(f"projector input width {w.shape[1]} != student width {student.num_features}")
        out["decoder.0.weight"] = w.unsqueeze(-1).contiguous()  # Conv1d(Ds, Dt, kernel_size=1)
        out["decoder.0.bias"] = psd["bias"].detach().cpu().contiguous()
    return out


def export_official(student: nn.Module, projector: Optional[nn.Module | Mapping[str, torch.Tensor]],
                    path: str | os.PathLike, arch: Optional[str] = None, *,
                    extra: Optional[Mapping[str, Any]] = None) -> Path:
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
    obj.update({k: v for k, v in (extra or {}).items() if k != "model"})
    out = Path(path)
    atomic_write(out, lambda tmp: torch.save(obj, tmp))
    log.info("wrote %s (official FD layout, %d tensors)", out, len(obj["model"]))
    return out


# ----------------------------------------------------------------------------------------------
# fdfast checkpoints
# ----------------------------------------------------------------------------------------------
def _with_moved_keys(data: Mapping) -> dict:
    """A copy of a checkpoint's config dict with the keys of earlier fdfast versions where they live now, less
    the keys only the command line may set (``model.trust_pickle``: ignored, never obeyed)."""
    data = without_command_line_keys(data)
    for old, new in MOVED_KEYS.items():
        found, value = pop_key(data, old)
        if not found or new.startswith("("):  # absent, or removed: nothing to carry over
            continue
        *parents, leaf = new.split(".")
        node: Any = data
        for p in parents:
            node = node.setdefault(p, {})
        node.setdefault(leaf, value)
    return data


def checkpoint_config(ckpt: FdfastCheckpoint) -> FDConfig:
    """The run config stored in ``ckpt``, including configs of earlier fdfast versions (``MOVED_KEYS``)."""
    data = _with_moved_keys(ckpt.config)
    student = (data.get("model") or {}).get("student") or {}
    arch = student.get("arch", "beit")
    lacking = [f"model.student.{f}" for f in _ARCH_FIELDS.get(arch, ()) if f not in student]
    if lacking:
        raise CheckpointReadError(f"{ckpt.path}: the checkpoint's config lacks {', '.join(lacking)}, needed to "
                                  f"rebuild the {arch} student")
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise CheckpointReadError(f"{ckpt.path}: the checkpoint's config does not load: {e}") from None


def export_source(path: str | os.PathLike, which: Optional[str] = None) -> Path:
    """The checkpoint ``path`` names for an export. A run folder (``<output_dir>``, or its ``checkpoints``)
    gives its ``best/`` weights when it has intact ones (fine-tune / probe runs with ``data.val``) and its
    newest complete checkpoint otherwise; ``which`` ('best' | 'last') insists on one of the two. Any other
    path (a step folder, ``best/``, a ``state.pt``) is exported as given."""
    p = Path(path)
    run = p.parent if p.name == "checkpoints" else p
    if not p.is_dir() or (p / "state.pt").exists() or not ((run / "checkpoints").is_dir() or (run / "best").is_dir()):
        if which is not None:
            raise ExportError(f"--which {which} picks within a run folder; {p} is one checkpoint (a step folder, "
                              "best/ or a state.pt): drop --which, or pass the run folder")
        return p
    best = run / "best"
    why = ckpt.verify(best) if best.is_dir() else "no best/ (only fine-tune and probe runs with data.val save one)"
    if which == "best" and why:
        raise ExportError(f"--which best: {run} has no usable best weights: {why}; use --which last")
    if which == "best" or (which is None and not why):
        log.info("exporting the best weights %s%s", best, "" if which else " (--which last for the newest checkpoint)")
        return best
    if which is None and best.is_dir():
        log.warning("%s is not usable (%s); exporting the newest checkpoint instead", best, why)
    return run


def export_checkpoint(path: str | os.PathLike, fmt: str, out: str | os.PathLike, *,
                      model_name: Optional[str] = None, finetune_layout: bool = False,
                      with_heads: bool = False) -> Path:
    """Export the student of an fdfast checkpoint (file, step folder or run folder) as ``fmt``.

    ``timm``: any student (:func:`export_timm` with the exact ``timm_kwargs`` and :func:`eval_preprocessing`
    of the run); ``finetune_layout`` turns a distilled ViT into the fine-tune layout (per-block tables, mean
    pooling + fresh ``fc_norm``, no head) that a stock timm BEiT loads. ``official``: distilled students
    (:func:`export_official`, with the projector; a student of several teachers: ``encoder.*`` only, the
    layout's one decoder being the projector onto one teacher). ``with_heads``: also the projector heads, by
    teacher name, in a file beside it (:mod:`.heads_export`). Returns the written backbone file.
    """
    ckpt = read_fdfast_checkpoint(path)
    cfg = checkpoint_config(ckpt)
    if with_heads and ckpt.task == "finetune":
        raise ExportError(f"{ckpt.path} holds a fine-tuned student, which has no projector heads: drop --with-heads")
    written = _export_backbone(ckpt, cfg, fmt, out, model_name=model_name, finetune_layout=finetune_layout)
    if with_heads:
        export_heads(ckpt, cfg, written)
    return written


def _export_backbone(ckpt: FdfastCheckpoint, cfg: FDConfig, fmt: str, out: str | os.PathLike, *,
                     model_name: Optional[str], finetune_layout: bool) -> Path:
    s = cfg.model.student
    if ckpt.task == "linprobe":
        raise ExportError(f"{ckpt.path} is a linear-probe checkpoint, whose BatchNorm + Linear head has no place "
                          "in a timm model; export the fine-tuned or distilled checkpoint instead")
    finetuned = ckpt.task != "distill"
    student = build_student(s, finetune=finetuned, fd_init=False)
    # exact load: the checkpoint was written from this very architecture
    load_converted_state_dict(student, ckpt.student, source=str(ckpt.path), layout=LAYOUT_FDFAST, arch=s.arch,
                              expected_missing=())
    if fmt == "official":
        if finetuned:
            raise ExportError(f"{ckpt.path} holds a fine-tuned student (train.task={ckpt.task!r}, "
                              f"{s.num_classes}-class head); the official layout is for distilled students. "
                              "Use --format timm")
        if ckpt.heads:
            log.warning("the official layout has one decoder, the projector onto one teacher; this student of "
                        "%d teachers (%s) is written as encoder.* only (what the official fine-tuning loader "
                        "reads); --with-heads writes its heads beside it", len(ckpt.heads), ", ".join(ckpt.heads))
        elif ckpt.projector is None:
            log.warning("checkpoint has no projector; writing encoder.* only (enough for the official "
                        "fine-tuning loader)")
        target = Path(out) / "checkpoint.pth" if Path(out).is_dir() else Path(out)
        provenance = {"source": str(ckpt.path), "step": ckpt.step, "student": dataclasses.asdict(s)}
        if ckpt.heads:
            provenance["teachers"] = list(ckpt.heads)
        return export_official(student, ckpt.projector, target, s.arch, extra={"fdfast": provenance})
    if fmt != "timm":
        raise ValueError(f"format {fmt!r}: expected 'timm' or 'official'")
    args = timm_kwargs(s, finetune=finetuned)
    if finetune_layout and s.arch == "beit" and not finetuned:
        layout_cfg = dataclasses.replace(s, num_classes=0)
        ft = build_student(layout_cfg, finetune=True, fd_init=False)
        load_converted_state_dict(ft, student.state_dict(), source=str(ckpt.path), layout=LAYOUT_FDFAST,
                                  arch=s.arch, expected_missing=("fc_norm.",))
        student, args = ft, timm_kwargs(layout_cfg, finetune=True)
    elif finetune_layout:
        log.info("finetune layout: nothing to change for a %s student", "fine-tuned" if finetuned else s.arch)
    name = model_name or default_timm_model_name(s.arch, args)
    return export_timm(student, out, name, eval_preprocessing(cfg), model_args=args)
