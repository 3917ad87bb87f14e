"""The ``--teacher`` options of the commands that read models (fdfast-analyze, fdfast-eval --knn): a
``model.teacher`` section given on the command line, and ``--no-teacher``."""
from __future__ import annotations

import argparse
from typing import Optional

import yaml

from ..config.load import yaml_error_line
from ..errors import UserError
from ..interop.sources import TeacherSpec
from ..models.teachers import TEACHER_KINDS


def add_teacher_options(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("teacher (a file or folder, as model.teacher of a config)")
    t.add_argument("--teacher", help="teacher weights file (kind timm: also a timm / OpenCLIP folder or a hub cache) "
                                     "or 'random': a model of its own, and the teacher (FD-loss partner) of distilled "
                                     "students instead of each run's own model.teacher")
    t.add_argument("--teacher-kind", choices=TEACHER_KINDS, default="clip",
                   help="FD's release files (clip, dino, deit, esvit) or any timm ViT-family model (timm)")
    t.add_argument("--teacher-model", default=TeacherSpec.model,
                   help="timm architecture of the teacher, with its pretrained tag for kind timm "
                        "(e.g. vit_base_patch14_reg4_dinov2.lvd142m)")
    t.add_argument("--teacher-kwargs", default=None, help="YAML/JSON mapping of extra timm arguments, "
                                                          "e.g. '{window_size: 14}' for EsViT")
    t.add_argument("--teacher-img-size", type=int, default=None, help="teacher input size (default 224)")
    t.add_argument("--no-teacher", action="store_true", help="do not rebuild the runs' own teachers")


def teacher_spec(a: argparse.Namespace) -> Optional[TeacherSpec]:
    """The ``--teacher`` options as a :class:`TeacherSpec`; None without ``--teacher``."""
    if not a.teacher:
        return None
    try:
        kwargs = yaml.safe_load(a.teacher_kwargs) if a.teacher_kwargs else None
    except yaml.YAMLError as e:  # bad syntax, or a tag such as !!python/object that safe_load refuses
        raise UserError(f"--teacher-kwargs {a.teacher_kwargs!r} is not valid YAML ({yaml_error_line(e)}); give "
                        "a mapping, e.g. '{window_size: 14}'") from None
    if kwargs is not None and not isinstance(kwargs, dict):
        raise UserError(f"--teacher-kwargs {a.teacher_kwargs!r} is not a mapping, e.g. '{{window_size: 14}}'")
    return TeacherSpec(weights=a.teacher, kind=a.teacher_kind, model=a.teacher_model, model_kwargs=kwargs,
                       img_size=a.teacher_img_size)
