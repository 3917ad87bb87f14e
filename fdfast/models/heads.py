"""Projector heads from the student's tokens to a teacher's width, and the student with one head per teacher.

A run with one ``model.teacher`` keeps FD's :class:`~.student.DistillModel` (``encoder`` + ``decoder``, the
official checkpoint's names). A run with ``model.teachers`` trains :class:`MultiDistillModel`: the same
``encoder`` and one head per teacher in ``heads.<name>``; its forward returns every head's projection of the
shared student tokens. ``head: linear`` is FD's projector (``nn.Linear``, default init, as the official 1x1
Conv1d); ``head: mlp`` is :class:`MLPHead`.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from ..config import StudentConfig
from .student import build_student, student_tokens

__all__ = ["HEAD_KINDS", "MLPHead", "MultiDistillModel", "build_head"]


class MLPHead(nn.Module):
    """A 2-layer MLP adaptor: ``Linear(Ds, Dt) -> LayerNorm(Dt) -> GELU -> Linear(Dt, Dt)``.

    The shape of AM-RADIO's per-teacher adaptor (its ``MLP2`` without inner blocks: LayerNorm then GELU between
    the two linear layers) and of Theia's per-teacher translators. Hidden width = the teacher's width ``Dt``: the
    head stays small next to the student (ViT-B/16 into a 768-wide teacher: 1.2 M parameters, 1.4 % of the 86 M
    student), so the shared student tokens, not the head, carry what every teacher needs, while the one
    non-linearity lets each teacher read its own features out of them instead of forcing all teachers to be
    linear functions of one token. The LayerNorm gives the GELU unit-scale inputs whatever the student's token
    norm; GELU is the student's own activation. Default ``nn.Linear`` / ``nn.LayerNorm`` init, as FD's projector.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.norm = nn.LayerNorm(out_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.norm(self.fc1(x))))


HEAD_KINDS = {"linear": nn.Linear, "mlp": MLPHead}


def build_head(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """A fresh head of ``kind`` (``linear`` | ``mlp``) from the student width to the teacher width."""
    if kind not in HEAD_KINDS:
        raise ValueError(f"head kind {kind!r}: expected one of {sorted(HEAD_KINDS)}")
    return HEAD_KINDS[kind](in_dim, out_dim)


class MultiDistillModel(nn.Module):
    """The trainable half of multi-teacher FD: ``encoder`` (the student, FD's init) + ``heads`` (one per teacher,
    by name). ``forward(x)`` -> ``{name: head(student tokens)}`` (B, N, Dt each). Only this module is in DDP."""

    def __init__(self, student_cfg: StudentConfig, heads: Mapping[str, tuple[str, int]]):
        """``heads``: teacher name -> (head kind, teacher width), in the order of ``model.teachers``."""
        super().__init__()
        self.arch = student_cfg.arch
        self.encoder = build_student(student_cfg)
        width = self.encoder.num_features
        self.heads = nn.ModuleDict({name: build_head(kind, width, dim) for name, (kind, dim) in heads.items()})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = student_tokens(self.encoder, self.arch, x)
        return {name: head(tokens) for name, head in self.heads.items()}
