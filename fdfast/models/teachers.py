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

``timm``: any timm model of a known family (:mod:`.families`: VisionTransformer, Eva, Swin), e.g. DINOv2/v3,
SigLIP2, EVA-02, OpenCLIP / DFN / MetaCLIP, PE; its weights come from the folders and files of
:mod:`.teacher_layouts`, and its normalisation from the folder's config, else from the model's timm
``pretrained_cfg`` (the tag in ``model.teacher.model`` chooses it), unless ``model.teacher.mean`` / ``std``
say otherwise. With a student config, :func:`build_teacher` also resolves the token rules
(:mod:`.token_rules`): the input size and the :class:`~.token_rules.TargetPlan` the target uses.

Checked against the FD repo's own model code (random weights, fp32, CPU): CLIP B/16 at 224/256/192 and L/14,
and EsViT Swin-B w14 match exactly; DINO/DeiT ViT-B match to 4e-6, because timm uses fused attention.

Precision: weights are fp32 unless ``fp16_weights`` is set. Then conv/linear weights are stored in fp16, as
CLIP's ``convert_weights`` does, and the forward runs under fp16 autocast. Use it on CUDA only. With random
B/16 weights it stays within the official fp16 CLIP's own fp16 noise (max 1.2e-2). ``bf16`` instead casts
every weight and buffer to bf16 and runs the forward outside autocast, so that activations, LayerNorms and the
residual stream stay bf16 (the caller whitens the output in fp32).
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import timm
import torch
import torch.nn as nn
from timm.models import get_pretrained_cfg
from timm.models import swin_transformer as timm_swin
from timm.models import vision_transformer as timm_vit

from ..config import StudentConfig
from ..errors import ConfigError
from .families import family_of
from .teacher_files import KINDS, read_teacher_file
from .teacher_files import TEACHER_KINDS as RELEASE_KINDS
from .teacher_layouts import WeightsLocation, check_architecture, locate_weights, read_timm_teacher_file
from .token_rules import TargetPlan, default_plan, plan_target, teacher_input_size

__all__ = ["Teacher", "build_teacher", "TEACHER_KINDS"]

TEACHER_KINDS = (*RELEASE_KINDS, "timm")


# ----------------------------------------------------------------------------------------------
# The teacher module
# ----------------------------------------------------------------------------------------------
class Teacher(nn.Module):
    """Frozen teacher: ``forward(x)`` takes the *teacher-normalised* float image batch (B,3,H,W) with
    H = W = ``img_size`` and returns the final-norm output tokens (B, N, D): all tokens, CLS included for
    ViTs; 7x7 = 49 x 1024 for the EsViT Swin-B at 224.

    Attributes: ``kind`` (clip | dino | deit | esvit | timm), ``family`` (vit | eva | swin), ``layout``
    (:class:`~.families.TokenLayout`), ``mean``/``std`` (the normalisation this teacher expects; ``normalisation``
    says where it came from), ``embed_dim`` (D), ``num_tokens`` (N at ``img_size``), ``img_size`` (input size;
    the target resizes when it differs from the student's), ``plan`` (the :class:`~.token_rules.TargetPlan` of its
    target), ``fp16_weights``, ``bf16``, ``weights`` (the file, or 'random'), ``sha256`` (of that file; None for
    random weights) and ``unused_keys`` (lines naming the file keys a headless teacher does not use).

    No parameter requires grad and the module never leaves eval mode (see :meth:`train`).
    """

    def __init__(self, model: nn.Module, *, kind: str, img_size: int, model_name: str = "",
                 weights: str = "random", fp16_weights: bool = False, bf16: bool = False,
                 sha256: Optional[str] = None, mean: Optional[tuple] = None, std: Optional[tuple] = None,
                 normalisation: str = "", unused_keys: tuple = (), plan: Optional[TargetPlan] = None):
        super().__init__()
        if kind not in TEACHER_KINDS:
            raise ValueError(f"unknown teacher kind {kind!r}; expected one of {TEACHER_KINDS}")
        family = family_of(model, model_name)
        default = KINDS.get(kind, KINDS["dino"])  # kind timm without mean/std: ImageNet's, timm's default
        self.model = model
        self.kind = kind
        self._family = family
        self.family = family.name
        self.mean = tuple(mean) if mean is not None else default.mean
        self.std = tuple(std) if std is not None else default.std
        self.normalisation = normalisation
        self.img_size = int(img_size)
        self.model_name = model_name
        self.weights = weights
        self.sha256 = sha256
        self.unused_keys = tuple(unused_keys)
        self.fp16_weights = bool(fp16_weights)
        self.bf16 = bool(bf16)
        if self.bf16:
            model.to(torch.bfloat16)
        self.embed_dim = int(model.num_features)
        self.layout = family.layout(model)  # from the geometry timm resolved; no forward needed
        self.num_tokens = self.layout.num_tokens
        self.plan = plan or default_plan(self.layout, self.img_size)
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
        return self._family.tokens(out)

    def describe(self) -> str:
        """One line for the run's log: what the teacher is, where its weights and normalisation come from."""
        source = "random weights" if self.sha256 is None else f"{self.weights} (sha256 {self.sha256[:12]})"
        text = (f"teacher {self.kind} {self.model_name}: {self.layout.describe()} x {self.embed_dim} at "
                f"{self.img_size} px, {source}; normalisation mean {list(self.mean)} std {list(self.std)}"
                + (f" ({self.normalisation})" if self.normalisation else ""))
        return text + "".join(f"; not used: {line}" for line in self.unused_keys)

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, model={self.model_name!r}, weights={self.weights!r}, img_size={self.img_size}, "
                f"tokens={self.num_tokens}x{self.embed_dim}, fp16_weights={self.fp16_weights}, bf16={self.bf16}")


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------
def _create(name: str, kwargs: dict, img_size: Optional[int] = None) -> nn.Module:
    size = {} if img_size is None else {"img_size": img_size}
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, **size, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ConfigError(f"model.teacher.model={name!r} is not a timm model name ({e})") from None
        raise
    except TypeError as e:  # an argument the architecture does not take
        raise ConfigError(f"model.teacher.model={name!r} with model.teacher.model_kwargs={kwargs}: timm cannot "
                          f"build it ({e})") from None


def build_teacher(cfg: Any, student_img_size: int, *, trust_pickle: bool = False,
                  student: Optional[StudentConfig] = None) -> Teacher:
    """Build the frozen teacher described by a ``TeacherConfig``.

    The architecture is ``timm.create_model(cfg.model, pretrained=False, num_classes=0, img_size=...,
    **cfg.model_kwargs)`` (kind timm: after the ``model_args`` its folder's config.json records). Its input size:
    with ``student`` (the run's ``StudentConfig``) the token rules' (:func:`~.token_rules.teacher_input_size`, e.g.
    196 px for a patch-14 teacher under a 224 px patch-16 student) and the teacher's ``plan`` is resolved against
    that student; without it ``cfg.img_size`` or ``student_img_size`` and the default plan. ``cfg.weights`` is a
    file (or, kind timm, a folder) loaded strictly, or ``'random'`` for timm's random init (demos, tests,
    benchmarks). ``cfg.fp16_weights`` stores conv/linear weights in fp16 and runs the forward under fp16 autocast,
    as the official CLIP teacher does on CUDA; it is pointless on CPU. ``trust_pickle`` is the command's
    ``--trust-pickle`` (see :mod:`fdfast.interop.reading`'s load policy), never read from a config or a file.
    """
    kind, weights = cfg.kind, str(cfg.weights)
    kwargs = dict(cfg.model_kwargs or {})
    location = None
    if kind == "timm" and weights != "random":
        location = locate_weights(weights, cfg.model)
        check_architecture(location, cfg.model)
        kwargs = {**location.model_args, **kwargs}
    with torch.device("meta"):  # the family and patch size only: allocates nothing, draws no random numbers
        probe = _create(cfg.model, kwargs)
    _check_family(probe, kind, cfg.model)
    if student is not None:
        img_size = teacher_input_size(cfg, family_of(probe).layout(probe).stride, student)
    else:
        img_size = int(cfg.img_size or student_img_size)
    model = _create(cfg.model, kwargs, img_size)
    sha256, unused = None, []
    if weights != "random":
        if location is not None:
            file = read_timm_teacher_file(location, model, family_of(model), cfg.model, trust_pickle=trust_pickle)
            unused = file.unused
        else:
            file = read_teacher_file(kind, weights, model=model, model_name=cfg.model, trust_pickle=trust_pickle)
        model.load_state_dict(file.state_dict, strict=True)  # keys and shapes were checked, with clear errors
        sha256 = file.sha256
    mean, std, source = _normalisation(cfg, model, location)
    if cfg.fp16_weights:
        _convert_weights_to_fp16(model)
    teacher = Teacher(model, kind=kind, img_size=img_size, model_name=cfg.model, weights=weights,
                      fp16_weights=cfg.fp16_weights, bf16=cfg.bf16, sha256=sha256, mean=mean, std=std,
                      normalisation=source, unused_keys=tuple(unused))
    if student is not None:
        teacher.plan = plan_target(cfg, teacher.layout, img_size, student)
    return teacher


def _normalisation(cfg: Any, model: nn.Module, location: Optional[WeightsLocation]) -> tuple[tuple, tuple, str]:
    """(mean, std, where they come from): ``model.teacher.mean``/``std``, else FD's per kind, else the weights'
    folder config, else timm's ``pretrained_cfg`` of ``model.teacher.model`` (its tag chooses it)."""
    if cfg.kind in KINDS:
        mean, std, source = KINDS[cfg.kind].mean, KINDS[cfg.kind].std, f"FD's for kind {cfg.kind}"
    elif location is not None and location.mean is not None and location.std is not None:
        mean, std, source = location.mean, location.std, location.normalisation_source
    else:
        pre = getattr(model, "pretrained_cfg", None) or {}
        name = cfg.model if "." in cfg.model else f"{cfg.model}.{pre.get('tag')}"
        mean, std, source = tuple(pre.get("mean", KINDS["dino"].mean)), tuple(pre.get("std", KINDS["dino"].std)), \
            f"timm's pretrained_cfg of {name}"
        if cfg.weights != "random" and (cfg.mean is None or cfg.std is None) and "." not in cfg.model:
            _warn_if_tags_disagree(cfg.model, pre.get("tag"))
    if cfg.mean is not None or cfg.std is not None:
        source = "model.teacher.mean/std" if cfg.mean is not None and cfg.std is not None else \
            f"model.teacher.{'mean' if cfg.mean is not None else 'std'}, the rest {source}"
    return tuple(cfg.mean or mean), tuple(cfg.std or std), source


def _warn_if_tags_disagree(arch: str, tag: Optional[str]) -> None:
    # vit_large_patch14_clip_224: OpenAI / DFN / MetaCLIP weights use CLIP's mean/std, LAION-2B's 0.5 / 0.5.
    # Without a tag timm's default tag decides, which may not be the weights' own.
    stats = {}
    for name in timm.list_pretrained(f"{arch}.*"):
        pre = get_pretrained_cfg(name)
        if pre is not None:
            stats.setdefault((tuple(pre.mean), tuple(pre.std)), []).append(name.split(".", 1)[1])
    if len(stats) > 1:
        listing = "; ".join(f"{', '.join(tags)}: mean {list(m)}" for (m, _), tags in stats.items())
        warnings.warn(f"model.teacher.model={arch!r} has no pretrained tag and its weights use different "
                      f"normalisations ({listing}); using the default tag {tag!r}. Name the tag (e.g. "
                      f"'{arch}.{next(iter(stats.values()))[0]}') or set model.teacher.mean/std", UserWarning,
                      stacklevel=3)


def _check_family(model: nn.Module, kind: str, name: str) -> None:
    wanted = KINDS[kind].family if kind in KINDS else None  # kind timm: any family of .families
    if wanted == "vit" and not isinstance(model, timm_vit.VisionTransformer):
        raise ConfigError(f"model.teacher.kind={kind!r} needs a timm VisionTransformer, but model.teacher.model="
                         f"{name!r} builds {type(model).__name__}")
    if wanted == "swin" and not isinstance(model, timm_swin.SwinTransformer):
        raise ConfigError(f"model.teacher.kind='esvit' needs a timm Swin v1 SwinTransformer (e.g. "
                         f"'swin_base_patch4_window7_224' with model_kwargs window_size: 14), but "
                         f"model.teacher.model={name!r} builds {type(model).__name__}")
    family_of(model, name)


def _convert_weights_to_fp16(model: nn.Module) -> None:
    # Mirrors CLIP's convert_weights: conv/linear weights and biases only; LayerNorm affine, cls token and
    # position embeddings stay fp32 (timm's attention uses nn.Linear for qkv/proj, so those are covered).
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            m.weight.data = m.weight.data.half()
            if m.bias is not None:
                m.bias.data = m.bias.data.half()
