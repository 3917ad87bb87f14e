"""Teachers: timm architectures fed with files in each ORIGINAL release layout (written here, tiny widths).

The CLIP reference below is an independent re-implementation of OpenAI's VisionTransformer (conv1 without
bias, class_embedding, positional_embedding, ln_pre, nn.MultiheadAttention blocks with QuickGELU MLPs,
ln_post, proj), saved as a real TorchScript archive like OpenAI's .pt files. The DINO/DeiT files are timm
ViT state dicts in the release wrappers, and the EsViT file is a timm Swin state dict rewritten into the
Microsoft Swin v1 layout (downsample at the end of a stage, persistent index buffers, DINO heads, 'module.').
"""
from __future__ import annotations

import argparse
import re
import warnings
from collections import OrderedDict

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from fdfast.config import ConfigError, TeacherConfig
from fdfast.interop.reading import UnsafePickleError
from fdfast.models.teacher_files import TeacherLoadError, load_teacher_state_dict
from fdfast.models.teachers import Teacher, build_teacher
from fdfast.objective import whiten

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IN_MEAN = (0.485, 0.456, 0.406)
IN_STD = (0.229, 0.224, 0.225)

# tiny geometries: ViT width 32, 2 blocks, patch 8 at 32 px -> 4x4 grid + CLS = 17 tokens
VIT_KW = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8)
VIT_IMG = 32
# Swin at 64 px, patch 4, window 4: stages 16/8/4/2 -> shifted windows in stages 0-1, unshifted in stage 2 and
# a clamped 2x2 window in stage 3: the same pattern as EsViT's 56/28/14/7 with window 14 at 224 px.
SWIN_KW = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), window_size=4)
SWIN_IMG = 64
SWIN_NAME = "swin_base_patch4_window7_224"


def _cfg(kind, model, weights="random", model_kwargs=None, img_size=None, fp16_weights=False, bf16=False):
    return TeacherConfig(kind=kind, model=model, model_kwargs=dict(model_kwargs or {}), weights=str(weights),
                         img_size=img_size, fp16_weights=fp16_weights, bf16=bf16)


def _randomize(module: nn.Module, seed: int) -> None:
    # non-trivial LayerNorm affines and biases, so a skipped/duplicated norm or a dropped bias shows up
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def _images(size, b=2, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Reference OpenAI CLIP (layout and maths of openai/CLIP model.py), saved as TorchScript
# ----------------------------------------------------------------------------------------------
class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _ResBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):  # x: (L, N, D), as in OpenAI's code
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _RefVisual(nn.Module):
    def __init__(self, img, patch, width, layers, heads, out_dim=12):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width))
        self.positional_embedding = nn.Parameter(torch.randn((img // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList([_ResBlock(width, heads) for _ in range(layers)])
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, out_dim))

    def tokens(self, x, pos=None):
        """FD's target: ln_post(forward_featuremap(x)), every token, no proj."""
        x = self.conv1(x).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + (self.positional_embedding if pos is None else pos).to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)
        for blk in self.transformer.resblocks:
            x = blk(x)
        return self.ln_post(x.permute(1, 0, 2))

    def forward(self, x):
        return self.tokens(x)[:, 0] @ self.proj


class _RefCLIP(nn.Module):
    """Top-level OpenAI CLIP key layout: visual.* plus a (tiny) text tower whose keys must be ignored."""

    def __init__(self, img=VIT_IMG, patch=8, width=32, layers=2, heads=2):
        super().__init__()
        self.visual = _RefVisual(img, patch, width, layers, heads)
        self.transformer = nn.Module()  # text tower: same block names as the visual one, no 'visual.' prefix
        self.transformer.resblocks = nn.ModuleList([_ResBlock(16, 2)])
        self.token_embedding = nn.Embedding(40, 16)
        self.positional_embedding = nn.Parameter(torch.randn(8, 16))
        self.ln_final = nn.LayerNorm(16)
        self.text_projection = nn.Parameter(torch.randn(16, 12))
        self.logit_scale = nn.Parameter(torch.ones([]))
        for name in ("input_resolution", "context_length", "vocab_size"):
            self.register_buffer(name, torch.tensor(7))

    def forward(self, image):
        return self.visual(image)


def _make_clip(seed=0, **kw):
    ref = _RefCLIP(**kw).eval()
    _randomize(ref, seed)
    with torch.no_grad():  # OpenAI ships fp16 tensors: keep values fp16-exact so fp32 references are exact
        for p in ref.parameters():
            p.copy_(p.half().float())
    return ref


def _save_jit(module, example, path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.9 marks torch.jit as deprecated
        torch.jit.save(torch.jit.trace(module, example, check_trace=False), str(path))
    return path


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    ref = _make_clip()
    half = _make_clip()
    half.half()  # OpenAI's archives are fp16
    jit = _save_jit(half, (_images(VIT_IMG).half(),), d / "ViT-tiny.pt")
    flat = d / "clip_state_dict.pt"
    torch.save(ref.state_dict(), flat)
    return ref, jit, flat


def _clip_teacher(path, img_size=None, model="vit_base_patch16_clip_quickgelu_224", **kw):
    return build_teacher(_cfg("clip", model, path, VIT_KW, img_size=img_size, **kw), VIT_IMG)


def test_clip_torchscript_archive_gives_ln_post_of_all_tokens(clip_files):
    ref, jit_path, _ = clip_files
    assert "constants.pkl" in " ".join(__import__("zipfile").ZipFile(jit_path).namelist())  # really TorchScript
    t = _clip_teacher(jit_path)
    x = _images(VIT_IMG)
    out = t(x)
    with torch.no_grad():
        expected = ref.visual.tokens(x)
    assert out.shape == (2, 17, 32) == (2, t.num_tokens, t.embed_dim)
    assert out.dtype == torch.float32 and next(t.parameters()).dtype == torch.float32  # fp16 file -> fp32
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)
    # sanity: the projection is not applied and ln_pre matters (a model without it would differ)
    assert not torch.allclose(out[:, 0, :12], (expected[:, 0] @ ref.visual.proj)[:, :12], atol=1e-3)
    assert (t.mean, t.std) == (CLIP_MEAN, CLIP_STD)
    assert t.kind == "clip" and t.img_size == VIT_IMG


def test_clip_plain_state_dict_fallback(clip_files):
    ref, _, flat = clip_files
    x = _images(VIT_IMG, seed=1)
    with torch.no_grad():
        expected = ref.visual.tokens(x)
    torch.testing.assert_close(_clip_teacher(flat)(x), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("img_size", [48, 24])  # grid 4 -> 6 (grow) and 4 -> 3 (shrink: antialias must be off)
def test_clip_pos_embed_resampled_like_official_loader(clip_files, img_size):
    ref, jit_path, _ = clip_files
    t = build_teacher(_cfg("clip", "vit_base_patch16_clip_quickgelu_224", jit_path, VIT_KW, img_size=img_size),
                      VIT_IMG)
    assert t.img_size == img_size and t.num_tokens == (img_size // 8) ** 2 + 1
    # FD clip/model.py build_model: bicubic F.interpolate of the patch positions, align_corners=False
    pos = ref.visual.positional_embedding.detach()
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    new = img_size // 8
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).flatten(1, 2)[0]])
    x = _images(img_size)
    with torch.no_grad():
        expected = ref.visual.tokens(x, pos=pos)
    torch.testing.assert_close(t(x), expected, atol=2e-5, rtol=1e-5)


def test_clip_archive_refuses_gelu_model(clip_files):
    _, jit_path, _ = clip_files
    with pytest.raises(TeacherLoadError, match="QuickGELU.*vit_base_patch16_clip_quickgelu_224"):
        _clip_teacher(jit_path, model="vit_base_patch16_clip_224")


def test_clip_file_into_non_clip_vit_is_explained(clip_files):
    _, jit_path, _ = clip_files
    with pytest.raises(TeacherLoadError, match="ln_pre"):
        build_teacher(_cfg("clip", "vit_base_patch16_224", jit_path, VIT_KW), VIT_IMG)


# ----------------------------------------------------------------------------------------------
# DINO (flat) and DeiT ({'model': ...} + head)
# ----------------------------------------------------------------------------------------------
def _source_vit(name, seed, **extra):
    m = timm.create_model(name, pretrained=False, num_classes=extra.pop("num_classes", 0), img_size=VIT_IMG,
                          **{**VIT_KW, **extra}).eval()
    _randomize(m, seed)
    return m


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("vit")
    dino = _source_vit("vit_base_patch16_224", 1)
    torch.save(dino.state_dict(), d / "dino_vitbase16_pretrain.pth")
    deit = _source_vit("deit_base_patch16_224", 2, num_classes=10)  # the release file keeps its classifier
    torch.save({"model": deit.state_dict()}, d / "deit_base_patch16_224.pth")
    return dino, d / "dino_vitbase16_pretrain.pth", deit, d / "deit_base_patch16_224.pth"


def test_dino_flat_file(vit_files):
    dino, path, _, _ = vit_files
    t = build_teacher(_cfg("dino", "vit_base_patch16_224", path, VIT_KW), VIT_IMG)
    x = _images(VIT_IMG)
    with torch.no_grad():
        expected = dino.forward_features(x)
    out = t(x)
    assert out.shape == (2, 17, 32)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    assert t.model.norm.eps == 1e-6 and t.model.norm_pre.__class__ is nn.Identity  # DINO/DeiT: LN 1e-6, no ln_pre
    assert (t.mean, t.std) == (IN_MEAN, IN_STD)


def test_deit_model_wrapper_drops_classifier(vit_files):
    _, _, deit, path = vit_files
    assert "head.weight" in torch.load(path)["model"]
    t = build_teacher(_cfg("deit", "deit_base_patch16_224", path, VIT_KW), VIT_IMG)
    x = _images(VIT_IMG)
    with torch.no_grad():
        expected = deit.forward_features(x)  # final norm, before pooling and head
    torch.testing.assert_close(t(x), expected, atol=1e-6, rtol=1e-6)
    assert "head.weight" not in t.state_dict() and "model.head.weight" not in t.state_dict()


def test_vit_width_mismatch_names_both_sides(vit_files, tmp_path):
    _, path, _, _ = vit_files
    with pytest.raises(TeacherLoadError, match=r"embed_dim: file 32 vs model 48") as e:
        build_teacher(_cfg("dino", "vit_base_patch16_224", path, {**VIT_KW, "embed_dim": 48}), VIT_IMG)
    assert str(path) in str(e.value)


def test_unexpected_and_missing_keys_are_reported(vit_files, tmp_path):
    dino, _, _, _ = vit_files
    sd = dict(dino.state_dict())
    sd["blocks.0.attn.k_bias"] = torch.zeros(32)
    del sd["norm.weight"]
    bad = tmp_path / "odd.pth"
    torch.save(sd, bad)
    with pytest.raises(TeacherLoadError) as e:
        build_teacher(_cfg("dino", "vit_base_patch16_224", bad, VIT_KW), VIT_IMG)
    msg = str(e.value)
    assert str(bad) in msg and "norm.weight" in msg and "blocks.0.attn.k_bias" in msg and "kind='dino'" in msg


# ----------------------------------------------------------------------------------------------
# EsViT: {'student': {'module.' + Microsoft Swin v1 keys}, 'teacher': ..., 'args': Namespace, ...}
# ----------------------------------------------------------------------------------------------
def _to_microsoft_swin_v1(model: nn.Module) -> dict:
    """timm SwinTransformer state dict -> the layout of Microsoft's / EsViT's swin_transformer.py."""
    out = {}
    for k, v in model.state_dict().items():
        # Microsoft: the PatchMerging after stage s lives in layers[s].downsample; timm: layers[s+1].downsample
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k] = v
    for name, mod in model.named_modules():
        # persistent buffers in the original code; the loader must drop them (timm recomputes both)
        if hasattr(mod, "relative_position_bias_table"):
            w = (round(mod.relative_position_bias_table.shape[0] ** 0.5) + 1) // 2
            out[f"{name}.relative_position_index"] = torch.zeros(w * w, w * w, dtype=torch.long)
        if getattr(mod, "attn_mask", None) is not None:
            out[f"{name}.attn_mask"] = mod.attn_mask.clone()
    return out


def _esvit_file(path, seed=3, **swin_kw):
    m = timm.create_model(SWIN_NAME, pretrained=False, num_classes=0, img_size=SWIN_IMG,
                          **{**SWIN_KW, **swin_kw}).eval()
    _randomize(m, seed)
    ms = _to_microsoft_swin_v1(m)
    assert "layers.0.downsample.reduction.weight" in ms and not any(k.startswith("layers.3.downsample") for k in ms)
    student = {"module." + k: v for k, v in ms.items()}
    dim = m.num_features
    student.update({"module.head.mlp.0.weight": torch.randn(8, dim),
                    "module.head.last_layer.weight_g": torch.ones(4, 1),
                    "module.head_dense.mlp.0.weight": torch.randn(8, dim)})
    ema = {k: v + 0.5 if v.is_floating_point() else v for k, v in student.items()}
    torch.save({"student": student, "teacher": ema, "epoch": 300, "dino_loss": {"center": torch.zeros(1, 4)},
                "args": argparse.Namespace(arch="swin_base", window_size=14, lr=5e-4)}, path)
    return m


@pytest.fixture(scope="module")
def esvit_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("esvit") / "checkpoint_best.pth"
    return _esvit_file(path), path


def test_esvit_student_weights_in_microsoft_layout(esvit_file):
    src, path = esvit_file
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the argparse.Namespace must load without the unsafe-pickle fallback
        t = build_teacher(_cfg("esvit", SWIN_NAME, path, SWIN_KW), SWIN_IMG)
    x = _images(SWIN_IMG)
    with torch.no_grad():
        expected = src.forward_features(x).flatten(1, 2)  # the 'student' weights, not the EMA 'teacher'
    out = t(x)
    assert out.shape == (2, 4, 128) == (2, t.num_tokens, t.embed_dim)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert [s.blocks[1].shift_size for s in t.model.layers] == [(2, 2), (2, 2), (0, 0), (0, 0)]
    assert (t.mean, t.std) == (IN_MEAN, IN_STD)


def test_esvit_window_mismatch_is_an_error_not_a_silent_resize(esvit_file):
    _, path = esvit_file
    with pytest.raises(TeacherLoadError, match=r"window_size to 4"):
        build_teacher(_cfg("esvit", SWIN_NAME, path, {**SWIN_KW, "window_size": 2}), SWIN_IMG)


def test_esvit_depth_mismatch(esvit_file):
    _, path = esvit_file
    with pytest.raises(TeacherLoadError, match=r"depths: file \(2, 2, 2, 2\) vs model \(2, 2, 4, 2\)"):
        build_teacher(_cfg("esvit", SWIN_NAME, path, {**SWIN_KW, "depths": (2, 2, 4, 2)}), SWIN_IMG)


# ----------------------------------------------------------------------------------------------
# Wrong files, missing files, bad configs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("file_kind, kind, looks_like", [
    ("clip", "dino", "OpenAI CLIP"), ("clip", "esvit", "OpenAI CLIP"), ("dino", "clip", "DINO"),
    ("dino", "deit", "DINO"), ("deit", "dino", "DeiT"), ("esvit", "clip", "EsViT"), ("esvit", "deit", "EsViT"),
])
def test_file_of_another_kind_is_named(file_kind, kind, looks_like, clip_files, vit_files, esvit_file):
    path = {"clip": clip_files[1], "dino": vit_files[1], "deit": vit_files[3], "esvit": esvit_file[1]}[file_kind]
    model = SWIN_NAME if kind == "esvit" else "vit_base_patch16_clip_quickgelu_224"
    kw = SWIN_KW if kind == "esvit" else VIT_KW
    with pytest.raises(TeacherLoadError) as e:
        build_teacher(_cfg(kind, model, path, kw), SWIN_IMG if kind == "esvit" else VIT_IMG)
    msg = str(e.value)
    assert f"looks like a{'n' if looks_like[0] in 'AEIOU' else ''} {looks_like}" in msg
    assert f"kind={kind!r}" in msg and str(path) in msg and f"kind={file_kind!r}" in msg


def test_fd_training_checkpoint_is_not_a_teacher(tmp_path):
    bad = tmp_path / "ckpt_epoch_299.pth"
    torch.save({"model": {"encoder.cls_token": torch.zeros(1, 1, 32), "decoder.0.weight": torch.zeros(4, 32, 1)}}, bad)
    with pytest.raises(TeacherLoadError, match="FD training checkpoint"):
        build_teacher(_cfg("dino", "vit_base_patch16_224", bad, VIT_KW), VIT_IMG)


def test_missing_file_names_path_and_config_key(tmp_path):
    missing = tmp_path / "nope" / "ViT-B-16.pt"
    with pytest.raises(TeacherLoadError, match=r"not found.*model\.teacher\.weights") as e:
        build_teacher(_cfg("clip", "vit_base_patch16_clip_quickgelu_224", missing, VIT_KW), VIT_IMG)
    assert str(missing) in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bad_configs():
    with pytest.raises(ValueError, match="img_size"):
        build_teacher(_cfg("dino", "vit_base_patch16_224", model_kwargs={**VIT_KW, "img_size": 64}), VIT_IMG)
    with pytest.raises(ValueError, match="SwinTransformer"):
        build_teacher(_cfg("esvit", "vit_base_patch16_224", model_kwargs=VIT_KW), VIT_IMG)
    with pytest.raises(ValueError, match="not a timm model"):
        build_teacher(_cfg("dino", "vit_nonexistent_42"), VIT_IMG)


# ----------------------------------------------------------------------------------------------
# Frozen / eval contract, random init, geometry, fp16
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, model, kw, img, tokens, dim, mean", [
    ("clip", "vit_base_patch16_clip_quickgelu_224", VIT_KW, VIT_IMG, 17, 32, CLIP_MEAN),
    ("dino", "vit_base_patch16_224", VIT_KW, VIT_IMG, 17, 32, IN_MEAN),
    ("deit", "deit_base_patch16_224", VIT_KW, VIT_IMG, 17, 32, IN_MEAN),
    ("esvit", SWIN_NAME, SWIN_KW, SWIN_IMG, 4, 128, IN_MEAN),
])
def test_random_teacher_is_frozen_and_stays_in_eval(kind, model, kw, img, tokens, dim, mean):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # weights: random is a warning-free path
        t = build_teacher(_cfg(kind, model, model_kwargs={**kw, "drop_path_rate": 0.5}), img)
    assert isinstance(t, Teacher) and t.mean == mean
    assert (t.num_tokens, t.embed_dim, t.img_size) == (tokens, dim, img)
    assert all(not p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    x = _images(img).requires_grad_(True)
    a, b = t(x), t(x)
    assert a.shape == (2, tokens, dim) and not a.requires_grad
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # drop path 0.5 configured but never active


@pytest.mark.parametrize("cfg, student, tokens, dim", [
    (_cfg("clip", "vit_base_patch16_clip_quickgelu_224"), 224, 197, 768),
    (_cfg("clip", "vit_base_patch16_clip_quickgelu_224"), 256, 257, 768),
    (_cfg("clip", "vit_large_patch14_clip_quickgelu_224", img_size=224), 256, 257, 1024),
    (_cfg("dino", "vit_base_patch16_224"), 224, 197, 768),
    (_cfg("deit", "deit_base_patch16_224"), 224, 197, 768),
    (_cfg("esvit", SWIN_NAME, model_kwargs={"window_size": 14}), 224, 49, 1024),
])
def test_full_size_teacher_geometry(cfg, student, tokens, dim):
    with torch.device("meta"):  # the real architectures, without allocating or running them
        t = build_teacher(cfg, student)
    assert (t.num_tokens, t.embed_dim) == (tokens, dim)
    assert t.img_size == (cfg.img_size or student)
    if cfg.kind == "esvit":
        assert [s.blocks[0].window_size for s in t.model.layers] == [(14, 14)] * 3 + [(7, 7)]
        assert [s.blocks[1].shift_size for s in t.model.layers] == [(7, 7), (7, 7), (0, 0), (0, 0)]
        out = t(torch.empty(1, 3, 224, 224, device="meta"))
        assert out.shape == (1, 49, 1024)
    if cfg.kind == "clip":
        assert t.model.norm_pre.__class__ is not nn.Identity and t.model.norm.eps == 1e-5


def test_fp16_weights_like_clip_convert_weights(clip_files):
    ref, jit_path, _ = clip_files
    t = _clip_teacher(jit_path, fp16_weights=True)
    assert t.model.patch_embed.proj.weight.dtype == torch.float16
    assert t.model.blocks[0].attn.qkv.weight.dtype == torch.float16
    assert t.model.norm.weight.dtype == torch.float32 and t.model.pos_embed.dtype == torch.float32
    x = _images(VIT_IMG)
    out = t(x)
    with torch.no_grad():
        expected = ref.visual.tokens(x)
    assert out.dtype == torch.float32  # the final LayerNorm runs in fp32 under autocast
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=0)  # fp16 matmuls, same function


@pytest.mark.parametrize("kind", ["clip", "esvit"])
def test_bf16_teacher_is_bf16_end_to_end_and_keeps_the_whitened_target(kind, clip_files, esvit_file):
    if kind == "clip":
        make, img = (lambda **kw: _clip_teacher(clip_files[1], **kw)), VIT_IMG
    else:
        make, img = (lambda **kw: build_teacher(_cfg("esvit", SWIN_NAME, esvit_file[1], SWIN_KW, **kw), SWIN_IMG)), \
            SWIN_IMG
    ref, fast = make(), make(bf16=True)
    floats = [t for t in (*fast.parameters(), *fast.buffers()) if t.is_floating_point()]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)
    x = _images(img, b=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the step's autocast does not reach inside
        out = fast(x)
    assert out.dtype == torch.bfloat16  # an fp32 LayerNorm under autocast would have returned fp32
    target, expected = whiten(out), whiten(ref(x))
    cosine = F.cosine_similarity(target, expected, dim=-1)
    assert cosine.min() > 0.999, cosine.min()
    assert not torch.equal(target, expected)  # it did run in bf16
    with pytest.raises(ConfigError, match="bf16 and model.teacher.fp16_weights"):
        _cfg(kind, "x", fp16_weights=True, bf16=True)


def test_load_state_dict_without_model_keeps_file_geometry(clip_files, esvit_file):
    _, jit_path, _ = clip_files
    sd = load_teacher_state_dict("clip", jit_path)
    assert sd["pos_embed"].shape == (1, 17, 32) and sd["cls_token"].shape == (1, 1, 32)
    assert "norm_pre.weight" in sd and "head.weight" not in sd and not any(k.startswith("visual.") for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())
    m = timm.create_model("vit_base_patch16_clip_quickgelu_224", num_classes=0, img_size=VIT_IMG, **VIT_KW)
    m.load_state_dict(sd, strict=True)

    src, path = esvit_file
    sd = load_teacher_state_dict("esvit", path)
    assert "layers.1.downsample.reduction.weight" in sd and "layers.0.downsample.reduction.weight" not in sd
    assert not any("relative_position_index" in k or "attn_mask" in k or k.startswith("head") for k in sd)
    for k, v in src.state_dict().items():
        torch.testing.assert_close(sd[k], v, atol=0, rtol=0)


class _TrainingState:  # an arbitrary pickled object, as in some training checkpoints
    def __init__(self):
        self.step = 3


def test_non_tensor_pickles_load_with_a_warning_only_when_trusted(vit_files, tmp_path):
    dino, _, _, _ = vit_files
    sd = dict(dino.state_dict())
    path = tmp_path / "dino_with_state.pth"
    torch.save({**sd, "train_state": _TrainingState()}, path)
    with pytest.raises(TeacherLoadError, match="train_state"):  # loaded (with a warning), then strictly checked
        with pytest.warns(UserWarning, match=r"_TrainingState.*weights_only=False"):
            build_teacher(_cfg("dino", "vit_base_patch16_224", path, VIT_KW), VIT_IMG, trust_pickle=True)
    with pytest.raises(UnsafePickleError) as e:  # without trust_pickle: refused, nothing unpickled
        build_teacher(_cfg("dino", "vit_base_patch16_224", path, VIT_KW), VIT_IMG)
    assert str(path) in str(e.value) and "_TrainingState" in str(e.value)
    assert "--trust-pickle to the command" in str(e.value) and "--set" not in str(e.value)


def test_garbage_file_is_reported(tmp_path):
    path = tmp_path / "ViT-B-16.pt"
    path.write_text("<html>403 Forbidden</html>")  # e.g. a failed download saved under the right name
    with pytest.raises(TeacherLoadError, match=r"not a readable PyTorch checkpoint") as e:
        build_teacher(_cfg("clip", "vit_base_patch16_clip_quickgelu_224", path, VIT_KW), VIT_IMG)
    assert str(path) in str(e.value)
