"""Which teacher tokens a student regresses, at which input size and on which grid: the token rules of a target.

FD regresses every output token of the teacher after its final norm, index by index, CLS included (spec §1.4).
With the teachers of today that needs three explicit rules (``model.teacher.tokens`` and ``grid``):

* **tokens**: ``no_registers`` (default) keeps the CLS token, when the teacher has one, and the patch tokens;
  the registers (DINOv2 reg4, DINOv3's storage tokens) are dropped, because the student has no token to
  regress them onto. ``patches`` drops the CLS token too; ``all`` keeps every output token (only possible
  for a teacher without registers). A target without a CLS token (``patches``, or a teacher without one such
  as SigLIP) leaves the student's CLS token out of the loss.
* **grid** (a patch-14 teacher under a patch-16 student): ``resize_input`` (default) resizes the teacher's input
  so that its patch grid equals the student's (the official CLIP L/14 recipe: 196 px for a 224 px student;
  16 x 14 = 224 px for a patch-14 student of 256 px...), ``resize_features`` runs the teacher at
  ``model.teacher.img_size`` (default: the student's size) and resizes its patch-token map to the student's
  grid (bilinear, align_corners=False, as RADIO and Theia resize feature maps), before the whitening, so each
  target token is still standardised. Prefix tokens are never resized.

:class:`TargetPlan` is the resolved decision for one teacher and one student: :meth:`TargetPlan.select` picks
the teacher's target tokens, :meth:`TargetPlan.student_tokens` the student tokens they are compared with.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import StudentConfig
from ..errors import ConfigError
from .families import TokenLayout

TOKEN_RULES = ("all", "no_registers", "patches")
GRID_RULES = ("resize_input", "resize_features")


def resize_patch_tokens(patches: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """(B, h*w, D) row-major patch tokens -> (B, size[0]*size[1], D), bilinear, align_corners=False."""
    b, _, d = patches.shape
    fmap = patches.transpose(1, 2).reshape(b, d, grid[0], grid[1])
    fmap = F.interpolate(fmap, size=size, mode="bilinear", align_corners=False, antialias=False)
    return fmap.flatten(2).transpose(1, 2)


@dataclass(frozen=True)
class TargetPlan:
    """The token rule of one teacher's target, resolved against one student."""
    layout: TokenLayout
    """The teacher's output tokens at ``input_size``."""
    input_size: int
    """Teacher input pixels (square); the target resizes the batch to it."""
    keep_cls: bool
    keep_registers: bool
    grid: tuple[int, int]
    """Grid of the target's patch tokens: the student's (the teacher's map is resized when it differs)."""
    student_cls: bool = True
    """The student's first output token is a CLS token (FD's ViT); SwinV2 students have none."""

    @property
    def resize_features(self) -> bool:
        return self.grid != self.layout.grid

    @property
    def num_tokens(self) -> int:
        return (int(self.keep_cls) * self.layout.num_cls + int(self.keep_registers) * self.layout.num_registers
                + self.grid[0] * self.grid[1])

    @property
    def drop_student_cls(self) -> bool:
        return self.student_cls and not (self.keep_cls and self.layout.num_cls)

    def select(self, tokens: torch.Tensor) -> torch.Tensor:
        """Teacher output tokens (B, N, D) -> the target's tokens (before whitening)."""
        lay = self.layout
        keeps_all = (self.keep_cls or not lay.num_cls) and (self.keep_registers or not lay.num_registers)
        if keeps_all and not self.resize_features:
            return tokens  # FD's own case: every token, no copy
        patches = tokens[:, lay.num_prefix:]
        if self.resize_features:
            patches = resize_patch_tokens(patches, lay.grid, self.grid)
        prefix = [tokens[:, :lay.num_cls]] if self.keep_cls and lay.num_cls else []
        if self.keep_registers and lay.num_registers:
            prefix.append(tokens[:, lay.num_cls:lay.num_prefix])
        return torch.cat([*prefix, patches], dim=1) if prefix else patches

    def student_tokens(self, pred: torch.Tensor) -> torch.Tensor:
        """The student's (projected) tokens that face the target: all of them, or all but its CLS. The CLS is
        dropped only when the student has exactly one token more than the target, so a plan made without the
        student (analysis of a teacher file against any student) leaves a SwinV2 student's grid whole."""
        if self.drop_student_cls and pred.shape[1] == self.num_tokens + 1:
            return pred[:, 1:]
        return pred

    def describe(self) -> str:
        lay = self.layout
        kept = (["CLS"] if self.keep_cls and lay.num_cls else []) + (
            [f"{lay.num_registers} registers"] if self.keep_registers and lay.num_registers else [])
        text = " + ".join(kept + [f"{self.grid[0]}x{self.grid[1]} patch tokens"])
        if lay.num_registers and not self.keep_registers:
            text += f" ({lay.num_registers} registers dropped)"
        if self.resize_features:
            text += f", the teacher's {lay.grid[0]}x{lay.grid[1]} map resized bilinearly"
        text = f"teacher input {self.input_size} px, target {text}"
        if self.student_cls:
            text += f"; the student's CLS token is {'left out of' if self.drop_student_cls else 'in'} the loss"
        return text


def default_plan(layout: TokenLayout, input_size: int) -> TargetPlan:
    """The default rule (``no_registers``) on the teacher's own grid, for a ViT student with a CLS token."""
    return TargetPlan(layout=layout, input_size=input_size, keep_cls=True, keep_registers=False, grid=layout.grid)


def _grid_text(grid: tuple[int, int]) -> str:
    return f"{grid[0]}x{grid[1]}"


def teacher_input_size(tcfg: Any, stride: int, student: StudentConfig) -> int:
    """The teacher's input size under ``model.teacher.grid`` (``stride``: the teacher's patch size)."""
    grid = student.grid
    if tcfg.grid == "resize_input":
        if tcfg.img_size is None:
            return grid * stride
        size = int(tcfg.img_size)
        if size % stride or size // stride != grid:
            raise ConfigError(
                f"the teacher's patch grid at model.teacher.img_size={size} (patch {stride}) is "
                f"{size / stride:g}x{size / stride:g}, the student's is {grid}x{grid} (model.student.img_size="
                f"{student.img_size}, {_student_stride_text(student)}): unset model.teacher.img_size to resize "
                f"the teacher's input to {grid * stride} px, or set model.teacher.grid=resize_features")
        return size
    size = int(tcfg.img_size or student.img_size)
    if size % stride:
        lower, upper = size // stride * stride, (size // stride + 1) * stride
        raise ConfigError(
            f"model.teacher.grid=resize_features runs the teacher at {size} px (model.teacher.img_size, default "
            f"model.student.img_size), which is not a multiple of its patch {stride}: set model.teacher.img_size "
            f"to {lower} or {upper}, or use model.teacher.grid=resize_input ({grid * stride} px)")
    return size


def _student_stride_text(student: StudentConfig) -> str:
    if student.arch == "beit":
        return f"patch {student.patch_size}"
    return f"patch {student.patch_size} x 2^{len(student.stages) - 1} over its stages"


def plan_target(tcfg: Any, layout: TokenLayout, input_size: int, student: StudentConfig) -> TargetPlan:
    """Resolve ``model.teacher.tokens`` / ``grid`` for this teacher (its ``layout`` at ``input_size``) and this
    student; an impossible combination is a :class:`ConfigError` naming both sides and the keys to change."""
    rule, grid = tcfg.tokens, (student.grid, student.grid)
    if tcfg.grid == "resize_input" and layout.grid != grid:
        raise ConfigError(  # teacher_input_size makes this unreachable for square ViT grids; Swin clamps
            f"the teacher's {_grid_text(layout.grid)} grid at {input_size} px differs from the student's "
            f"{_grid_text(grid)}: set model.teacher.grid=resize_features or change model.teacher.img_size")
    keep_registers = rule == "all"
    if keep_registers and layout.num_registers:
        raise ConfigError(
            f"model.teacher.tokens=all keeps the teacher's {layout.num_registers} register tokens, but the "
            f"{student.arch} student has no tokens to regress them onto: use model.teacher.tokens=no_registers "
            "(the default) or patches")
    keep_cls = rule != "patches"
    if keep_cls and layout.num_cls and not student.has_cls:
        raise ConfigError(
            f"the teacher's CLS token is part of the target (model.teacher.tokens={rule}), but the "
            f"{student.arch} student has no CLS token: set model.teacher.tokens=patches")
    return TargetPlan(layout=layout, input_size=input_size, keep_cls=keep_cls, keep_registers=keep_registers,
                      grid=grid, student_cls=student.has_cls)
