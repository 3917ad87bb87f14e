"""Token rules of a teacher target (``model.teacher.tokens`` / ``grid``) against a plain-torch reference.

The reference computes each target from the timm teacher's ``forward_features`` with explicit index arithmetic
(prefix tokens: CLS first, then the registers) and explicit ``F.interpolate`` / ``F.layer_norm`` /
``F.smooth_l1_loss`` calls, independently of :mod:`fdfast.models.token_rules`; the task's target and loss must
equal it. Student: FD's ViT at 32 px, patch 8 (4x4 grid + CLS).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fdfast.config import ConfigError
from fdfast.constants import IMAGENET_MEAN, IMAGENET_STD
from fdfast.distributed import DistInfo
from fdfast.models.families import TokenLayout
from fdfast.models.token_rules import default_plan
from fdfast.tasks import DistillTask

TINY = {"embed_dim": 24, "depth": 1, "num_heads": 2}
DINOV2 = "vit_base_patch14_reg4_dinov2"  # CLS + 4 registers + patches
SIGLIP = "vit_base_patch16_siglip_224"  # patches only (MAP head)


def _task(tiny_cfg, model, patch, **teacher):
    cfg = tiny_cfg(model={"student": {"drop_path": 0.0},  # the same student forward in task and reference
                          "teacher": {"kind": "timm", "model": model, "weights": "random",
                                      "model_kwargs": {**TINY, "patch_size": patch}, **teacher}},
                   compile={"enabled": False, "cuda_graph_teacher": False})
    torch.manual_seed(0)
    return DistillTask(cfg, DistInfo())


def _images(b=3):
    return torch.randint(0, 256, (b, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))


def _reference(task, images, size, select):
    """whiten(select(tokens)) of the teacher's timm model on its normalised, resized input; and the FD loss."""
    mean = torch.tensor(task.teacher.mean).view(1, 3, 1, 1)
    std = torch.tensor(task.teacher.std).view(1, 3, 1, 1)
    x = (images.float() / 255 - mean) / std
    if size != images.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    with torch.no_grad():
        tokens = select(task.teacher.model.forward_features(x))
    target = F.layer_norm(tokens, tokens.shape[-1:], eps=1e-5)
    s_mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    s_std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return target, (images.float() / 255 - s_mean) / s_std


def _check(task, images, target, student_in, student_slice):
    # fp32 rounding only: the task normalises as (x - 255 m) / (255 s), the reference as (x / 255 - m) / s
    torch.testing.assert_close(task.target(images), target, rtol=1e-5, atol=1e-5)
    pred = task.model(student_in)[:, student_slice]
    expected = F.smooth_l1_loss(pred, target, beta=2.0)
    torch.testing.assert_close(task.loss(images, torch.zeros(3, dtype=torch.long)), expected, rtol=1e-5, atol=1e-6)


def test_registers_dropped_and_patch14_grid_matched_by_resizing_the_input(tiny_cfg):
    task = _task(tiny_cfg, DINOV2, 7)  # student grid 4x4 -> teacher input 4 * 7 = 28 px
    assert task.teacher.img_size == 28 and task.teacher.layout.num_registers == 4
    images = _images()
    target, student_in = _reference(task, images, 28, lambda t: torch.cat([t[:, :1], t[:, 5:]], dim=1))
    assert target.shape == (3, 17, 24)
    _check(task, images, target, student_in, slice(None))


def test_a_teacher_without_cls_leaves_the_students_cls_out_of_the_loss(tiny_cfg):
    task = _task(tiny_cfg, SIGLIP, 8)
    assert task.teacher.layout.num_cls == 0 and task.teacher.mean == (0.5, 0.5, 0.5)
    images = _images()
    target, student_in = _reference(task, images, 32, lambda t: t)
    assert target.shape == (3, 16, 24)
    _check(task, images, target, student_in, slice(1, None))  # student tokens 1..16 face patches 0..15


def test_tokens_patches_drops_cls_on_both_sides(tiny_cfg):
    task = _task(tiny_cfg, DINOV2, 8, tokens="patches")
    images = _images()
    target, student_in = _reference(task, images, 32, lambda t: t[:, 5:])
    _check(task, images, target, student_in, slice(1, None))


def test_resize_features_resizes_the_patch_map_bilinearly_to_the_students_grid(tiny_cfg):
    task = _task(tiny_cfg, DINOV2, 4, grid="resize_features")  # teacher at 32 px: 8x8 patches -> 4x4
    assert task.teacher.img_size == 32 and task.teacher.layout.grid == (8, 8)

    def select(t):
        b, d = t.shape[0], t.shape[-1]
        fmap = t[:, 5:].reshape(b, 8, 8, d).permute(0, 3, 1, 2)
        small = F.interpolate(fmap, size=(4, 4), mode="bilinear", align_corners=False)
        return torch.cat([t[:, :1], small.permute(0, 2, 3, 1).reshape(b, 16, d)], dim=1)
    images = _images()
    target, student_in = _reference(task, images, 32, select)
    _check(task, images, target, student_in, slice(None))


def test_a_teacher_without_registers_keeps_every_token_under_all(tiny_cfg):
    task = _task(tiny_cfg, "vit_base_patch14_dinov2", 7, tokens="all")
    images = _images()
    target, student_in = _reference(task, images, 28, lambda t: t)
    _check(task, images, target, student_in, slice(None))


@pytest.mark.parametrize("teacher, student, match", [
    (dict(model=DINOV2, patch=7, img_size=32), {},
     r"patch grid at model.teacher.img_size=32 \(patch 7\) is 4.57143x4.57143, the student's is 4x4 "
     r"\(model.student.img_size=32, patch 8\): unset model.teacher.img_size to resize the teacher's input to 28 px, "
     r"or set model.teacher.grid=resize_features"),
    (dict(model=DINOV2, patch=7, grid="resize_features"), {},
     r"resize_features runs the teacher at 32 px .* not a multiple of its patch 7: set model.teacher.img_size to "
     r"28 or 35, or use model.teacher.grid=resize_input \(28 px\)"),
    (dict(model=DINOV2, patch=8, tokens="all"), {},
     r"tokens=all keeps the teacher's 4 register tokens, but the beit student has no tokens.*no_registers"),
    (dict(model=DINOV2, patch=8), dict(arch="swinv2", patch_size=2, embed_dim=16, depth=[1, 1], num_heads=[1, 2],
                                       window_size=4),
     r"CLS token is part of the target \(model.teacher.tokens=no_registers\), but the swinv2 student has no CLS "
     r"token: set model.teacher.tokens=patches"),
])
def test_impossible_combinations_are_one_line_naming_the_keys(tiny_cfg, teacher, student, match):
    patch = teacher.pop("patch")
    model = teacher.pop("model")
    cfg = tiny_cfg(model={"student": student, "teacher": {
        "kind": "timm", "model": model, "model_kwargs": {**TINY, "patch_size": patch}, **teacher}})
    with pytest.raises(ConfigError, match=match) as e:
        DistillTask(cfg, DistInfo())
    assert "\n" not in str(e.value)


def test_swinv2_student_regresses_patch_tokens_of_a_vit_teacher(tiny_cfg):
    # SwinV2 at 32 px, patch 2, 2 stages: 8x8 output tokens, no CLS; the teacher's CLS leaves the target
    cfg = tiny_cfg(model={"student": dict(arch="swinv2", patch_size=2, embed_dim=16, depth=[1, 1], num_heads=[1, 2],
                                          window_size=4, drop_path=0.0),
                          "teacher": {"kind": "timm", "model": DINOV2, "tokens": "patches",
                                      "model_kwargs": {**TINY, "patch_size": 4}}},
                   compile={"enabled": False, "cuda_graph_teacher": False})
    task = DistillTask(cfg, DistInfo())
    images = _images()
    target, student_in = _reference(task, images, 32, lambda t: t[:, 5:])
    _check(task, images, target, student_in, slice(None))


def test_the_resolved_rule_is_logged(tiny_cfg, capsys):
    _task(tiny_cfg, DINOV2, 7)
    out = capsys.readouterr().out
    assert "teacher input 28 px, target CLS + 4x4 patch tokens (4 registers dropped)" in out
    assert "normalisation mean [0.485, 0.456, 0.406]" in out and "timm's pretrained_cfg" in out


def test_a_plan_made_without_the_student_drops_only_a_cls_the_target_lacks():
    """Analysis pairs a teacher file with any student: the plan then knows the teacher only."""
    swin = default_plan(TokenLayout(num_cls=0, num_registers=0, grid=(7, 7), stride=32), 224)
    siglip = default_plan(TokenLayout(num_cls=0, num_registers=0, grid=(14, 14), stride=16), 224)
    clip = default_plan(TokenLayout(num_cls=1, num_registers=0, grid=(14, 14), stride=16), 224)
    swin_student, vit_student = torch.randn(2, 49, 8), torch.randn(2, 197, 8)
    assert torch.equal(swin.student_tokens(swin_student), swin_student)  # SwinV2 under EsViT: every token
    assert torch.equal(siglip.student_tokens(vit_student), vit_student[:, 1:])  # ViT under SigLIP: no CLS
    assert torch.equal(clip.student_tokens(vit_student), vit_student)
