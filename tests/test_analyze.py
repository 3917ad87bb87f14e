"""fdfast-analyze: the attention statistics on constructed maps with known answers, the hooks against an
independent softmax for each model family, the filter-normalised landscape, the model sources, and an
end-to-end run of the command on a tiny distillation run and its random teacher."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.beit import Beit
from timm.models.swin_transformer import SwinTransformer
from timm.models.swin_transformer_v2 import SwinTransformerV2
from timm.models.vision_transformer import VisionTransformer

from conftest import tiny_dict
from fdfast.interop import export, loading
from fdfast.analyze import metrics as M
from fdfast.analyze import plots
from fdfast.analyze.stats import Bootstrap, Estimate, compare
from fdfast.analyze.capture import attention_layers, capture_attention
from fdfast.analyze.data import DataError, load_images
from fdfast.analyze.landscape import filter_normalized_direction, loss_landscape
from fdfast.interop.sources import SourceError, TeacherSpec, load_subjects, student_fields
from fdfast.cli.analyze import main
from fdfast.config import StudentConfig, config_from_dict
from fdfast.models.student import build_student, timm_kwargs
from fdfast.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY_TEACHER = dict(kind="clip", model="vit_base_patch16_clip_quickgelu_224", img_size=32,
                    model_kwargs={"patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 2})


# ----------------------------------------------------------------------------------------------
# Statistics on constructed attention maps
# ----------------------------------------------------------------------------------------------
def uniform_mean_distance(g: int, px: float) -> float:
    """Mean distance between two uniformly drawn cells of a g x g grid, by counting offsets:
    (g - |dy|)(g - |dx|) cell pairs lie at offset (dy, dx)."""
    total = sum((g - abs(dy)) * (g - abs(dx)) * math.hypot(dy, dx)
                for dy in range(-g + 1, g) for dx in range(-g + 1, g))
    return px * total / g ** 4


def test_identity_attention_has_distance_zero_and_locality_one():
    eye = torch.eye(9).expand(2, 3, 9, 9)
    assert torch.allclose(M.mean_distance(eye, M.distance_matrix((3, 3), (16.0, 16.0))), torch.zeros(2, 3))
    assert torch.allclose(M.locality(eye, M.neighbourhood((3, 3), 0)), torch.ones(2, 3))


@pytest.mark.parametrize("g", [2, 3, 5])
def test_uniform_attention_gives_the_analytic_mean_distance(g):
    uniform = torch.full((1, 1, g * g, g * g), 1.0 / (g * g))
    got = float(M.mean_distance(uniform, M.distance_matrix((g, g), (16.0, 16.0))))
    assert got == pytest.approx(uniform_mean_distance(g, 16.0), rel=1e-5)
    if g == 2:  # 4 pairs at 0, 8 at one patch, 4 at sqrt(2) patches
        assert got == pytest.approx(16.0 * (8 + 4 * math.sqrt(2)) / 16, rel=1e-5)


def test_locality_is_the_share_of_keys_in_the_3x3_neighbourhood_under_uniform_attention():
    # on a 3x3 grid the 3x3 neighbourhood holds 4 keys (corners), 6 (edges) or 9 (centre)
    uniform = torch.full((1, 1, 9, 9), 1 / 9)
    assert float(M.locality(uniform, M.neighbourhood((3, 3), 1))) == pytest.approx((4 * 4 + 4 * 6 + 9) / 81)


def test_cls_is_dropped_and_rows_renormalised_over_patches():
    g, p = 3, 9
    full = torch.zeros(1, 2, p + 1, p + 1)
    full[:, :, 1:, 0] = 0.5                      # every patch query gives half its mass to CLS
    full[:, :, 1:, 1:] = 0.5 / p                 # and spreads the rest uniformly
    full[:, :, 0, 0] = 1.0
    stats = M.LayerStats(M.LayerGeometry("b0", (g, g), (8.0, 8.0), prefix=1))
    stats.update(full)
    out = stats.summary()
    assert out["distance_px"] == pytest.approx([uniform_mean_distance(g, 8.0)] * 2, rel=1e-5)
    assert out["cls_mass"] == pytest.approx([0.5, 0.5])
    assert out["head_cosine"] == pytest.approx(1.0)  # identical heads
    assert out["distance_spread_px"] == pytest.approx(0.0, abs=1e-5)


def test_head_cosine_is_one_for_identical_and_zero_for_disjoint_heads():
    maps = torch.rand(3, 1, 16, 16).softmax(-1)
    assert torch.allclose(M.head_cosine(maps.expand(3, 2, 16, 16)), torch.ones(3))
    disjoint = torch.zeros(1, 2, 4, 4)
    disjoint[0, 0, :, :2] = 0.5
    disjoint[0, 1, :, 2:] = 0.5
    assert float(M.head_cosine(disjoint)) == pytest.approx(0.0)


def test_uniform_reference_is_what_uniform_attention_scores_on_the_grid():
    ref = M.uniform_reference(M.LayerGeometry("b0", (3, 3), (8.0, 8.0)), radius=1)
    assert ref["distance_px"] == pytest.approx(uniform_mean_distance(3, 8.0), rel=1e-6)
    assert ref["locality"] == pytest.approx((4 * 4 + 4 * 6 + 9) / 81)
    assert (ref["head_cosine"], ref["distance_spread_px"]) == (1.0, 0.0)
    # and a layer fed uniform maps scores exactly its own reference
    stats = M.LayerStats(M.LayerGeometry("b0", (5, 5), (16.0, 16.0), prefix=1))
    stats.update(torch.full((3, 2, 26, 26), 1 / 26))
    out = stats.summary()
    assert out["distance_px"] == pytest.approx([out["uniform"]["distance_px"]] * 2, rel=1e-5)
    assert out["locality"] == pytest.approx([out["uniform"]["locality"]] * 2, rel=1e-5)


def test_a_swin_images_windows_are_averaged_into_one_value_per_image():
    geometry = M.LayerGeometry("layers.0.blocks.0", (2, 2), (4.0, 4.0), windowed=True)
    stats = M.LayerStats(geometry)
    eye, uniform = torch.eye(4), torch.full((4, 4), 0.25)
    # 2 images x 3 windows, image-major as timm's window partition lays them out
    maps = torch.stack([eye, eye, eye, uniform, uniform, eye])[:, None].expand(6, 2, 4, 4)
    stats.update(maps, images=2)
    values = stats.per_image()
    assert values["distance_px"].shape == (2, 2) and values["head_cosine"].shape == (2,)
    u = uniform_mean_distance(2, 4.0)
    torch.testing.assert_close(values["distance_px"][:, 0], torch.tensor([0.0, 2 * u / 3], dtype=torch.float64))
    assert stats.count == 6 and stats.summary()["images"] == 2


def test_bootstrap_interval_is_the_percentile_interval_of_resampled_means():
    torch.manual_seed(0)
    x = torch.randn(400, dtype=torch.float64) * 3 + 10
    boot = Bootstrap(400, resamples=2000, seed=7)
    low, high = boot.interval(x)
    # the same resamples drawn by hand, their means, numpy's percentiles
    index = torch.randint(0, 400, (2000, 400), generator=torch.Generator().manual_seed(7))
    ref = np.percentile(x[index].mean(1).numpy(), [2.5, 97.5])
    assert (low, high) == pytest.approx(tuple(ref), rel=1e-9)
    # and close to the normal-theory interval of a mean: +- 1.96 sigma / sqrt(n)
    half = 1.96 * float(x.std()) / 20
    assert low == pytest.approx(float(x.mean()) - half, abs=0.15 * half)
    assert high == pytest.approx(float(x.mean()) + half, abs=0.15 * half)
    assert Bootstrap(400, 2000, seed=7).interval(x) == [low, high] != Bootstrap(400, 2000, seed=8).interval(x)
    assert Bootstrap(5, 100).interval(torch.full((5, 3), 2.5)) == [[2.5, 2.5]] * 3  # no spread, no width
    spread = boot.interval(torch.stack([x, 2 * x], 1), lambda m: m[:, 1] - m[:, 0])  # a function of the means
    assert spread == pytest.approx([low, high], rel=1e-9)


def test_a_model_is_ahead_only_where_intervals_separate_by_more_than_the_least_effect():
    def verdict(a, b, min_effect=0.01):
        return compare({"a": Estimate(*a), "b": Estimate(*b)}, higher=True, scale=1.0, min_effect=min_effect)
    assert verdict((0.60, 0.55, 0.65), (0.40, 0.35, 0.45)).startswith("**a** ahead")
    assert verdict((0.60, 0.45, 0.65), (0.40, 0.35, 0.50)).startswith("no difference at this sample size")
    assert verdict((0.9991, 0.99905, 0.99915), (0.9990, 0.99895, 0.99904)).startswith("no difference above")
    assert verdict((0.9991, 0.99905, 0.99915), (0.9990, 0.99895, 0.99904), 0).startswith("**a** ahead")
    assert compare({"a": Estimate(1, 0, 2), "b": None}, higher=True, scale=1, min_effect=0).startswith("needs two")
    lower = compare({"a": Estimate(0.2, 0.1, 0.3), "b": Estimate(0.8, 0.7, 0.9)}, higher=False, scale=1,
                    min_effect=0.01)
    assert lower.startswith("**a** ahead")


def _captured_figures(monkeypatch) -> list:
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    return figures


def test_figures_start_at_zero_show_uniform_attention_and_give_maps_colour_bars(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    figures = _captured_figures(monkeypatch)
    layer = {"distance_px": [33.05, 33.12], "distance_px_ci": [[33.0, 33.1], [33.1, 33.14]],
             "uniform": {"distance_px": 33.1}}
    model = {"name": "m", "role": "teacher", "layers": [layer, layer]}
    plots.per_head_panels([model], "distance_px", "px", "t", tmp_path / "a.png")
    plots.per_head_panels([model], "distance_px", "px", "t", tmp_path / "b.png", autoscale=True)
    fixed, zoomed = figures[0].axes[0], figures[1].axes[0]
    assert fixed.get_ylim()[0] == 0 and zoomed.get_ylim()[0] > 30
    dashed = [line for line in fixed.get_lines() if line.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [33.1, 33.1]
    layer = {"distance_spread_px": 0.02, "distance_spread_px_ci": [0.01, 0.03], "head_cosine": 0.999,
             "head_cosine_ci": [0.998, 0.9995]}
    plots.diversity_plot([{"name": "m", "role": "teacher", "layers": [layer] * 3}], tmp_path / "c.png")
    spread, cosine = figures[2].axes
    assert spread.get_ylim()[0] == 0 and cosine.get_ylim() == (0.0, 1.02)
    maps = {"blocks.0": torch.rand(3, 4, 4), "blocks.1": torch.rand(3, 4, 4)}
    plots.attention_maps_plot("m", maps, {k: [0.5] * 3 for k in maps}, tmp_path / "d.png")
    images = [ax for ax in figures[3].axes if ax.images]
    assert len(images) == 6 and len(figures[3].axes) == 12  # a colour bar beside every panel


# ----------------------------------------------------------------------------------------------
# Hooks: captured probabilities == softmax computed independently from q, k and the bias
# ----------------------------------------------------------------------------------------------
def _qk(attn, x):
    """q, k (B, H, N, d) from the module's weights; Beit / SwinV2 carry q and v biases (k bias 0)."""
    bias = attn.qkv.bias
    if getattr(attn, "q_bias", None) is not None:
        bias = torch.cat((attn.q_bias, torch.zeros_like(attn.q_bias), attn.v_bias))
    qkv = F.linear(x, attn.qkv.weight, bias).reshape(x.shape[0], x.shape[1], 3, attn.num_heads, -1)
    return qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)


def _gather(table, index, n):
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)


def _masked_softmax(logits, mask):
    if mask is not None:
        nw = mask.shape[0]
        logits = (logits.view(-1, nw, *logits.shape[1:]) + mask[None, :, None]).flatten(0, 1)
    return logits.softmax(-1)


def reference_probs(model, attn, args, kwargs):
    x = args[0]
    n = x.shape[1]
    q, k = _qk(attn, x)
    if isinstance(model, SwinTransformerV2):
        cos = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-1, -2)
        scale = torch.clamp(attn.logit_scale, max=math.log(100.0)).exp()
        table = attn.cpb_mlp(attn.relative_coords_table).reshape(-1, attn.num_heads)
        return _masked_softmax(cos * scale + 16 * torch.sigmoid(_gather(table, attn.relative_position_index, n)),
                               kwargs.get("mask"))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if isinstance(model, SwinTransformer):
        logits = logits + _gather(attn.relative_position_bias_table, attn.relative_position_index, n)
        return _masked_softmax(logits, kwargs.get("mask"))
    if isinstance(model, Beit):
        if attn.relative_position_bias_table is not None:
            logits = logits + _gather(attn.relative_position_bias_table, attn.relative_position_index, n)
        if model.rel_pos_bias is not None:
            rpb = model.rel_pos_bias
            logits = logits + _gather(rpb.relative_position_bias_table, rpb.relative_position_index, n)
    return logits.softmax(-1)


FAMILIES = {
    "beit-shared": lambda: Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, qkv_bias=True,
                                use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                num_classes=0, global_pool=""),
    "beit-per-block": lambda: Beit(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, qkv_bias=True,
                                   use_abs_pos_emb=False, use_rel_pos_bias=True, num_classes=0),
    "vit": lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0),
    "swin": lambda: SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                    window_size=4, num_classes=0),
    "swinv2": lambda: SwinTransformerV2(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                                        window_size=4, num_classes=0),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hooked_probabilities_equal_an_independent_softmax(family):
    torch.manual_seed(0)
    model = FAMILIES[family]().eval()
    with torch.no_grad():  # the tables and q/v biases start at 0; make every term of the logits count
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias", "logit_scale")):
                p.add_(torch.randn_like(p))
    x = torch.randn(2, 3, 32, 32)
    expected_out = model.forward_features(x)
    layers = attention_layers(model)
    kernels = [(type(m), getattr(m, "fused_attn", None)) for m, _ in layers]
    refs, handles = {}, []
    for i, (attn, _) in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            refs[i] = reference_probs(model, mod, args, kwargs)
        handles.append(attn.register_forward_pre_hook(pre, with_kwargs=True))
    got = {}
    with torch.no_grad(), capture_attention(model, lambda i, a: got.setdefault(i, a)) as geometries:
        model.forward_features(x)
    for h in handles:
        h.remove()
    assert len(got) == len(layers) == len(geometries) == (4 if family.startswith("swin") else 2)
    for i, geometry in enumerate(geometries):
        n = geometry.prefix + geometry.grid[0] * geometry.grid[1]
        assert got[i].shape[-2:] == (n, n)
        torch.testing.assert_close(got[i], refs[i], rtol=1e-5, atol=1e-6)
    if family == "swin":  # stage 1 (8x8 tokens, 4x4 windows): 4 px tokens; stage 2: 8 px
        assert [g.token_px for g in geometries] == [(4.0, 4.0)] * 2 + [(8.0, 8.0)] * 2
    # each module has its own kernel back (Beit: SDPA; timm's Swin v1 default: eager), same output
    assert [(type(m), getattr(m, "fused_attn", None)) for m, _ in layers] == kernels
    torch.testing.assert_close(model.forward_features(x), expected_out)


# ----------------------------------------------------------------------------------------------
# Loss landscape
# ----------------------------------------------------------------------------------------------
def test_filter_normalised_direction_matches_each_filter_norm_and_skips_1d_params():
    params = {"w": torch.randn(5, 3, 2), "b": torch.randn(5)}
    d = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    torch.testing.assert_close(d["w"].flatten(1).norm(dim=1), params["w"].flatten(1).norm(dim=1))
    assert not d["b"].any()


def test_landscape_of_a_model_at_the_minimum_of_a_quadratic_is_lowest_at_the_centre():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    optimum = {n: p.detach().clone() for n, p in model.named_parameters()}

    def loss() -> float:
        return float(sum(((p - optimum[n]) ** 2).sum() for n, p in model.named_parameters()))
    land = loss_landscape(dict(model.named_parameters()), loss, span=1.0, grid=5, line_points=7)
    plane = torch.tensor(land["plane"])
    assert land["center"] == 0.0 and plane[2, 2] == 0.0 and land["line"][3] == 0.0
    assert (plane > 0).sum() == 24  # every other point of the plane is higher
    assert min(land["line"][:3] + land["line"][4:]) > 0
    # the quadratic grows as alpha^2 along the line: symmetric, 9x at alpha = -1 than at -1/3
    assert land["line"][0] == pytest.approx(land["line"][6]) == pytest.approx(9 * land["line"][2], rel=1e-5)
    for n, p in model.named_parameters():  # weights restored
        assert torch.equal(p, optimum[n])


def test_landscape_keeps_each_images_loss_at_the_weights_and_the_line_ends():
    weight = nn.Parameter(torch.tensor([[1.0, -2.0]]))
    scale = torch.tensor([1.0, 2.0, 3.0])  # three "images", each a parabola around the weights

    def loss() -> torch.Tensor:
        return scale * (weight - torch.tensor([[1.0, -2.0]])).pow(2).sum()
    land = loss_landscape({"w": weight}, loss, span=0.5, grid=3, line_points=5)
    per = land["per_image"]
    assert per["center"] == [0.0, 0.0, 0.0] and land["center"] == 0.0
    assert torch.allclose(torch.tensor(per["plus"]), torch.tensor(per["minus"]))
    assert torch.allclose(torch.tensor(per["plus"]) / torch.tensor(per["plus"][0]), scale)
    assert land["line"][0] == pytest.approx(sum(per["minus"]) / 3) and land["line"][-1] == pytest.approx(
        sum(per["plus"]) / 3)


# ----------------------------------------------------------------------------------------------
# Sources and data
# ----------------------------------------------------------------------------------------------
def test_official_vit_checkpoint_gives_its_architecture_student_and_projector(tmp_path):
    fields = dict(arch="beit", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.manual_seed(0)
    student = build_student(StudentConfig(**fields)).eval()
    projector = nn.Linear(student.num_features, 48)
    path = export.export_official(student, projector, tmp_path / "fd.pth", "beit")
    got, classes, finetune = student_fields(loading.read_student_state_dict(path)[0], str(path))
    assert (classes, finetune) == (0, False) and {k: got[k] for k in fields} == fields
    teacher, subject = load_subjects([str(path)], TeacherSpec(weights="random", **TINY_TEACHER))
    assert (teacher.role, subject.role, subject.loss_kind) == ("teacher", "student", "fd")
    torch.testing.assert_close(subject.projector.weight, projector.weight)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(subject.network.forward_features(x), student.forward_features(x))


def test_official_swinv2_architecture_from_its_buffers_or_from_the_export_record(tmp_path):
    fields = dict(arch="swinv2", img_size=32, patch_size=2, embed_dim=16, depth=[2, 2], num_heads=[2, 4],
                  window_size=4)
    student = build_student(StudentConfig(**fields)).eval()
    model = export.official_state_dict(student)
    bare = tmp_path / "bare.pth"
    torch.save({"model": model}, bare)
    with pytest.raises(SourceError, match="window size"):
        load_subjects([str(bare)])
    # official main_fd.py files keep the window buffers, as the official modules register them
    buffers = {f"encoder.{name}": t for name, t in student.named_buffers()
               if name.endswith(("relative_coords_table", "relative_position_index", "attn_mask"))}
    torch.save({"model": {**model, **buffers}}, tmp_path / "official.pth")
    got, _, _ = student_fields(loading.read_student_state_dict(tmp_path / "official.pth")[0], "official.pth")
    assert {k: got[k] for k in fields} == fields
    # fdfast-export records the student's config next to the weights
    export.export_official(student, None, tmp_path / "exported.pth", extra={"fdfast": {"student": fields}})
    x = torch.randn(1, 3, 32, 32)
    for file in ("official.pth", "exported.pth"):
        (subject,) = load_subjects([str(tmp_path / file)])
        torch.testing.assert_close(subject.network.forward_features(x), student.forward_features(x))


def test_timm_export_folder_is_a_classifier_with_its_weights(tmp_path):
    fields = dict(arch="beit", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    model = build_student(StudentConfig(**fields), finetune=True).eval()
    export.export_timm(model, tmp_path / "export", model_args=timm_kwargs(StudentConfig(**fields), finetune=True))
    (subject,) = load_subjects([str(tmp_path / "export")])
    assert (subject.role, subject.num_classes, subject.loss_kind, subject.img_size) == ("classifier", 3, "ce", 32)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(subject.network.eval()(x), model(x))


def _damaged_export(src: Path, dst: Path, config=None, weights=None) -> str:
    """A copy of the timm export folder ``src`` with ``config(dict)`` / ``weights(bytes) -> bytes`` applied."""
    dst.mkdir()
    data = json.loads((src / "config.json").read_text())
    if config:
        config(data)
    (dst / "config.json").write_text(json.dumps(data))
    raw = (src / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(weights(raw) if weights else raw)
    return str(dst)


def test_a_damaged_or_foreign_timm_export_folder_is_one_line(tmp_path, capsys):
    fields = dict(arch="beit", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
    src = tmp_path / "export"
    export.export_timm(build_student(StudentConfig(**fields), finetune=True), src,
                       model_args=timm_kwargs(StudentConfig(**fields), finetune=True))
    cases = {
        "resnet50": (dict(config=lambda c: c.update(architecture="resnet50")), "unexpected keyword argument"),
        "unknown_arg": (dict(config=lambda c: c["model_args"].update(foo=1)), "unexpected keyword argument 'foo'"),
        "truncated": (dict(weights=lambda w: w[:len(w) // 2]), "SafetensorError"),
        "header_2_62": (dict(weights=lambda w: (2**62).to_bytes(8, "little") + w[8:]), "SafetensorError"),
        "wider": (dict(config=lambda c: c["model_args"].update(embed_dim=64, num_heads=4)),
                  "differ in shape: cls_token (file [1, 1, 32], model [1, 1, 64])"),
    }
    for name, (edit, expected) in cases.items():
        folder = _damaged_export(src, tmp_path / name, **edit)
        with pytest.raises(SourceError) as err:
            load_subjects([folder])
        assert str(err.value).startswith(f"{folder}: timm cannot build it") and expected in str(err.value), name
        assert "\n" not in str(err.value)
        assert main([folder, "--synthetic", "--out", str(tmp_path / "out"), "-q"]) == 2
        err = capsys.readouterr().err
        assert err.count("fdfast-analyze:") == 1 and expected in err and "Traceback" not in err, (name, err)


def test_teacher_kwargs_that_are_no_plain_yaml_mapping_are_one_line(tmp_path, capsys):
    marker = tmp_path / "marker"
    for kwargs, expected in (("{window_size: [14", "is not valid YAML"),
                             (f"!!python/object/apply:os.system ['touch {marker}']", "is not valid YAML"),
                             ("[1, 2]", "is not a mapping")):
        assert main(["--teacher", "random", "--teacher-kwargs", kwargs, "--synthetic", "--out",
                     str(tmp_path / "out"), "-q"]) == 2
        err = capsys.readouterr().err
        assert err.count("fdfast-analyze:") == 1 and expected in err and "Traceback" not in err, err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_image_folder_subset_is_uint8_at_the_requested_size(image_folder):
    batches = load_images(str(image_folder), num_images=5, img_size=32, batch_size=2, num_workers=0)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert all(b[0].dtype == torch.uint8 and b[0].shape[1:] == (3, 32, 32) for b in batches)
    with pytest.raises(DataError, match="fewer than --num-images"):
        load_images(str(image_folder), num_images=10_000, img_size=32, batch_size=2, num_workers=0)


# ----------------------------------------------------------------------------------------------
# The command, end to end
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    """A two-step tiny distillation run, and the teacher the trainer distilled it from."""
    tmp = tmp_path_factory.mktemp("analyze")
    teachers = []
    train(config_from_dict(tiny_dict(tmp, train={"max_steps": 2})),
          on_end=lambda task: teachers.append(task.teacher.state_dict()))
    return tmp / "run", teachers[0]


def test_a_runs_random_teacher_is_the_one_it_was_distilled_from(distill_run):
    run, teacher_state = distill_run
    teacher, student = load_subjects([str(run)])
    assert (teacher.role, student.role, student.loss_kind) == ("teacher", "student", "fd")
    assert student.teacher.state_dict().keys() == teacher_state.keys()
    assert all(torch.equal(v, teacher_state[k]) for k, v in student.teacher.state_dict().items())


def test_fdfast_analyze_writes_every_output(distill_run, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    run, _ = distill_run
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "fdfast.cli.analyze", str(run), "--synthetic", "--num-images", "4",
                        "--batch-size", "2", "--grid", "3", "--line-points", "3", "--out", str(out), "-q"],
                       cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    names = ["run-teacher", "run"]
    distance = json.loads((out / "attention_distance.json").read_text())
    assert list(distance["models"]) == names
    layers = distance["models"]["run"]["layers"]
    assert len(layers) == 2 and all(len(lay["distance_px"]) == 2 for lay in layers)
    assert all(0 <= d <= 32 * math.sqrt(2) for lay in layers for d in lay["distance_px"])
    diversity = json.loads((out / "head_diversity.json").read_text())["models"]["run"]["layers"]
    assert {"distance_spread_px", "head_cosine"} <= set(diversity[0])
    diagonal = json.loads((out / "diagonality.json").read_text())["models"]["run"]["layers"]
    assert all(0 <= v <= 1 for lay in diagonal for v in lay["locality"])
    land = json.loads((out / "landscape.json").read_text())
    assert list(land["models"]) == ["run"] and land["models"]["run"]["loss"] == "fd"
    assert len(land["models"]["run"]["plane"]) == 3 and "run-teacher" in land["skipped"]
    pictures = sorted(p.name for p in out.glob("*.png"))
    assert pictures == sorted(["attention_distance.png", "head_diversity.png", "diagonality.png",
                               "attention_maps_run.png", "attention_maps_run-teacher.png", "landscape_run.png"])
    report = (out / "report.md").read_text()
    for picture in pictures:
        with Image.open(out / picture) as img:
            img.load()
        assert f"]({picture})" in report
    assert not list(out.glob(".*.tmp"))
    # one model with a loss: the report says up front that there is no flatness comparison
    assert "**Loss landscapes** need two models with the same loss: only one model per loss" in report
    assert report.index("**Loss landscapes**") < report.index("| model |")


def test_teacher_landscape_is_its_fd_loss_against_its_own_target_and_every_number_has_an_interval(
        distill_run, tmp_path):
    pytest.importorskip("matplotlib")
    run, _ = distill_run
    out = tmp_path / "out"
    assert main([str(run), "--synthetic", "--num-images", "6", "--batch-size", "4", "--landscape-images", "5",
                 "--grid", "3", "--line-points", "3", "--bootstrap", "200", "--teacher-landscape", "--out", str(out),
                 "-q"]) == 0
    land = json.loads((out / "landscape.json").read_text())
    teacher = land["models"]["run-teacher"]
    assert teacher["loss"] == "fd" and teacher["target"] == "its own whitened tokens" and not land["skipped"]
    assert teacher["center"] == 0.0 and teacher["per_image"]["center"] == [0.0] * 5  # the perfect student of itself
    assert min(teacher["per_image"]["minus"]) > 0 and len(land["models"]["run"]["per_image"]["plus"]) == 5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bootstrap"] == {"resamples": 200, "confidence": 0.95, "seed": 0, "min_effect": 0.01}
    for s in summary["models"].values():
        for key in ("distance_px", "head_cosine", "locality", "loss", "loss_rise"):  # means: inside their interval
            low, high = s[f"{key}_ci"]
            assert low - 1e-12 <= s[key] <= high + 1e-12, key
        assert len(s["distance_spread_px_ci"]) == 2  # a std of means: a percentile interval need not hold it
        # every grid is 4 x 4 patches of 8 px
        assert s["uniform"]["distance_px"] == pytest.approx(uniform_mean_distance(4, 8.0), rel=1e-6)
    layer = json.loads((out / "attention_distance.json").read_text())["models"]["run"]["layers"][0]
    assert len(layer["distance_px_ci"]) == 2 and layer["uniform"] == pytest.approx(uniform_mean_distance(4, 8.0))
    with np.load(out / "per_image_run.npz") as per_image:
        assert per_image["blocks.0.distance_px"].shape == (6, 2) and per_image["blocks.1.head_cosine"].shape == (6,)
        assert per_image["blocks.0.distance_px"].mean(0) == pytest.approx(layer["distance_px"])
    report = (out / "report.md").read_text()
    assert "compared within one loss (FD: run-teacher, run)" in report


def test_two_uniform_attention_models_show_no_difference(tmp_path):
    """Two random ViTs attend almost uniformly: every claim must say the data show no difference."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "out"
    assert main(["random:test_vit", "random:test_vit", "--synthetic", "--num-images", "16", "--no-landscape",
                 "--out", str(out), "-q"]) == 0
    report = (out / "report.md").read_text()
    claims = [line for line in report.splitlines() if line.startswith("* ") and "landscape" not in line]
    assert len(claims) == 4 and all(": no difference" in line and "ahead" not in line for line in claims), claims
    assert "Near-uniform attention: test_vit, test_vit-2" in report
    assert "need two models with the same loss: none computed (--no-landscape)" in report
    # the uniform reference on test_vit's 10 x 10 grid of 16 px patches, in the table
    assert f"| test_vit | 10x10 | {uniform_mean_distance(10, 16.0):.4g} | 0 | 1 |" in report


def test_random_models_are_seeded_by_their_position_and_leave_the_callers_rng_alone():
    def weights(subject):
        return torch.cat([p.flatten() for p in subject.network.parameters()])

    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    first = load_subjects(["random:test_vit", "random:test_vit"], with_teacher=False)
    assert torch.equal(torch.random.get_rng_state(), before)
    again = load_subjects(["random:test_vit", "random:test_vit"], with_teacher=False)
    assert torch.equal(weights(first[0]), weights(again[0])) and torch.equal(weights(first[1]), weights(again[1]))
    assert not torch.equal(weights(first[0]), weights(first[1]))


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(tmp_path / "missing"), "--synthetic", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing" in err
    assert main(["random:vit_tiny_patch16_224", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert "--data" in capsys.readouterr().err
    assert not out.exists()
