"""Student weights from every layout FD users meet, loaded strictly with a report.

Layouts read by :func:`read_student_state_dict` (all through the load policy of :mod:`.reading`):

* ``fdfast-train``: fdfast's own checkpoint (``step_XXXXXXXX/state.pt``, its folder, or the run folder, whose
  newest complete checkpoint is taken). The trainer writes ``state['model']``: for distillation the
  ``DistillModel`` state (``encoder.*`` timm keys + ``decoder.weight/bias``, the projector), for fine-tuning
  and the linear probe the bare timm student; ``state['config']['train']['task']`` says which.
* ``fd-official``: a file written by the official ``main_fd.py``: ``{'model': {'encoder.*', 'decoder.*',
  'feature_model.*'}, 'config': <yacs CfgNode>, ...}``. Only ``encoder.*`` is kept, as the official
  ``load_pretrained`` does.
* ``student-key``: EsViT-style files whose weights sit under ``['student']``.
* ``timm-safetensors`` / ``state-dict``: plain timm weights (``.safetensors``, or a ``.pth`` holding a state
  dict, possibly under ``'model'`` / ``'state_dict'``), e.g. what the timm export writes.

Unlike the official ``load_state_dict(strict=False)`` (spec §6 pitfall 7), :func:`load_student_weights` raises
:class:`CheckpointKeyError` when anything besides the expected fresh head is missing or left over.
"""
from __future__ import annotations

import collections
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn

from ..checkpoint import FORMAT, find_latest
from .conversion import (OFFICIAL_REBUILT_BUFFERS, CheckpointKeyError, CheckpointShapeError,
                         convert_swin_for_finetune, convert_vit_for_finetune, detect_arch, normalise_projector,
                         official_to_distill_state_dict, shape_mismatches, state_dict_mismatch, unwrap_model)
from .reading import (CheckpointReadError, check_state_dict, fmt_keys, load_safetensors, load_torch_file,
                      strip_wrapper_prefixes)

log = logging.getLogger(__name__)

# Layout names returned by read_student_state_dict (and recorded in LoadReport.layout).
LAYOUT_FDFAST = "fdfast-train"
LAYOUT_OFFICIAL = "fd-official"
LAYOUT_STUDENT_KEY = "student-key"
LAYOUT_SAFETENSORS = "timm-safetensors"
LAYOUT_STATE_DICT = "state-dict"


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
def resolve_checkpoint_file(path: str | os.PathLike) -> Path:
    """The weights file a user means by ``path``: the file itself, or inside a folder ``state.pt``
    (an fdfast step folder), ``model.safetensors`` / ``pytorch_model.bin`` (timm / HF layout), or the
    newest complete fdfast checkpoint of a run folder (``<output_dir>`` or ``<output_dir>/checkpoints``)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise CheckpointReadError(f"{p}: no such file or folder")
    if not p.is_dir():
        raise CheckpointReadError(f"{p}: not a regular file or folder")
    for name in ("state.pt", "model.safetensors", "pytorch_model.bin"):
        if (p / name).is_file():
            return p / name
    for run in (p, p.parent):
        latest = find_latest(run)
        if latest is not None:
            log.info("using the newest complete checkpoint %s", latest)
            return latest / "state.pt"
    raise CheckpointReadError(
        f"{p}: folder holds no state.pt, model.safetensors or pytorch_model.bin and no complete "
        "step_* checkpoint; pass the weights file (or an fdfast step_XXXXXXXX folder) instead")


@dataclass
class FdfastCheckpoint:
    """What :func:`read_fdfast_checkpoint` returns."""
    path: Path
    task: str  # train.task of the run that wrote it: distill | finetune | linprobe
    student: dict  # timm keys
    projector: Optional[dict]  # distillation: {'weight': [Dt, Ds], 'bias': [Dt]}
    config: dict
    step: Optional[int] = None
    heads: Optional[dict] = None  # several teachers: {name: the head's state dict}
    task_state: Optional[dict] = None  # the task's own state (several teachers: {'phi_s': {name: buffers}})


def _split_fdfast_state(state: Mapping, path: Path) -> tuple[str, dict, Optional[dict], Optional[dict]]:
    """(task, student state dict, projector or None, heads or None) of what the trainer wrote under
    ``state['model']``: one teacher's ``encoder.*`` + ``decoder.*``, or several teachers' ``encoder.*`` +
    ``heads.<name>.*`` (:class:`~fdfast.models.heads.MultiDistillModel`)."""
    config = state.get("config")
    train = config.get("train") if isinstance(config, Mapping) else None
    task = str(train.get("task", "distill")) if isinstance(train, Mapping) else "distill"
    model = strip_wrapper_prefixes(check_state_dict(state.get("model"), path, "['model']"))
    if task != "distill":
        return task, model, None, None
    student = {k[len("encoder."):]: v for k, v in model.items() if k.startswith("encoder.")}
    projector = {k[len("decoder."):]: v for k, v in model.items() if k.startswith("decoder.")}
    heads: dict[str, dict] = {}
    for k, v in model.items():
        if k.startswith("heads."):
            name, _, rest = k[len("heads."):].partition(".")
            heads.setdefault(name, {})[rest] = v
    other = [k for k in model if not k.startswith(("encoder.", "decoder.", "heads."))]
    if not student or other or (projector and heads):
        raise CheckpointReadError(
            f"{path}: a distillation checkpoint's ['model'] holds the student (encoder.*) and its projector "
            f"(decoder.*) or its heads (heads.<teacher>.*), but this one has {fmt_keys(other or list(model))}")
    return task, student, normalise_projector(projector, path) if projector else None, heads or None


def read_fdfast_checkpoint(path: str | os.PathLike) -> FdfastCheckpoint:
    """Read an fdfast training checkpoint (state.pt, its step folder, or the run folder).

    fdfast checkpoints hold tensors and plain values only, so no opt-in to unsafe loading applies.
    """
    file = resolve_checkpoint_file(path)
    state = load_torch_file(file, opt_in=None)
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        fmt = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise CheckpointReadError(
            f"{file}: not an fdfast training checkpoint (format={fmt!r}); pass a "
            "<output_dir>/checkpoints/step_XXXXXXXX folder or its state.pt written by fdfast-train")
    config = state.get("config")
    if not isinstance(config, Mapping):
        raise CheckpointReadError(f"{file}: fdfast checkpoint has no 'config' mapping, so the student "
                                  "architecture is unknown")
    task, student, projector, heads = _split_fdfast_state(state, file)
    step = state.get("step")
    extra = state.get("extra")
    return FdfastCheckpoint(path=file, task=task, student=student, projector=projector, config=dict(config),
                            step=int(step) if isinstance(step, (int, float)) else None, heads=heads,
                            task_state=dict(extra) if isinstance(extra, Mapping) else None)


def read_student_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False) -> tuple[dict, str]:
    """(student state dict with timm-or-official key names, detected layout) from any supported file.

    Selection follows the official loader: take ``['model']`` if present, then ``['student']`` if present;
    if any key starts with ``encoder.`` keep only those and remove the prefix (dropping the projector
    ``decoder.*`` and the teacher ``feature_model.*``); strip ``module.`` / ``_orig_mod.`` wrappers. (The
    wrappers are stripped first, so a DDP-wrapped FD state ``module.encoder.*`` also works.) Key names of
    official SwinV2 files stay official (``rpe_mlp``, downsample at the end of a stage):
    :func:`convert_swin_for_finetune` maps them. ``trust_pickle`` is the command's ``--trust-pickle``.
    """
    file = resolve_checkpoint_file(path)
    if file.suffix == ".safetensors":
        sd = load_safetensors(file)
        return strip_wrapper_prefixes(check_state_dict(sd, file, "the file")), LAYOUT_SAFETENSORS
    obj = load_torch_file(file, trust_pickle=trust_pickle)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return _split_fdfast_state(obj, file)[1], LAYOUT_FDFAST
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
    sd = strip_wrapper_prefixes(check_state_dict(sd, file, what))
    if any(k.startswith("encoder.") for k in sd):
        dropped = sorted({k.split(".", 1)[0] for k in sd if not k.startswith("encoder.")})
        sd = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
        if layout == LAYOUT_STATE_DICT:
            layout = LAYOUT_OFFICIAL
        if dropped:
            log.info("%s: kept encoder.* (the student), skipped %s", file, ", ".join(f"{d}.*" for d in dropped))
    return sd, layout


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
            lines.append(f"  starting fresh (expected): {fmt_keys(self.missing)}")
        for k, why in self.dropped.items():
            lines.append(f"  not loaded from the file: {k}: {why}")
        for k, (a, b) in self.resized.items():
            lines.append(f"  resized: {k}: {a} -> {b}")
        return "\n".join(lines)


def _describe_key_mismatch(missing: Sequence[str], unexpected: Sequence[str], file_sd: Mapping[str, Any],
                           model_sd: Mapping[str, Any]) -> str:
    """The key lists of a failed load (either may be empty, not both) and what the keys suggest."""
    parts = []
    if missing:
        parts.append(f"missing from the file ({len(missing)}): {fmt_keys(missing)}")
    if unexpected:
        parts.append(f"in the file but not in the model ({len(unexpected)}): {fmt_keys(unexpected)}")
    return "; ".join(parts) + "." + _prefix_hint(unexpected, set(model_sd)) + _block_hint(file_sd, model_sd)


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
    if arch not in ("beit", "swinv2"):
        raise ValueError(f"arch={arch!r}: expected 'beit' or 'swinv2'")
    conv = (convert_vit_for_finetune if arch == "beit" else convert_swin_for_finetune)(sd, model)
    file_sd = conv.state_dict
    model_sd = model.state_dict()
    expected = tuple(expected_missing)

    bad_shapes = []
    for k, diff in shape_mismatches(file_sd, model_sd).items():
        if k.startswith(expected):
            conv.dropped[k] = (f"shape {tuple(file_sd[k].shape)} differs from the model's "
                               f"{tuple(model_sd[k].shape)}; starts fresh like the rest of the head")
            del file_sd[k]
        else:
            bad_shapes.append(diff)
    if bad_shapes:
        raise CheckpointShapeError(
            f"{source} ({layout}) does not fit this {arch} model: {len(bad_shapes)} tensor(s) differ in shape: "
            f"{fmt_keys(bad_shapes)}. The file was written for another architecture: make the student "
            "settings (model.student.embed_dim / depth / num_heads / patch_size) match the "
            "distillation run that wrote it.")

    missing, unexpected = state_dict_mismatch(file_sd, model_sd)
    bad_missing = [k for k in missing if not k.startswith(expected)]
    if bad_missing or unexpected:
        raise CheckpointKeyError(
            f"{source} ({layout}) does not fit this {arch} model; "
            + _describe_key_mismatch(bad_missing, unexpected, file_sd, model_sd) + " Check that the file is a "
            "student of this architecture (model.student.*) and, if a part of the model is meant to start "
            "fresh, list its prefix in expected_missing.")

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
    :class:`CheckpointKeyError` or :class:`CheckpointShapeError` (all ``UserError``) with the file and keys
    named; on success the report is logged at INFO and returned.
    """
    sd, layout = read_student_state_dict(path, trust_pickle=trust_pickle)
    return load_converted_state_dict(model, sd, source=str(path), layout=layout, arch=arch,
                                     expected_missing=expected_missing)


def load_official_distill_checkpoint(model: nn.Module, path: str | os.PathLike, *,
                                     trust_pickle: bool = False) -> LoadReport:
    """Load a file written by the official ``main_fd.py`` (``{'model': {'encoder.*', 'decoder.*',
    'feature_model.*'}, 'config': <yacs CfgNode>, ...}``) into a ``DistillModel``: student AND projector.

    The file is read under the load policy (the yacs config rebuilt as plain data), mapped by
    :func:`official_to_distill_state_dict` and loaded strictly: any missing or unexpected key raises
    :class:`CheckpointKeyError`, any shape difference :class:`CheckpointShapeError` (e.g. a projector
    distilled from a teacher of another width), before the model is touched. For the encoder alone
    (fine-tuning, a stripped file without ``decoder.*``) use :func:`load_student_weights`.
    """
    file = resolve_checkpoint_file(path)
    obj = load_torch_file(file, trust_pickle=trust_pickle)
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{file}: holds a {type(obj).__name__}, not an official FD checkpoint")
    what = "['model']" if isinstance(obj.get("model"), Mapping) else "the file"
    sd = strip_wrapper_prefixes(check_state_dict(obj["model"] if what == "['model']" else obj, file, what))
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
        if k.startswith("encoder.") and k.rsplit(".", 1)[-1] in OFFICIAL_REBUILT_BUFFERS:
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
                                   f"{fmt_keys(bad_shapes)}.{hint}")
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
