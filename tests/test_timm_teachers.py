"""``model.teacher.kind: timm``: every family from every file layout, strictly, with the same forward.

Sources are tiny random timm models (``_timm_layouts``), one per teacher people distil from today: DINOv2 with and
without registers and OpenAI/OpenCLIP CLIP (VisionTransformer), SigLIP (VisionTransformer without a class token),
DINOv3, EVA-02 CLIP and PE (Eva, RoPE). Each is written the way its publisher ships it and loaded back through
``build_teacher``; its tokens must equal the source's ``forward_features``.
"""
from __future__ import annotations

import warnings

import pytest
import timm
import torch

import _timm_layouts as L
from fdfast.config import ConfigError, TeacherConfig
from fdfast.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from fdfast.interop.reading import UnsafePickleError
from fdfast.models.teacher_files import TeacherLoadError
from fdfast.models.teachers import build_teacher


@pytest.fixture(scope="module")
def sources():
    return {key: L.tiny_source(key, seed=i) for i, key in enumerate(L.SOURCES)}


def _kwargs(key):
    return {**L.TINY, "patch_size": L.SOURCES[key][1]}


def _write(layout, key, name, model, tmp):
    """(weights, model.teacher.model, model_kwargs): folders carry their model_args and normalisation in
    config.json; a single CLIP L/14 file needs its tag (its normalisation differs between tags)."""
    tag = model.pretrained_cfg["tag"]
    if key == "clip_l14" and layout in ("safetensors", "pth", "openclip_bin"):
        name = f"{name}.openai"
    if layout == "timm_folder":
        return L.timm_folder(model, tmp / "folder"), name, {}
    if layout == "timm_folder_bin":
        return L.timm_folder(model, tmp / "folder", safetensors=False), name, {}
    if layout == "hub_repo":
        return L.hub_cache(model, tmp / "hub", name), name, {}
    if layout == "hub_root":  # the cache root; the cached repository carries the tag the config leaves out
        L.hub_cache(model, tmp / "hub", f"{name}.{tag}")
        return tmp / "hub", name, {}
    if layout in ("safetensors", "pth"):
        return L.single_file(model.state_dict(), tmp / f"weights.{layout}"), name, _kwargs(key)
    original = {"dinov2_pth": L.dinov2_original, "dinov3_pth": L.dinov3_original,
                "openclip_bin": L.openai_clip_original, "openclip_trunk_bin": L.open_clip_trunk}
    if layout in original:
        file = "open_clip_pytorch_model.bin" if layout.startswith("openclip") else "release.pth"
        return L.single_file(original[layout](model), tmp / file), name, _kwargs(key)
    if layout == "openclip_folder":
        return L.openclip_folder(L.openai_clip_original(model), tmp / "oc", mean=CLIP_MEAN, std=CLIP_STD), \
            f"{name}.openai", _kwargs(key)
    assert layout == "openclip_trunk_folder"
    return L.openclip_folder(L.open_clip_trunk(model), tmp / "oc"), name, _kwargs(key)


COMMON = ("timm_folder", "timm_folder_bin", "hub_repo", "hub_root", "safetensors", "pth")
ORIGINAL = {"dinov2_reg4": ("dinov2_pth",), "dinov2": ("dinov2_pth",), "dinov3": ("dinov3_pth",),
            "clip_l14": ("openclip_bin", "openclip_folder"), "siglip": ("openclip_trunk_folder",),
            "eva02_clip": ("openclip_trunk_bin",), "pe_core": ()}
CASES = [(k, lay) for k in L.SOURCES for lay in COMMON] + [(k, lay) for k, lays in ORIGINAL.items() for lay in lays]


@pytest.mark.parametrize("key, layout", CASES)
def test_every_family_loads_strictly_from_every_layout(sources, tmp_path, key, layout):
    name, source, img = sources[key]
    weights, model, kwargs = _write(layout, key, name, source, tmp_path)
    cfg = TeacherConfig(kind="timm", model=model, weights=str(weights), model_kwargs=kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no resampling notices, no tag warnings: the file fits as it is
        teacher = build_teacher(cfg, img)
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = source.forward_features(x)
    torch.testing.assert_close(teacher(x), expected, rtol=1e-5, atol=1e-5)
    assert teacher.sha256 is not None and len(teacher.sha256) == 64 and teacher.family in ("vit", "eva")
    unused = " ".join(teacher.unused_keys)
    if layout.startswith("openclip"):  # the text tower (and CLIP's projection) are reported, not loaded
        assert "keys outside visual." in unused and "positional_embedding" in unused
    if layout in ("openclip_bin", "openclip_folder"):
        assert "head.bias, head.weight (a classifier or the image-text projection" in unused  # visual.proj
    if layout.startswith("openclip_trunk"):  # 7 text-tower keys and the projection beside the trunk
        assert "8 keys outside visual.trunk.*" in unused
    if layout in COMMON:
        assert not teacher.unused_keys


def test_dinov2_original_positions_are_resampled_to_the_resolved_grid(sources, tmp_path):
    """A release file at another grid (DINOv2 ships 37x37 at 518 px) runs at the size the run resolves."""
    _, source, _ = L.tiny_source("dinov2_reg4", seed=3, grid=6)
    path = L.single_file(L.dinov2_original(source), tmp_path / "dinov2_vitb14_reg4_pretrain.pth")
    cfg = TeacherConfig(kind="timm", model="vit_base_patch14_reg4_dinov2", weights=str(path),
                        model_kwargs=_kwargs("dinov2_reg4"))
    teacher = build_teacher(cfg, 28)
    assert teacher.model.pos_embed.shape == (1, 16, 32) and teacher.layout.grid == (4, 4)
    assert teacher(torch.randn(1, 3, 28, 28)).shape == (1, 21, 32)


def test_normalisation_from_tag_folder_and_config(sources, tmp_path):
    def mean_of(**kw):
        return build_teacher(TeacherConfig(kind="timm", **kw), 32).mean
    assert mean_of(model="vit_base_patch16_siglip_224", model_kwargs=_kwargs("siglip")) == (0.5, 0.5, 0.5)
    assert mean_of(model="eva02_base_patch16_clip_224", model_kwargs=_kwargs("eva02_clip")) == CLIP_MEAN
    assert mean_of(model="vit_base_patch16_dinov3", model_kwargs=_kwargs("dinov3")) == IMAGENET_MEAN
    assert mean_of(model="vit_large_patch14_clip_224.openai", model_kwargs=_kwargs("clip_l14")) == CLIP_MEAN
    assert mean_of(model="vit_large_patch14_clip_224.laion2b", model_kwargs=_kwargs("clip_l14")) == (0.5,) * 3
    # a folder says how its weights were trained; model.teacher.mean/std override everything
    name, source, img = sources["dinov3"]
    folder = L.timm_folder(source, tmp_path / "f")
    cfg = L.json.loads((folder / "config.json").read_text())
    cfg["pretrained_cfg"]["mean"] = [0.1, 0.2, 0.3]
    (folder / "config.json").write_text(L.json.dumps(cfg))
    teacher = build_teacher(TeacherConfig(kind="timm", model=name, weights=str(folder)), img)
    assert teacher.mean == (0.1, 0.2, 0.3) and teacher.std == IMAGENET_STD and "config.json" in teacher.normalisation
    teacher = build_teacher(TeacherConfig(kind="timm", model=name, weights=str(folder), mean=[0.4] * 3,
                                          std=[0.2] * 3), img)
    assert (teacher.mean, teacher.std, teacher.normalisation) == ((0.4,) * 3, (0.2,) * 3, "model.teacher.mean/std")
    # the four FD kinds keep their own, and take an override too
    assert build_teacher(TeacherConfig(kind="clip", model_kwargs={**L.TINY, "patch_size": 8}), 32).mean == CLIP_MEAN
    with pytest.raises(ConfigError, match=r"model.teacher.std=\[0.5, 0.0, 0.5\] must be > 0"):
        TeacherConfig(kind="timm", std=[0.5, 0.0, 0.5])


def test_a_tagless_name_whose_weights_disagree_on_normalisation_warns(sources, tmp_path):
    name, source, img = sources["clip_l14"]
    path = L.single_file(source.state_dict(), tmp_path / "w.safetensors")
    cfg = TeacherConfig(kind="timm", model=name, weights=str(path), model_kwargs=_kwargs("clip_l14"))
    with pytest.warns(UserWarning, match=r"no pretrained tag.*openai.*model.teacher.mean/std"):
        build_teacher(cfg, img)


def test_files_that_do_not_fit_are_refused_by_name(sources, tmp_path):
    name, source, img = sources["dinov3"]
    kw = _kwargs("dinov3")
    path = L.single_file(L.dinov3_original(source, qkv_bias=0.1), tmp_path / "dinov3.pth")
    with pytest.raises(TeacherLoadError, match=r"non-zero qkv biases.*_dinov3_qkvb"):
        build_teacher(TeacherConfig(kind="timm", model=name, weights=str(path), model_kwargs=kw), img)
    path = L.single_file(source.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(TeacherLoadError, match=r"patch 8.*patch 16"):  # not silently resampled by timm
        build_teacher(TeacherConfig(kind="timm", model=name, weights=str(path), model_kwargs=L.TINY), 32)
    extra = L.single_file({**source.state_dict(), "blocks.9.attn.qkv.weight": torch.zeros(1)}, tmp_path / "x.pth")
    with pytest.raises(TeacherLoadError, match=r"file keys the model does not have \(blocks.9.attn.qkv.weight\)"):
        build_teacher(TeacherConfig(kind="timm", model=name, weights=str(extra), model_kwargs=kw), img)
    folder = L.timm_folder(source, tmp_path / "f")
    with pytest.raises(TeacherLoadError, match=r"weights of timm 'vit_base_patch16_dinov3'.*set model.teacher.model"):
        build_teacher(TeacherConfig(kind="timm", model="vit_base_patch16_siglip_224", weights=str(folder)), img)
    (folder / "config.json").write_text('{"model_type": "siglip_vision_model"}')
    with pytest.raises(TeacherLoadError, match=r"not timm's.*siglip_vision_model"):
        build_teacher(TeacherConfig(kind="timm", model=name, weights=str(folder)), img)
    L.hub_cache(source, tmp_path / "hub", "vit_small_patch16_dinov3.lvd1689m")
    with pytest.raises(TeacherLoadError, match=r"without one models--timm--vit_base_patch16_dinov3 .*it holds"):
        build_teacher(TeacherConfig(kind="timm", model=name, weights=str(tmp_path / "hub")), img)
    with pytest.raises(TeacherLoadError, match=r"teacher weights not found: .*model.teacher.weights"):
        build_teacher(TeacherConfig(kind="timm", model=name, weights=str(tmp_path / "nope")), img)
    with pytest.raises(ConfigError, match=r"builds ResNet, which is not a teacher family"):
        build_teacher(TeacherConfig(kind="timm", model="resnet18"), 32)


class _Pickled:  # not a data-only class: unpickling it needs trust
    def __init__(self):
        self.step = 1


def test_pickles_follow_the_load_policy_and_safetensors_never_unpickle(sources, tmp_path):
    name, source, img = sources["siglip"]
    path = tmp_path / "w.pth"
    torch.save({"state_dict": source.state_dict(), "trainer": _Pickled()}, path)
    cfg = TeacherConfig(kind="timm", model=name, weights=str(path), model_kwargs=_kwargs("siglip"))
    with pytest.raises(UnsafePickleError, match="_Pickled"):
        build_teacher(cfg, img)
    with pytest.warns(UserWarning, match="weights_only=False"):
        teacher = build_teacher(cfg, img, trust_pickle=True)  # the caller's argument, never the config
    assert teacher.layout.num_cls == 0 and teacher.num_tokens == 16


def test_installed_timm_has_every_teacher_of_the_issue():
    """The architectures the shipped configs and the README name exist in this timm, in these families."""
    for name, cls in [("vit_base_patch14_reg4_dinov2", "VisionTransformer"), ("vit_base_patch16_dinov3", "Eva"),
                      ("vit_base_patch16_siglip_224", "VisionTransformer"), ("eva02_base_patch16_clip_224", "Eva"),
                      ("vit_large_patch14_clip_224", "VisionTransformer"), ("vit_pe_core_base_patch16_224", "Eva"),
                      ("vit_base_patch14_dinov2", "VisionTransformer")]:
        with torch.device("meta"):
            assert type(timm.create_model(name, num_classes=0)).__name__ == cls
