"""A distilled student's heads as their own file (``fdfast-export --with-heads``), and reading them back.

The backbone export (timm or official layout) holds the student alone. With ``--with-heads`` a safetensors file
beside it, ``<backbone stem>.heads.safetensors``, holds every projector head the run trained, by teacher name:

* tensors ``<name>.<parameter>`` (a linear head: ``<name>.weight`` [Dt, Ds], ``<name>.bias``; an MLP head:
  ``<name>.fc1.*``, ``<name>.norm.*``, ``<name>.fc2.*``, :class:`~fdfast.models.heads.MLPHead`); for a teacher
  whitened with PHI-S also ``<name>.phi_s.mean`` / ``.transform`` / ``.scale``, which map a head's output back to
  the teacher's feature space: ``x = mean + scale² · transformᵀ y``;
* metadata ``fdfast_heads`` (JSON): per name the head kind, its widths, the loss weight, the whitening, the teacher
  (kind, timm model, weights) and its token rule.

A one-teacher run has one head, FD's projector, under the name ``teacher``. :func:`read_heads` rebuilds the heads
as modules (strict load; safetensors never unpickle).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ..files import atomic_write
from ..config import FDConfig
from ..models.heads import build_head
from .loading import FdfastCheckpoint
from .reading import CheckpointReadError, load_safetensors

log = logging.getLogger(__name__)

META_KEY = "fdfast_heads"
SINGLE_NAME = "teacher"


def heads_path(backbone: Path) -> Path:
    """Where the heads of the backbone file ``backbone`` go: ``<stem>.heads.safetensors`` beside it."""
    return backbone.with_name(f"{backbone.stem}.heads.safetensors")


def _head_kind(sd: dict) -> str:
    return "mlp" if "fc1.weight" in sd else "linear"


def _describe(entry: Any, sd: dict, weight: float, whiten: str) -> dict:
    kind = _head_kind(sd)
    first, last = (sd["fc1.weight"], sd["fc2.weight"]) if kind == "mlp" else (sd["weight"], sd["weight"])
    return {"head": kind, "in_dim": int(first.shape[1]), "out_dim": int(last.shape[0]), "weight": weight,
            "whiten": whiten, "teacher": {"kind": entry.kind, "model": entry.model, "weights": str(entry.weights)},
            "tokens": entry.tokens, "grid": entry.grid}


def export_heads(ckpt: FdfastCheckpoint, cfg: FDConfig, backbone: Path) -> Path:
    """Write the heads of the distillation checkpoint ``ckpt`` (its config ``cfg``) beside ``backbone``."""
    from safetensors.torch import save_file  # noqa: PLC0415 - optional writer, as the timm export

    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, dict] = {}
    if ckpt.heads:
        phi_s = (ckpt.task_state or {}).get("phi_s") or {}
        for entry in cfg.model.teachers:
            sd = ckpt.heads.get(entry.name)
            if sd is None:
                raise CheckpointReadError(f"{ckpt.path}: no head for teacher {entry.name!r} of its config")
            meta[entry.name] = _describe(entry, sd, entry.weight, entry.whiten)
            tensors.update({f"{entry.name}.{k}": v for k, v in sd.items()})
            stats = phi_s.get(entry.name)
            if entry.whiten == "phi_s" and stats is not None:
                tensors.update({f"{entry.name}.phi_s.{k}": stats[k] for k in ("mean", "transform", "scale")})
    elif ckpt.projector is not None:
        meta[SINGLE_NAME] = _describe(cfg.model.teacher, ckpt.projector, 1.0, "layernorm")
        tensors.update({f"{SINGLE_NAME}.{k}": v for k, v in ckpt.projector.items()})
    else:
        raise CheckpointReadError(f"{ckpt.path}: holds no projector and no heads to export (--with-heads)")
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    out = heads_path(backbone)
    metadata = {"format": "pt", "producer": "fdfast", META_KEY: json.dumps(meta)}  # in model.teachers order
    atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    log.info("wrote %s (heads: %s)", out, ", ".join(f"{n} ({m['head']} {m['in_dim']}->{m['out_dim']})"
                                                    for n, m in meta.items()))
    return out


def read_heads(path: str | Path) -> dict[str, tuple[nn.Module, dict]]:
    """``{teacher name: (head module, its metadata)}`` of a heads file written by :func:`export_heads`."""
    from safetensors import safe_open  # noqa: PLC0415 - optional reader

    path = Path(path)
    tensors = load_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise CheckpointReadError(f"{path}: not a heads file of fdfast-export --with-heads (no {META_KEY} metadata)")
    out = {}
    for name, meta in json.loads(raw).items():
        head = build_head(meta["head"], meta["in_dim"], meta["out_dim"])
        prefix = f"{name}."
        sd = {k[len(prefix):]: v for k, v in tensors.items()
              if k.startswith(prefix) and not k[len(prefix):].startswith("phi_s.")}
        head.load_state_dict(sd, strict=True)
        out[name] = (head, meta)
    return out
