"""Any model a user points fdfast-analyze or fdfast-eval at, built with the same loaders and load policy
as training. A model argument is one of:

* an fdfast run folder, ``step_XXXXXXXX`` folder or ``state.pt``: the architecture comes from the
  checkpoint's config. A distilled run gives its student (and projector); its teacher is rebuilt from the
  config's ``model.teacher`` (a ``random`` teacher with the run's ``train.seed``, exactly as the trainer
  drew it) unless ``--teacher`` is given. A fine-tuned run gives the classifier;
* an official FD checkpoint (``{'model': {'encoder.*', 'decoder.*', ...}}``) or another student weights
  file :func:`~fdfast.interop.loading.read_student_state_dict` reads; the architecture (BEiT-style ViT or SwinV2)
  is read from the tensor shapes. With ``--teacher`` the official projector (``decoder.*``) is loaded too;
* a timm export folder (``config.json`` + ``model.safetensors``): ``timm.create_model("local-dir:...")``;
* ``random:<timm name>``: a randomly initialised timm model (smoke tests); the n-th argument's weights come
  from seed n (0, 1, ...), so two analyses of the same arguments agree and two random models differ.

``--teacher`` (a release file or ``random``, with ``--teacher-kind`` / ``--teacher-model``) is built by
:func:`fdfast.models.teachers.build_teacher`. Pickled code never runs unless the caller passes
``trust_pickle`` (the command's ``--trust-pickle``); a run's saved config never grants it.
Weights stay fp32 (a teacher configured with ``fp16_weights`` or ``bf16`` is analysed in fp32).
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import timm
import torch
import torch.nn as nn
from safetensors import SafetensorError

from ..config import StudentConfig, TeacherConfig
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..errors import UserError
from .conversion import official_to_distill_state_dict
from .export import checkpoint_config, eval_preprocessing
from .loading import (LAYOUT_FDFAST, LAYOUT_OFFICIAL, load_converted_state_dict, read_fdfast_checkpoint,
                      read_student_state_dict, resolve_checkpoint_file)
from .reading import fmt_keys, load_torch_file
from ..models.student import build_student
from ..models.teachers import Teacher, build_teacher


class SourceError(UserError, ValueError):
    """A model argument that cannot be analysed; the message names it and what would work."""


@dataclass(frozen=True)
class TeacherSpec:
    """``--teacher`` and its options: a ``model.teacher`` section given on the command line."""
    weights: str
    kind: str = "clip"
    model: str = TeacherConfig.model
    model_kwargs: Optional[dict] = None
    img_size: Optional[int] = None


@dataclass
class Subject:
    """One loaded model. ``network`` is the timm module; ``role`` is ``student`` (distilled), ``teacher``,
    ``classifier`` (fine-tuned) or ``backbone``. A student with a ``teacher`` and ``projector`` has the FD
    loss, a classifier (``num_classes`` > 0) cross-entropy; a teacher's ``teacher`` is itself (no projector, so
    no loss of its own). ``mean``/``std``/``eval_resize`` are the
    evaluation preprocessing the model expects (``eval_resize`` None: 256/224 of ``img_size``)."""
    name: str
    role: str
    source: str
    network: nn.Module
    img_size: int
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD
    arch: str = ""
    projector: Optional[nn.Module] = None
    teacher: Optional[Teacher] = None
    num_classes: int = 0
    whiten_eps: float = 1e-5
    loss_beta: float = 2.0
    eval_resize: Optional[int] = None

    @property
    def loss_kind(self) -> Optional[str]:
        if self.teacher is not None and self.projector is not None:
            return "fd"
        return "ce" if self.num_classes > 0 else None


def _teacher_subject(teacher: Teacher, name: str) -> Subject:
    return Subject(name=name, role="teacher", source=f"{teacher.kind} {teacher.model_name} ({teacher.weights})",
                   network=teacher.model, img_size=teacher.img_size, mean=tuple(teacher.mean),
                   std=tuple(teacher.std), teacher=teacher)


def build_teacher_from_spec(spec: TeacherSpec, student_img_size: int, *, trust_pickle: bool = False) -> Teacher:
    cfg = TeacherConfig(kind=spec.kind, model=spec.model, model_kwargs=dict(spec.model_kwargs or {}),
                        weights=spec.weights, img_size=spec.img_size)
    return build_teacher(cfg, student_img_size, trust_pickle=trust_pickle)


def run_teacher(cfg, *, trust_pickle: bool = False) -> Teacher:
    """The teacher of a distillation run's config. The trainer seeds ``train.seed`` and builds the
    teacher first, so a ``random`` teacher drawn the same way is the very teacher the student learnt from."""
    if cfg.model.teachers:  # one student, several heads: no single teacher + projector to compare with
        raise SourceError(f"the run distilled from {len(cfg.model.teachers)} teachers "
                          f"({', '.join(t.name for t in cfg.model.teachers)}), and the FD loss here compares one")
    tcfg = dataclasses.replace(cfg.model.teacher, fp16_weights=False, bf16=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.train.seed)
        # trust comes from the caller's command line only, never from the run's saved config
        return build_teacher(tcfg, cfg.model.student.img_size, trust_pickle=trust_pickle,
                             student=cfg.model.student)  # the run's token rules: input size, target tokens


def _projector(sd: dict, teacher: Teacher, source: str) -> nn.Linear:
    w = sd["weight"]
    if w.shape[0] != teacher.embed_dim:
        raise SourceError(f"{source}: the projector maps to {w.shape[0]} channels but the teacher "
                          f"({teacher.model_name}) has {teacher.embed_dim}; pass the teacher it was distilled from")
    proj = nn.Linear(w.shape[1], w.shape[0])
    proj.load_state_dict(sd)
    return proj


# ----------------------------------------------------------------------------------------------
# fdfast checkpoints
# ----------------------------------------------------------------------------------------------
def _run_name(file: Path) -> str:
    """``runs/demo/checkpoints/step_X/state.pt`` -> ``demo``."""
    step = file.parent
    return step.parent.parent.name if step.parent.name == "checkpoints" else step.name


def _from_fdfast(file: Path, teacher: Optional[Teacher], with_teacher: bool,
                 trust_pickle: bool) -> tuple[Subject, Optional[Teacher]]:
    ckpt = read_fdfast_checkpoint(file)
    cfg = checkpoint_config(ckpt)  # also reads configs written before keys moved
    s, task = cfg.model.student, cfg.train.task
    if task == "linprobe":
        raise SourceError(f"{file}: a linear-probe checkpoint (frozen backbone + BatchNorm head); analyse the "
                          f"distilled student it probed instead (its model.pretrained: {cfg.model.pretrained!r})")
    finetune = task == "finetune"
    network = build_student(s, finetune=finetune, fd_init=False)
    load_converted_state_dict(network, ckpt.student, source=str(file), layout=LAYOUT_FDFAST, arch=s.arch,
                              expected_missing=())
    pre = eval_preprocessing(cfg)  # the run's own eval: its eval_resize and eval_norm
    subject = Subject(name=_run_name(file), role="classifier" if finetune else "student",
                      source=f"{file} (step {ckpt.step})", network=network, img_size=s.img_size, arch=s.arch,
                      num_classes=s.num_classes if finetune else 0, whiten_eps=cfg.model.whiten_eps,
                      loss_beta=cfg.model.loss_beta, mean=tuple(pre["mean"]), std=tuple(pre["std"]),
                      eval_resize=cfg.data.eval_resize)
    if finetune or not with_teacher:
        return subject, None
    own = None
    if teacher is None:
        try:
            teacher = own = run_teacher(cfg, trust_pickle=trust_pickle)
        except UserError as e:
            raise SourceError(f"{file}: cannot rebuild the run's teacher ({e}). Pass --teacher FILE with "
                              "--teacher-kind/--teacher-model, or --no-teacher") from None
    if ckpt.projector is not None:
        subject.teacher, subject.projector = teacher, _projector(ckpt.projector, teacher, str(file))
    return subject, own


# ----------------------------------------------------------------------------------------------
# Official FD files and plain student weights: the architecture from the tensor shapes
# ----------------------------------------------------------------------------------------------
def _block_indices(sd: dict, pattern: str) -> dict[int, set]:
    found: dict[int, set] = {}
    for k in sd:
        m = re.match(pattern, k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)) if m.lastindex > 1 else 0)
    return found


def student_fields(sd: dict, source: str) -> tuple[dict, int, bool]:
    """(``model.student`` fields, classes of the head (0: none), fine-tune layout?) read from a BEiT-style
    ViT or SwinV2 student state dict (timm or official key names)."""
    pe = sd.get("patch_embed.proj.weight")
    if pe is None or pe.ndim != 4:
        raise SourceError(f"{source}: no patch_embed.proj.weight, so this is not a ViT / SwinV2 student")
    dim, patch = int(pe.shape[0]), int(pe.shape[-1])
    head = sd.get("head.weight", sd.get("head.fc.weight"))
    classes = int(head.shape[0]) if head is not None else 0
    if any(k.startswith("blocks.") for k in sd):
        shared = "rel_pos_bias.relative_position_bias_table" in sd
        table = sd.get("rel_pos_bias.relative_position_bias_table",
                       sd.get("blocks.0.attn.relative_position_bias_table"))
        if table is None:
            raise SourceError(f"{source}: a ViT without relative position bias tables is not an FD student; "
                              "analyse a timm export of it (folder with config.json) instead")
        window = (round(math.sqrt(table.shape[0] - 3)) + 1) // 2
        fields = dict(arch="beit", img_size=window * patch, patch_size=patch, embed_dim=dim,
                      depth=len(_block_indices(sd, r"blocks\.(\d+)\.")), num_heads=int(table.shape[1]),
                      mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / dim, shared_rel_pos_bias=shared)
        return fields, classes, classes > 0 or "fc_norm.weight" in sd
    stages = _block_indices(sd, r"layers\.(\d+)\.blocks\.(\d+)\.attn\.logit_scale$")
    if not stages:
        raise SourceError(f"{source}: neither ViT blocks (blocks.*) nor SwinV2 blocks (layers.*.blocks.*.attn."
                          "logit_scale): not a student this tool knows")
    coords = sd.get("layers.0.blocks.0.attn.relative_coords_table")
    index = sd.get("layers.0.blocks.0.attn.relative_position_index")
    if coords is not None:
        window = (int(coords.shape[1]) + 1) // 2
    elif index is not None:
        window = round(math.sqrt(index.shape[0]))
    else:
        raise SourceError(f"{source}: SwinV2 weights without relative_coords_table / relative_position_index "
                          "buffers do not tell the window size; export the run with fdfast-export (which records "
                          "it), or analyse the fdfast run or a timm export (folder) instead")
    mask = sd.get("layers.0.blocks.1.attn_mask")
    side = window * (round(math.sqrt(mask.shape[0])) if mask is not None else 1)
    fields = dict(arch="swinv2", img_size=side * patch, patch_size=patch, embed_dim=dim,
                  depth=[len(stages[s]) for s in sorted(stages)], window_size=window,
                  num_heads=[int(sd[f"layers.{s}.blocks.0.attn.logit_scale"].shape[0]) for s in sorted(stages)],
                  mlp_ratio=sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / dim)
    return fields, classes, True


def _from_student_file(file: Path, teacher: Optional[Teacher], trust_pickle: bool) -> Subject:
    sd, layout = read_student_state_dict(file, trust_pickle=trust_pickle)
    # An official-layout file may carry what the tensors cannot tell (fdfast-export records the student's
    # config; SwinV2's window is not in its weights) and the projector: one more read, for that layout only.
    whole = load_torch_file(file, trust_pickle=trust_pickle) if layout == LAYOUT_OFFICIAL else {}
    recorded = whole.get("fdfast", {}).get("student") if isinstance(whole.get("fdfast"), dict) else None
    if recorded:
        fields, classes, finetune = {k: v for k, v in recorded.items() if k != "num_classes"}, 0, False
    else:
        fields, classes, finetune = student_fields(sd, str(file))
    scfg = StudentConfig(**fields, num_classes=classes)
    network = build_student(scfg, finetune=finetune, fd_init=False)
    load_converted_state_dict(network, sd, source=str(file), layout=layout, arch=scfg.arch, expected_missing=())
    subject = Subject(name=file.stem, role="classifier" if classes else "student", source=f"{file} ({layout})",
                      network=network, img_size=scfg.img_size, arch=scfg.arch, num_classes=classes)
    mapped = official_to_distill_state_dict(whole) if teacher is not None and whole else {}
    if "decoder.weight" in mapped:
        subject.teacher = teacher
        subject.projector = _projector({"weight": mapped["decoder.weight"], "bias": mapped["decoder.bias"]},
                                       teacher, str(file))
    return subject


# ----------------------------------------------------------------------------------------------
# timm models
# ----------------------------------------------------------------------------------------------
def _timm_subject(model: nn.Module, name: str, source: str) -> Subject:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))[-1]
    if hasattr(model, "patch_embed") and getattr(model.patch_embed, "img_size", None) is not None:
        size = model.patch_embed.img_size[0]
    classes = int(getattr(model, "num_classes", 0) or 0)
    crop_pct = cfg.get("crop_pct")
    # timm's eval transform: resize the shorter side to floor(size / crop_pct), then center crop
    resize = int(math.floor(int(size) / crop_pct)) if crop_pct else None
    return Subject(name=name, role="classifier" if classes else "backbone", source=source, network=model,
                   img_size=int(size), mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
                   std=tuple(cfg.get("std", IMAGENET_STD)), num_classes=classes, eval_resize=resize)


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[[^\]]*\])\) from "
                            r"checkpoint, the shape in current model is torch\.Size\((\[[^\]]*\])\)")
_QUOTED = re.compile(r'"([^"]+)"')
_KEY_LIST = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: (.*?)\.?\s*$", re.MULTILINE)


def _timm_failure(e: BaseException) -> str:
    """One line for why timm could not build a model: a state dict that does not fit names its first
    mismatching keys and shapes (torch lists them all, one per line); otherwise the error's first line."""
    text = str(e)
    shapes = _SIZE_MISMATCH.findall(text)
    keys = [f"{kind.lower()} {fmt_keys(_QUOTED.findall(listed), 4)}" for kind, listed in _KEY_LIST.findall(text)]
    if shapes or keys:
        parts = [f"{len(shapes)} tensor(s) differ in shape: "
                 + fmt_keys([f"{k} (file {a}, model {b})" for k, a, b in shapes], 3)] if shapes else []
        return "its weights do not fit the architecture in config.json: " + "; ".join(parts + keys)
    lines = text.strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _create_timm(name: str, source: str, **kwargs) -> nn.Module:
    """``timm.create_model``; what a damaged or foreign export folder makes it raise (another architecture's
    config.json, an unknown argument, a truncated or forged model.safetensors) is one line."""
    try:
        return timm.create_model(name, **kwargs)
    except (RuntimeError, ValueError, OSError, KeyError, TypeError, SafetensorError) as e:
        raise SourceError(f"{source}: timm cannot build it ({_timm_failure(e)})") from None


_TIMM_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _timm_export_folder(path: Path) -> Optional[Path]:
    """The folder of a timm / Hugging Face export (``config.json`` beside ``model.safetensors``), if
    ``path`` is one or is its weights file."""
    folder = path if path.is_dir() else path.parent
    if path.is_file() and path.name not in _TIMM_WEIGHTS:
        return None
    if (folder / "config.json").is_file() and any((folder / f).is_file() for f in _TIMM_WEIGHTS):
        return folder
    return None


# ----------------------------------------------------------------------------------------------
# Everything together
# ----------------------------------------------------------------------------------------------
def load_subjects(models: list[str], teacher_spec: Optional[TeacherSpec] = None, *, with_teacher: bool = True,
                  trust_pickle: bool = False) -> list[Subject]:
    """The models to analyse (in eval mode, on the CPU), teachers first: ``--teacher``, then each argument
    (a distilled run's own teacher just before its student). Names are unique and safe as file names."""
    subjects: list[Subject] = []
    teacher = None
    if teacher_spec is not None:
        try:
            teacher = build_teacher_from_spec(teacher_spec, teacher_spec.img_size or 224, trust_pickle=trust_pickle)
        except UserError as e:  # its message speaks of model.teacher; name the flag as well
            raise SourceError(f"--teacher {teacher_spec.weights}: {e}") from None
        subjects.append(_teacher_subject(teacher, f"teacher-{teacher.kind}"))
    for position, spec in enumerate(models):
        if spec.startswith("random:"):
            name = spec[len("random:"):]
            with torch.random.fork_rng(devices=[]):  # the same weights on every call; the caller's RNG untouched
                torch.manual_seed(position)
                model = _create_timm(name, spec, pretrained=False)
            subjects.append(_timm_subject(model, name, spec))
            continue
        folder = _timm_export_folder(Path(spec))
        if folder is not None:
            model = _create_timm(f"local-dir:{folder}", spec, pretrained=True)
            subjects.append(_timm_subject(model, folder.name, f"{folder} (timm export)"))
            continue
        file = resolve_checkpoint_file(spec)
        if file.name == "state.pt":
            subject, own = _from_fdfast(file, teacher, with_teacher, trust_pickle)
            if own is not None:
                subjects.append(_teacher_subject(own, f"{subject.name}-teacher"))
            subjects.append(subject)
        else:
            subjects.append(_from_student_file(file, teacher, trust_pickle))
    seen: dict[str, int] = {}
    for s in subjects:
        for module in (s.network, s.projector):
            if module is not None:
                module.eval()  # analysed as deployed: no drop path, no dropout
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", s.name) or "model"
        seen[base] = seen.get(base, 0) + 1
        s.name = base if seen[base] == 1 else f"{base}-{seen[base]}"
    if not subjects:
        raise SourceError("nothing to analyse: give at least one model, or --teacher")
    return subjects
