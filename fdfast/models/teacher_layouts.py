"""Weights of a ``kind: timm`` teacher from disk: where the tensors are, and how they become the model's.

``model.teacher.weights`` may be (nothing is downloaded; no hub client is used):

* a **timm / Hugging Face folder**: ``config.json`` as timm writes it (``architecture``, ``model_args``,
  ``pretrained_cfg`` with the normalisation) beside ``model.safetensors`` or ``pytorch_model.bin``; or an
  **OpenCLIP folder**: ``open_clip_config.json`` (its ``preprocess_cfg`` normalisation) beside
  ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``;
* a **Hugging Face hub cache**: a repository folder ``models--ORG--NAME`` (``refs/main`` names the snapshot
  under ``snapshots/``), or the cache root that holds ``models--timm--<model.teacher.model>``;
* a **single file**: ``.safetensors`` (read without unpickling) or ``.bin`` / ``.pth`` / ``.pt`` (through the
  one load policy, :func:`fdfast.interop.reading.load_torch_file`), in timm's keys or in an original release
  layout that timm's ``checkpoint_filter_fn`` of the family converts: DINOv2 (``mask_token``,
  ``register_tokens``), DINOv3 (``storage_tokens``, ``ls1.gamma``), OpenAI / OpenCLIP (``visual.*``, with the
  text tower), OpenCLIP timm trunks (``visual.trunk.*``: SigLIP, EVA-02), PE (``visual.conv1 ...``).

Loading is strict: after timm's converter every model parameter must come from the file and every file key
must land in the model, except what a headless teacher does not use, which is reported by name: the text
tower of a whole CLIP model and ``head.*`` (a classifier or the image-text projection). A file whose patch
embedding has another width or patch size than the model is refused before timm's converter would resample it.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn as nn

from ..interop.conversion import shape_mismatches, state_dict_mismatch
from ..interop.reading import CheckpointReadError, fmt_keys, load_safetensors, strip_wrapper_prefixes
from .families import Family
from .teacher_files import TeacherLoadError, read_release_object, verified_sha256

_KEY = "model.teacher.weights"
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                  "open_clip_pytorch_model.bin")
_RESERVED_ARGS = ("img_size", "num_classes", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay")
_EXPECTED = ("a timm folder (config.json + model.safetensors / pytorch_model.bin), an OpenCLIP folder, a Hugging "
             "Face hub cache (models--timm--NAME), or a .safetensors / .bin / .pth file")


@dataclass(frozen=True)
class WeightsLocation:
    """Where a teacher's tensors are, and what their folder says about them."""
    file: Path
    layout: str
    """How it was found, for messages and records (e.g. 'timm folder', 'hub cache ... snapshot 1a2b3c4')."""
    config: dict = field(default_factory=dict)
    """The folder's timm ``config.json`` ({} without one)."""
    mean: Optional[tuple] = None
    std: Optional[tuple] = None

    @property
    def model_args(self) -> dict:
        """timm.create_model arguments the folder's config records for these weights (img_size and the head
        are the teacher's own choice)."""
        args = self.config.get("model_args") or {}
        return {k: v for k, v in args.items() if k not in _RESERVED_ARGS}

    @property
    def normalisation_source(self) -> str:
        return f"{self.file.parent.name}/{'config.json' if self.config else 'open_clip_config.json'}"


class TimmTeacherFile(NamedTuple):
    state_dict: dict
    sha256: str
    unused: list
    """One line per group of file keys the teacher does not use (text tower, heads)."""


# ----------------------------------------------------------------------------------------------
# Finding the tensors
# ----------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TeacherLoadError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise TeacherLoadError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _snapshot(repo: Path) -> tuple[Path, str]:
    """The snapshot folder a hub-cache repository's ``refs/main`` points to."""
    ref = repo / "refs" / "main"
    snapshots = sorted(p for p in (repo / "snapshots").iterdir() if p.is_dir())
    if ref.is_file():
        commit = ref.read_text().strip()
        if not (repo / "snapshots" / commit).is_dir():
            raise TeacherLoadError(f"{repo}: refs/main names snapshot {commit}, which is not in snapshots/ "
                                   f"(an incomplete download? point {_KEY} at one of the snapshots/ folders)")
        return repo / "snapshots" / commit, commit
    if len(snapshots) == 1:
        return snapshots[0], snapshots[0].name
    raise TeacherLoadError(f"{repo}: no refs/main and {len(snapshots)} snapshots; point {_KEY} at one of "
                           f"{fmt_keys([str(p) for p in snapshots])}")


def _repo_in_cache(root: Path, model_name: str) -> Path:
    """``models--timm--<model>`` of a hub cache root; the model's tag may be left out when only one is cached."""
    repos = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("models--")]
    exact = root / f"models--timm--{model_name}"
    if exact.is_dir():
        return exact
    tagged = [p for p in repos if "." not in model_name and p.name.startswith(f"models--timm--{model_name}.")]
    if len(tagged) == 1:
        return tagged[0]
    have = fmt_keys(sorted(p.name for p in repos))
    raise TeacherLoadError(
        f"{root}: a hub cache without {'one' if not tagged else 'a single'} models--timm--{model_name} repository "
        f"(it holds {have}); set model.teacher.model to the cached name or point {_KEY} at the repository folder")


def _folder(folder: Path, how: str) -> WeightsLocation:
    for name in FOLDER_WEIGHTS:
        if (folder / name).is_file():
            return _with_config(folder / name, how)
    raise TeacherLoadError(f"{folder}: a folder without {' / '.join(FOLDER_WEIGHTS)}; point {_KEY} at {_EXPECTED}")


def _with_config(file: Path, how: str) -> WeightsLocation:
    folder = file.parent
    if (folder / "config.json").is_file() and not file.name.startswith("open_clip_"):
        config = _read_json(folder / "config.json")
        if "architecture" not in config:
            kind = config.get("model_type") or ", ".join(config.get("architectures", [])) or "unknown"
            raise TeacherLoadError(
                f"{folder}/config.json is not timm's (no 'architecture'; model_type {kind!r}: a Hugging Face "
                f"transformers model, whose keys timm does not read). Use the timm/<model> repository's folder "
                "or the original release file")
        pre = config.get("pretrained_cfg") or {}
        return WeightsLocation(file, how, config, _triple(pre.get("mean")), _triple(pre.get("std")))
    if (folder / "open_clip_config.json").is_file() and file.name in FOLDER_WEIGHTS:
        pre = _read_json(folder / "open_clip_config.json").get("preprocess_cfg") or {}
        return WeightsLocation(file, how.replace("timm", "OpenCLIP"), {}, _triple(pre.get("mean")),
                               _triple(pre.get("std")))
    return _single(file)


def _single(file: Path) -> WeightsLocation:
    return WeightsLocation(file, "safetensors file" if file.suffix == ".safetensors" else "PyTorch file")


def _triple(value) -> Optional[tuple]:
    return tuple(float(v) for v in value) if isinstance(value, (list, tuple)) and len(value) == 3 else None


def locate_weights(weights: str, model_name: str) -> WeightsLocation:
    """Resolve ``model.teacher.weights`` to the tensor file and its folder's metadata."""
    path = Path(os.path.expanduser(weights))
    if path.is_file():
        return _with_config(path, "timm folder") if path.name in FOLDER_WEIGHTS else _single(path)
    if not path.is_dir():
        raise TeacherLoadError(f"teacher weights not found: {path} (config key {_KEY}; point it at {_EXPECTED}, "
                               "or set it to 'random' for an untrained teacher)")
    if (path / "snapshots").is_dir():
        snapshot, commit = _snapshot(path)
        return _folder(snapshot, f"hub cache {path.name} snapshot {commit[:12]}")
    if not any((path / name).is_file() for name in FOLDER_WEIGHTS) and any(
            p.name.startswith("models--") for p in path.iterdir()):
        repo = _repo_in_cache(path, model_name)
        snapshot, commit = _snapshot(repo)
        return _folder(snapshot, f"hub cache {repo.name} snapshot {commit[:12]}")
    return _folder(path, "timm folder")


def check_architecture(location: WeightsLocation, model_name: str) -> None:
    """A timm folder names the architecture its weights are for; a different ``model.teacher.model`` is refused."""
    arch = location.config.get("architecture")
    if arch and arch != model_name.split(".")[0]:
        tag = (location.config.get("pretrained_cfg") or {}).get("tag")
        raise TeacherLoadError(
            f"{location.file.parent}/config.json holds weights of timm {arch!r}, but model.teacher.model="
            f"{model_name!r}: set model.teacher.model to {arch + ('.' + tag if tag else '')!r}")


# ----------------------------------------------------------------------------------------------
# Reading and converting
# ----------------------------------------------------------------------------------------------
def _read_tensors(location: WeightsLocation, trust_pickle: bool) -> dict:
    file = location.file
    if file.suffix == ".safetensors":
        try:
            return load_safetensors(file)
        except CheckpointReadError as e:
            raise TeacherLoadError(f"{e} (config key {_KEY})") from None
    obj, _ = read_release_object(file, trust_pickle)
    if not isinstance(obj, dict):
        raise TeacherLoadError(f"{file}: holds a pickled {type(obj).__name__}, not a state dict")
    for wrapper in ("state_dict", "model"):  # training-checkpoint wrappers both of timm's filters unwrap
        if isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    return strip_wrapper_prefixes(obj)


def _patch_embed(sd: dict) -> Optional[tuple[str, torch.Tensor]]:
    for key, value in sd.items():
        if key.endswith(("patch_embed.proj.weight", "conv1.weight")) and torch.is_tensor(value) and value.ndim == 4:
            return key, value
    return None


def _check_patch_embed(file: Path, sd: dict, model: nn.Module, model_name: str) -> None:
    # timm's filters resample a patch embedding of another kernel size silently; for a frozen teacher that is
    # another network, so refuse it, naming both geometries.
    found = _patch_embed(sd)
    if found is None or not hasattr(model, "patch_embed"):
        return
    key, w = found
    want = model.patch_embed.proj.weight
    if (w.shape[0], w.shape[-1]) != (want.shape[0], want.shape[-1]):
        raise TeacherLoadError(
            f"{file}: its patch embedding ({key}) has width {w.shape[0]} and patch {w.shape[-1]}, model.teacher."
            f"model={model_name!r} (with model.teacher.model_kwargs) has width {want.shape[0]} and patch "
            f"{want.shape[-1]}: name the architecture the file was trained as")


def _check_dropped_qkv_bias(file: Path, sd: dict, model_sd: dict) -> None:
    # DINOv3's releases store zero qkv biases; timm's filter drops them when the model has none
    # (vit_*_dinov3). Dropping non-zero biases would change the teacher: then the *_qkvb model is needed.
    if "blocks.0.attn.qkv.bias" in sd and "storage_tokens" in sd and "blocks.0.attn.q_bias" not in model_sd:
        nonzero = [k for k, v in sd.items() if k.endswith("attn.qkv.bias") and bool(v.any())]
        if nonzero:
            raise TeacherLoadError(f"{file}: non-zero qkv biases ({fmt_keys(nonzero, 3)}) that this model has no "
                                   "place for: use the '*_dinov3_qkvb' variant of model.teacher.model")


def _outside_image_tower(sd: dict) -> tuple[str, list[str]]:
    """(image tower prefix, keys of a whole CLIP-style model outside it): the text tower, CLIP's scalars and,
    for an OpenCLIP timm trunk, the projection head beside ``visual.trunk``; timm's converters skip them."""
    tower = "visual.trunk." if any(k.startswith("visual.trunk.") for k in sd) else "visual."
    if not any(k.startswith(tower) for k in sd):
        return "", []
    return tower, [k for k in sd if not k.startswith(tower)]


def read_timm_teacher_file(location: WeightsLocation, model: nn.Module, family: Family, model_name: str, *,
                           trust_pickle: bool = False) -> TimmTeacherFile:
    """The model's state dict from ``location`` (timm's converter of ``family``), its SHA-256 and the report of
    unused keys; raises :class:`~.teacher_files.TeacherLoadError` for anything that does not load strictly."""
    file = location.file
    sha256 = verified_sha256(file)
    raw = _read_tensors(location, trust_pickle)
    unused = []
    tower, outside = _outside_image_tower(raw)
    if outside:
        unused.append(f"{len(outside)} keys outside {tower}* (text tower, CLIP scalars, projection: "
                      f"{fmt_keys(outside, 4)})")
    others = [k for k, v in raw.items() if not torch.is_tensor(v)]
    if others:
        raise TeacherLoadError(f"{file}: {fmt_keys(others, 4)} are not tensors; not a state dict timm can convert")
    model_sd = model.state_dict()
    _check_patch_embed(file, raw, model, model_name)
    _check_dropped_qkv_bias(file, raw, model_sd)
    with contextlib.redirect_stdout(io.StringIO()):  # eva's filter prints every qkv bias it skips
        sd = family.filter_fn(dict(raw), model)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    heads = sorted(k for k in sd if k.startswith("head.") and k not in model_sd)
    if heads:
        unused.append(f"{', '.join(heads)} (a classifier or the image-text projection; the teacher is headless)")
        for k in heads:
            del sd[k]
    missing, unexpected = state_dict_mismatch(sd, model_sd)
    if missing or unexpected:
        parts = ([f"{len(missing)} model keys missing from the file ({fmt_keys(missing, 5)})"] if missing else []) + (
            [f"{len(unexpected)} file keys the model does not have ({fmt_keys(unexpected, 5)})"] if unexpected else [])
        raise TeacherLoadError(f"{file} ({location.layout}): does not load into model.teacher.model={model_name!r}: "
                               f"{'; '.join(parts)}")
    bad = list(shape_mismatches(sd, model_sd).values())
    if bad:
        raise TeacherLoadError(f"{file}: {len(bad)} tensors have another shape than in model.teacher.model="
                               f"{model_name!r} ({'; '.join(bad[:4])})")
    return TimmTeacherFile(sd, sha256, unused)
