"""Numerical parity with the official FD implementation: loss and every gradient, from release-layout files.

Files (written in tmp, random non-zero weights everywhere, see ``_release_files``):
  * teacher: an OpenAI-layout CLIP TorchScript archive (fp16 tensors, ``visual.*`` + text tower), or the flat
    DINO backbone state dict;
  * student: an official ``main_fd.py`` checkpoint ``{'model': {'encoder.*', 'decoder.0.*', 'feature_model.*'},
    'config': <yacs CfgNode>, ...}`` with non-trivial RPB table, q/v biases, layer scales and LayerNorms.

fdfast side: the tiny config -> ``build_distill_task`` (timm Beit student, timm teacher loaded from the release
file, the real ``task.loss`` on uint8 images) -> ``load_official_distill_checkpoint`` -> loss, backward.
Reference side: ``_official_reference`` (plain torch, official-layout keys, independent of fdfast and timm)
on the same files and the same uint8 pixels, in float64 -> loss, backward.

Tolerances (fdfast runs fp32; the reference runs float64 and is the "exact" answer):
  * loss: relative difference < LOSS_RTOL = 1e-6;
  * gradients: for every parameter tensor, max|g_fdfast - g_ref| / max|g_ref| < GRAD_RTOL = 1e-5.
Why these numbers: fp32 has a unit roundoff of 6e-8. Evaluating the *reference itself* in fp32 moves the
loss by ~2e-8 (relative) and the worst gradient tensor by ~5e-7 (``test_fp32_rounding_floor``); fdfast lands
at ~5e-8 and ~8e-7. So the bounds sit >10x above plain fp32 rounding of the official maths, while every
semantic slip tried (``test_parity_detects_semantic_slips``: teacher fed ImageNet instead of CLIP
normalisation, CLS token dropped, RPB index off by one / CLS rows swapped / query-key transposed, GELU for
QuickGELU, no ln_post or no whitening on the target, SmoothL1 beta 1) misses them by more than 100x, and even
a student LayerNorm eps of 1e-5 instead of 1e-6 fails them (~3x). The gradients carry most of that power:
dropping the teacher's ln_post changes the loss by only 9e-7 but a gradient by 65%.
Student drop path is 0 and the student is in train mode (as during distillation); the teacher is always in
eval mode.

``test_clip_large_resized_teacher_input_matches_official``: when the CLIP teacher's resolution differs from
the student's (FD's L/14 teacher at 224 under a 256 px student), FD resizes the teacher input with
torchvision 0.13 ``Resize`` (bilinear, no antialias), and so does fdfast.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import _official_reference as R
import _release_files as RF
from fdfast.config import StudentConfig, config_from_dict
from fdfast.distributed import DistInfo
from fdfast.interop.conversion import CheckpointKeyError, CheckpointShapeError, official_to_distill_state_dict
from fdfast.interop.export import export_official, official_state_dict
from fdfast.interop.loading import LAYOUT_OFFICIAL, load_official_distill_checkpoint
from fdfast.interop.reading import CheckpointReadError
from fdfast.models.student import DistillModel
from fdfast.objective import normalize
from fdfast.models.target import TeacherTarget
from fdfast.tasks import DistillTask
from fdfast.constants import IMAGENET_MEAN, IMAGENET_STD

LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5

IMG, PATCH = 32, 8                        # 4x4 patch grid + CLS = 17 tokens on both sides
STUDENT = dict(dim=32, depth=2, heads=2)  # Ds = 32
TEACHER_DIM = 128                         # Dt; OpenAI's build_model uses heads = width // 64 = 2
BATCH = 4


def _config(tmp_path, kind: str, weights, attention: str = "sdpa", teacher_img=None, teacher_patch=PATCH):
    teacher_model = {"clip": "vit_base_patch16_clip_quickgelu_224", "dino": "vit_base_patch16_224"}[kind]
    return config_from_dict({
        "model": {
            "student": {"arch": "beit", "img_size": IMG, "patch_size": PATCH, "embed_dim": STUDENT["dim"],
                        "depth": STUDENT["depth"], "num_heads": STUDENT["heads"], "drop_path": 0.0},
            "teacher": {"kind": kind, "model": teacher_model, "weights": str(weights), "img_size": teacher_img,
                        "model_kwargs": {"patch_size": teacher_patch, "embed_dim": TEACHER_DIM, "depth": 2,
                                         "num_heads": TEACHER_DIM // 64}},
            "attention": attention,
        },
        "train": {"output_dir": str(tmp_path / "run")},
    })


def _images(seed: int = 5) -> torch.Tensor:
    # uint8 in channels-last memory, as every fdfast loader delivers them
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (BATCH, 3, IMG, IMG), dtype=torch.uint8, generator=g).contiguous(
        memory_format=torch.channels_last)


def _fdfast_name(official: str) -> str:
    """The official -> fdfast parameter name rule, written out independently of interop's mapping."""
    return "decoder." + official[len("decoder.0."):] if official.startswith("decoder.0.") else official


# ----------------------------------------------------------------------------------------------
# Setups: release files, the fdfast run and the reference run
# ----------------------------------------------------------------------------------------------
@dataclass
class FdfastRun:
    loss: float
    grads: dict
    pred: torch.Tensor
    target: torch.Tensor
    model: nn.Module


@dataclass
class Setup:
    kind: str
    fd_path: object
    teacher_path: object
    official_model: dict   # the FD checkpoint's 'model' dict, read the official way (full unpickle)
    teacher_sd: dict       # the teacher's state dict, read the official way
    images: torch.Tensor
    runs: dict             # attention kernel -> FdfastRun
    teacher_size: Optional[int] = None  # CLIP L/14 analogue: teacher input resized to this


def _run_fdfast(tmp_path, kind, teacher_path, fd_path, images, attention, **teacher_geometry) -> FdfastRun:
    task = DistillTask(_config(tmp_path, kind, teacher_path, attention, **teacher_geometry), DistInfo())
    report = load_official_distill_checkpoint(task.model, fd_path)
    assert report.layout == LAYOUT_OFFICIAL and report.loaded == len(task.model.state_dict())
    model = task.model
    # distillation conditions: student in train mode with drop path 0, teacher frozen in eval mode
    assert model.training and task.teacher is not None and not task.teacher.training
    assert all(m.drop_prob == 0 for m in model.modules() if hasattr(m, "drop_prob"))
    model.zero_grad(set_to_none=True)
    loss = task.loss(images, torch.zeros(BATCH, dtype=torch.long))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"fdfast parameters without a gradient: {missing}"
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():  # the two halves, for a sharper diagnosis when the loss disagrees
        pred = model(normalize(images, IMAGENET_MEAN, IMAGENET_STD))  # as distill_loss_fn does
        target = TeacherTarget(task.teacher)(images)
    return FdfastRun(loss.item(), grads, pred, target, model)


def _make_setup(tmp_path_factory, kind: str, attentions, teacher_img=None, teacher_patch=PATCH) -> Setup:
    d = tmp_path_factory.mktemp(f"parity_{kind}")
    if kind == "clip":
        teacher_path = RF.write_openai_clip(d / "ViT-tiny.pt", img=teacher_img or IMG, patch=teacher_patch,
                                            width=TEACHER_DIM, seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit deprecation notice
            teacher_sd = dict(torch.jit.load(str(teacher_path), map_location="cpu").state_dict())  # clip.load
        model_sd = RF.fd_model_state_dict(img=IMG, patch=PATCH, teacher_dim=TEACHER_DIM, seed=2, **STUDENT)
        pred_feat = "CLIP_400M"
    else:
        teacher_sd = RF.dino_state_dict(img=IMG, patch=PATCH, dim=TEACHER_DIM, seed=1)
        teacher_path = d / "dino_vitbase16_pretrain.pth"
        torch.save(teacher_sd, teacher_path)
        model_sd = RF.fd_model_state_dict(img=IMG, patch=PATCH, teacher_dim=TEACHER_DIM, seed=3, **STUDENT)
        pred_feat = "DINO"
    fd_path = RF.write_official_fd_checkpoint(d / "ckpt_epoch_299.pth", model_sd, teacher_sd, pred_feat=pred_feat)
    official_model = RF.read_official_fd_checkpoint(fd_path)["model"]
    images = _images()
    geometry = dict(teacher_img=teacher_img, teacher_patch=teacher_patch)
    runs = {a: _run_fdfast(d, kind, teacher_path, fd_path, images, a, **geometry) for a in attentions}
    return Setup(kind, fd_path, teacher_path, official_model, teacher_sd, images, runs, teacher_img)


@pytest.fixture(scope="module")
def clip_setup(tmp_path_factory):
    # sdpa is fdfast's default kernel (the bias goes in as attn_mask); eager is the explicit softmax path
    return _make_setup(tmp_path_factory, "clip", ("sdpa", "eager"))


@pytest.fixture(scope="module")
def dino_setup(tmp_path_factory):
    return _make_setup(tmp_path_factory, "dino", ("sdpa",))


def _leaves(official_model: dict, dtype) -> dict:
    """The student/projector tensors of the official state as leaves (grads) in ``dtype``; the
    teacher (feature_model.*) and the integer index buffer are left out, as they are not trained."""
    out = {}
    for k, v in official_model.items():
        if k.startswith("feature_model."):
            continue
        # a fresh copy: .to() returns the file's own tensor when the dtype already matches
        out[k] = v.detach().to(dtype).clone().requires_grad_(True) if v.is_floating_point() else v
    return out


def _cast(sd: dict, dtype) -> dict:
    return {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in sd.items()}


def _reference(setup: Setup, dtype=torch.float64, loss_fn=None) -> tuple[float, dict]:
    """(loss, {fdfast name: grad}) of the reference on the setup's files and pixels."""
    leaves = _leaves(setup.official_model, dtype)
    teacher = _cast(setup.teacher_sd, dtype)
    if loss_fn is None:
        loss = R.fd_forward_loss(leaves, teacher, setup.images, setup.kind, teacher_size=setup.teacher_size)
    else:
        loss = loss_fn(leaves, teacher, setup.images, setup.kind)
    loss.backward()
    loss = loss.item()
    grads = {}
    for k, v in leaves.items():
        if torch.is_tensor(v) and v.requires_grad:
            g = v.grad
            grads[_fdfast_name(k)] = g.squeeze(-1) if k == "decoder.0.weight" else g
    return loss, grads


def _grad_errors(got: dict, ref: dict) -> dict:
    return {k: ((got[k].double() - ref[k].double()).abs().max() / ref[k].double().abs().max()).item() for k in ref}


def _check_parity(setup: Setup, run: FdfastRun) -> tuple[float, float]:
    ref_loss, ref_grads = _reference(setup)
    # coverage: every fdfast parameter has an official counterpart with a gradient, and vice versa
    fd_names = {n for n, _ in run.model.named_parameters()}
    assert set(ref_grads) == fd_names, (sorted(set(ref_grads) ^ fd_names))
    for k, g in ref_grads.items():
        assert g.shape == run.grads[k].shape, k
        assert g.abs().max() > 0, f"{k}: zero reference gradient, the comparison would be vacuous"

    rel = abs(run.loss - ref_loss) / abs(ref_loss)
    errs = _grad_errors(run.grads, ref_grads)
    worst = max(errs, key=errs.get)
    assert rel < LOSS_RTOL, f"loss: fdfast {run.loss!r} vs official {ref_loss!r} (rel {rel:.2e})"
    assert errs[worst] < GRAD_RTOL, f"gradient of {worst}: rel err {errs[worst]:.2e} (all: {errs})"
    return rel, errs[worst]


# ----------------------------------------------------------------------------------------------
# Parity
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_clip_teacher_loss_and_every_gradient_match_official(clip_setup, attention):
    _check_parity(clip_setup, clip_setup.runs[attention])


def test_clip_halves_match_official(clip_setup):
    """Student+projector tokens and the whitened CLIP target separately (tells which half broke)."""
    run = clip_setup.runs["sdpa"]
    m = _cast({k: v for k, v in clip_setup.official_model.items() if not k.startswith("feature_model.")},
              torch.float64)
    x = R.to_tensor_normalize(clip_setup.images, torch.float64)
    pred = R.projector(m, R.student_tokens(m, x))
    target = R.whiten(R.clip_tokens(_cast(clip_setup.teacher_sd, torch.float64), R.clip_renormalize(x)))
    assert run.pred.shape == pred.shape == run.target.shape == target.shape == (BATCH, 17, TEACHER_DIM)
    torch.testing.assert_close(run.pred.double(), pred, rtol=0, atol=1e-5 * pred.abs().max().item())
    torch.testing.assert_close(run.target.double(), target, rtol=0, atol=1e-5 * target.abs().max().item())
    # both SmoothL1 branches (|d| < beta = 2 and |d| >= 2) are exercised, so beta matters
    frac = ((pred - target).abs() >= 2).double().mean().item()
    assert 0.05 < frac < 0.95, frac


def test_dino_teacher_loss_and_every_gradient_match_official(dino_setup):
    _check_parity(dino_setup, dino_setup.runs["sdpa"])


def test_clip_large_resized_teacher_input_matches_official(tmp_path_factory):
    """The CLIP L/14 geometry in miniature: a 32 px / patch-8 student (4x4 grid) against a teacher file at
    28 px / patch 7 (4x4 grid), so the teacher input is resized 32 -> 28 as FD resizes 256 -> 224."""
    setup = _make_setup(tmp_path_factory, "clip", ("sdpa",), teacher_img=28, teacher_patch=7)
    _check_parity(setup, setup.runs["sdpa"])


def test_fp32_rounding_floor(clip_setup):
    """The reference evaluated in fp32 vs float64: what plain fp32 rounding of the official maths gives.
    The tolerances must sit above it (else they would reject a correct fp32 implementation)."""
    loss64, g64 = _reference(clip_setup, torch.float64)
    loss32, g32 = _reference(clip_setup, torch.float32)
    assert abs(loss32 - loss64) / abs(loss64) < LOSS_RTOL / 5
    assert max(_grad_errors(g32, g64).values()) < GRAD_RTOL / 5


# ----------------------------------------------------------------------------------------------
# The comparison is sharp: semantic slips move the result far beyond the tolerances
# ----------------------------------------------------------------------------------------------
def _variant(*, teacher_input="clip", index=None, teacher_act=R.quick_gelu, ln_post=True,
             tokens=slice(None), beta=2.0, whiten=True, student_eps=1e-6):
    """``fd_forward_loss`` for the CLIP teacher with one knob turned; the defaults reproduce it exactly."""
    def loss_fn(model_sd, teacher_sd, images, kind):
        assert kind == "clip"
        x = R.to_tensor_normalize(images, model_sd["encoder.cls_token"].dtype)
        pred = R.projector(model_sd, R.student_tokens(model_sd, x, index=index, eps=student_eps))
        with torch.no_grad():
            xt = R.clip_renormalize(x) if teacher_input == "clip" else x
            t = R.clip_tokens(teacher_sd, xt, act=teacher_act, ln_post=ln_post)
            target = R.whiten(t) if whiten else t
        return R.fd_loss(pred[:, tokens], target[:, tokens], beta=beta)
    return loss_fn


def _index_variants():
    idx = R.relative_position_index(IMG // PATCH, IMG // PATCH)
    rows = (2 * (IMG // PATCH) - 1) ** 2 + 3
    off_by_one = idx.clone()
    off_by_one[1:, 1:] += 1
    swapped_cls = idx.clone()
    swapped_cls[idx == rows - 3], swapped_cls[idx == rows - 2] = rows - 2, rows - 3
    return {"rpb_index_off_by_one": off_by_one, "rpb_cls_rows_swapped": swapped_cls,
            "rpb_query_key_transposed": idx.t().contiguous()}


SLIPS = {
    "teacher_gets_imagenet_normalisation": dict(teacher_input="imagenet"),
    "cls_token_dropped": dict(tokens=slice(1, None)),
    **{name: dict(index=idx) for name, idx in _index_variants().items()},
    "gelu_instead_of_quickgelu_in_clip": dict(teacher_act=R.gelu),
    "target_without_ln_post": dict(ln_post=False),
    "target_without_whitening": dict(whiten=False),
    "smooth_l1_beta_1": dict(beta=1.0),
}


def test_variant_defaults_are_the_reference(clip_setup):
    a, ga = _reference(clip_setup)
    b, gb = _reference(clip_setup, loss_fn=_variant())
    assert a == b and all(torch.equal(ga[k], gb[k]) for k in ga)


# slips that only nudge the numbers: they must still fail the parity check, without the wide margin
SUBTLE_SLIPS = {"student_layernorm_eps_1e-5": dict(student_eps=1e-5)}


@pytest.mark.parametrize("slip", sorted(SLIPS) + sorted(SUBTLE_SLIPS))
def test_parity_detects_semantic_slips(clip_setup, slip):
    run = clip_setup.runs["sdpa"]
    loss, grads = _reference(clip_setup, loss_fn=_variant(**{**SLIPS, **SUBTLE_SLIPS}[slip]))
    rel = abs(run.loss - loss) / abs(loss)
    worst = max(_grad_errors(run.grads, grads).values())
    # a gross slip must fail the parity check by a wide margin, not sit near the tolerance
    margin = 2 if slip in SUBTLE_SLIPS else 100
    assert max(rel / LOSS_RTOL, worst / GRAD_RTOL) > margin, (slip, rel, worst)


# ----------------------------------------------------------------------------------------------
# RPB index and projector layout
# ----------------------------------------------------------------------------------------------
def test_rpb_index_equals_official_file_and_timm(clip_setup):
    from timm.models.beit import gen_relative_position_index

    model = clip_setup.runs["sdpa"].model
    ours = model.encoder.rel_pos_bias.relative_position_index
    ref = R.relative_position_index(IMG // PATCH, IMG // PATCH)
    assert torch.equal(ours, ref)
    assert torch.equal(clip_setup.official_model["encoder.rel_pos_bias.relative_position_index"], ref)
    # the released geometries (B/16 at 224: 14x14; L/14 at 224 and B/16 at 256: 16x16) and a non-square grid
    for grid in ((14, 14), (16, 16), (3, 5)):
        ref = R.relative_position_index(*grid)
        assert torch.equal(gen_relative_position_index(grid), ref), grid
        assert torch.equal(RF.relative_position_index_loops(*grid), ref), grid


def test_projector_conv1d_layout_is_our_linear(clip_setup):
    model = clip_setup.runs["sdpa"].model
    w, b = clip_setup.official_model["decoder.0.weight"], clip_setup.official_model["decoder.0.bias"]
    assert w.shape == (TEACHER_DIM, STUDENT["dim"], 1) and model.decoder.weight.shape == (TEACHER_DIM, STUDENT["dim"])
    assert torch.equal(model.decoder.weight, w[..., 0]) and torch.equal(model.decoder.bias, b)
    z = torch.randn(BATCH, 17, STUDENT["dim"], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    conv = F.conv1d(z.permute(0, 2, 1), w.double(), b.double()).permute(0, 2, 1)
    lin = F.linear(z, model.decoder.weight.double(), model.decoder.bias.double())
    torch.testing.assert_close(lin, conv, rtol=1e-12, atol=1e-12)
    # and back: fdfast's official export writes the Conv1d layout again, bit for bit
    back = official_state_dict(model.encoder, model.decoder)
    assert torch.equal(back["decoder.0.weight"], w) and torch.equal(back["decoder.0.bias"], b)


# ----------------------------------------------------------------------------------------------
# official_to_distill_state_dict / load_official_distill_checkpoint
# ----------------------------------------------------------------------------------------------
def test_mapping_keeps_student_and_projector_drops_teacher_and_buffers(clip_setup):
    mapped = official_to_distill_state_dict({"model": clip_setup.official_model})
    model_sd = clip_setup.runs["sdpa"].model.state_dict()
    assert set(mapped) == set(model_sd)
    for k, v in clip_setup.official_model.items():
        if k.startswith("feature_model.") or k.endswith("relative_position_index"):
            continue
        assert torch.equal(mapped[_fdfast_name(k)], v[..., 0] if k == "decoder.0.weight" else v), k
        assert torch.equal(model_sd[_fdfast_name(k)], mapped[_fdfast_name(k)]), k  # and that is what was loaded


@pytest.mark.parametrize("student", [
    dict(arch="beit", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path=0.0),
    dict(arch="swinv2", img_size=32, patch_size=2, embed_dim=16, depth=[2, 2], num_heads=[2, 4], window_size=4,
         drop_path=0.0),
])
def test_official_roundtrip_through_export(tmp_path, student):
    """export_official (fdfast -> official layout) and load_official_distill_checkpoint are inverses."""
    torch.manual_seed(0)
    src = DistillModel(StudentConfig(**student), 24).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.1 * torch.randn_like(p))
    official = official_state_dict(src.encoder, src.decoder)
    if student["arch"] == "swinv2":  # the official layout: PatchMerging ends stage 0, rpe_mlp names
        assert "encoder.layers.0.downsample.reduction.weight" in official
        assert any(".rpe_mlp." in k for k in official) and not any(".cpb_mlp." in k for k in official)
    mapped = official_to_distill_state_dict(official)
    assert set(mapped) == set(src.state_dict())
    assert all(torch.equal(mapped[k], v) for k, v in src.state_dict().items())

    path = export_official(src.encoder, src.decoder, tmp_path / "fd.pth")
    torch.manual_seed(1)
    dst = DistillModel(StudentConfig(**student), 24).eval()
    load_official_distill_checkpoint(dst, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_load_errors_name_the_problem(clip_setup, tmp_path):
    student = StudentConfig(arch="beit", img_size=IMG, patch_size=PATCH, embed_dim=STUDENT["dim"],
                            depth=STUDENT["depth"], num_heads=STUDENT["heads"], drop_path=0.0)
    # a projector for another teacher width
    with pytest.raises(CheckpointShapeError, match=r"decoder\.weight.*teacher") as e:
        load_official_distill_checkpoint(DistillModel(student, 96), clip_setup.fd_path)
    assert str(clip_setup.fd_path) in str(e.value)
    # a stripped distilled encoder (no decoder.*): strict, and pointed at the encoder-only loader
    stripped = tmp_path / "encoder_only.pth"
    torch.save({"model": {k: v for k, v in clip_setup.official_model.items() if k.startswith("encoder.")}}, stripped)
    model = DistillModel(student, TEACHER_DIM)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointKeyError, match=r"decoder\.weight.*load_student_weights"):
        load_official_distill_checkpoint(model, stripped)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched on error
    # a teacher release file is not an FD checkpoint
    dino = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save(RF.dino_state_dict(), dino)
    with pytest.raises(CheckpointReadError, match="no 'encoder.\\*' keys"):
        load_official_distill_checkpoint(model, dino)
