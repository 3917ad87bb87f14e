"""Layer-wise LR decay and weight-decay exclusions of the fine-tune models, against spec §2.3.

Scale of group i = decay ** (G - 1 - i). ViT: G = depth + 2; cls_token / patch_embed -> 0,
blocks.k -> k + 1, everything else (fc_norm, head) -> G - 1. Swin: G = sum(depths) + 2; patch_embed ->
0, layers.s.blocks.b -> sum(depths[:s]) + b + 1, the PatchMerging that ends stage s (timm:
``layers.{s+1}.downsample``) -> sum(depths[:s+1]), norm / head -> G - 1.
"""
from __future__ import annotations

import pytest

from fdfast.config import OptimConfig, StudentConfig
from fdfast.models.student import build_student
from fdfast.optim import layer_id, param_groups

D = 0.65


def vit_cfg() -> StudentConfig:
    return StudentConfig(arch="beit", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                         num_classes=5, drop_path=0.1)


def swin_cfg() -> StudentConfig:
    return StudentConfig(arch="swinv2", img_size=32, patch_size=2, embed_dim=16, depth=[2, 2], num_heads=[2, 4],
                         window_size=4, num_classes=5)


def scales_by_name(groups) -> dict[str, float]:
    out = {}
    for g in groups:
        for n in g["names"]:
            assert n not in out, f"{n} in two groups"
            out[n] = g["lr_scale"]
    return out


def wd_by_name(groups) -> dict[str, float]:
    return {n: g["weight_decay"] for g in groups for n in g["names"]}


def test_vit_layer_ids_and_scales():
    s = vit_cfg()
    model = build_student(s, finetune=True)
    groups = param_groups(model, OptimConfig(layer_decay=D), s)
    scale = scales_by_name(groups)
    assert set(scale) == {n for n, _ in model.named_parameters()}  # every parameter, exactly once
    G = s.depth + 2
    expect_prefix = {"cls_token": D ** 3, "patch_embed.": D ** 3, "blocks.0.": D ** 2, "blocks.1.": D ** 1,
                     "fc_norm.": 1.0, "head.": 1.0}
    for name, got in scale.items():
        want = [v for p, v in expect_prefix.items() if name.startswith(p)]
        assert len(want) == 1, f"unexpected parameter {name}"
        assert got == pytest.approx(want[0]), name
    # the per-block RPB table belongs to its block
    assert scale["blocks.0.attn.relative_position_bias_table"] == pytest.approx(D ** 2)
    assert scale["blocks.1.attn.relative_position_bias_table"] == pytest.approx(D)
    # G distinct layer ids, each split into decay / no-decay groups
    assert {layer_id(n, "beit", G) for n in scale} == {0, 1, 2, 3}
    assert sorted({g["lr_scale"] for g in groups}) == pytest.approx(sorted({D ** 3, D ** 2, D, 1.0}))


def test_vit_layer_ids_with_encoder_prefix_and_wrappers():
    # DDP / compile / the distillation model's 'encoder.' prefix must not change the mapping
    for prefix in ("", "module.", "_orig_mod.", "encoder."):
        assert layer_id(prefix + "cls_token", "beit", 4) == 0
        assert layer_id(prefix + "patch_embed.proj.weight", "beit", 4) == 0
        assert layer_id(prefix + "blocks.1.mlp.fc1.weight", "beit", 4) == 2
        assert layer_id(prefix + "head.weight", "beit", 4) == 3
        assert layer_id(prefix + "rel_pos_bias.relative_position_bias_table", "beit", 4) == 3


def test_vit_no_weight_decay_rules():
    s = vit_cfg()
    model = build_student(s, finetune=True)
    wd = wd_by_name(param_groups(model, OptimConfig(layer_decay=D, weight_decay=0.05), s))
    no_wd = {n for n, v in wd.items() if v == 0}
    decayed = {n for n, v in wd.items() if v == 0.05}
    assert no_wd | decayed == set(wd)
    assert {"cls_token", "patch_embed.proj.bias", "blocks.0.gamma_1", "blocks.0.gamma_2", "blocks.0.attn.q_bias",
            "blocks.0.attn.v_bias", "blocks.0.norm1.weight", "fc_norm.weight", "fc_norm.bias",
            "head.bias"} <= no_wd
    # every 1-D parameter and every .bias is excluded
    params = dict(model.named_parameters())
    assert all(n in no_wd for n, p in params.items() if p.ndim <= 1 or n.endswith(".bias"))
    # the official code decays the per-block RPB tables (spec pitfall 3) ...
    assert {"blocks.0.attn.relative_position_bias_table", "blocks.1.attn.relative_position_bias_table",
            "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"} <= decayed
    # ... and decay_rel_pos_bias=false excludes them as BEiT / timm do
    wd = wd_by_name(param_groups(model, OptimConfig(layer_decay=D, decay_rel_pos_bias=False), s))
    assert wd["blocks.0.attn.relative_position_bias_table"] == 0
    assert wd["blocks.0.attn.qkv.weight"] > 0


def test_swin_layer_ids_and_scales():
    s = swin_cfg()
    model = build_student(s, finetune=True)
    groups = param_groups(model, OptimConfig(layer_decay=D), s)
    scale = scales_by_name(groups)
    assert set(scale) == {n for n, _ in model.named_parameters()}
    G = s.num_blocks + 2
    assert G == 6

    def want_id(name: str) -> int:
        if name.startswith("patch_embed."):
            return 0
        if name.startswith("layers.0.blocks.0."):
            return 1
        if name.startswith("layers.0.blocks.1."):
            return 2
        if name.startswith("layers.1.downsample."):  # = official layers.0.downsample: with stage 0's last block
            return 2
        if name.startswith("layers.1.blocks.0."):
            return 3
        if name.startswith("layers.1.blocks.1."):
            return 4
        if name.startswith(("norm.", "head.")):
            return 5
        raise AssertionError(f"unexpected parameter {name}")

    assert any(n.startswith("layers.1.downsample.") for n in scale)  # the merge exists in timm's layout
    assert not any(n.startswith("layers.0.downsample.") for n in scale)
    for name, got in scale.items():
        assert layer_id(name, "swinv2", G, s.stages) == want_id(name), name
        assert got == pytest.approx(D ** (G - 1 - want_id(name))), name
    assert scale["layers.1.downsample.reduction.weight"] == scale["layers.0.blocks.1.attn.qkv.weight"]
    assert scale["head.fc.weight"] == 1.0 and scale["norm.weight"] == 1.0
    assert scale["patch_embed.proj.weight"] == pytest.approx(D ** 5)


def test_swin_downsample_mapping_deeper_model():
    # official: layers.s.downsample -> sum(depths[:s+1]); timm holds that merge as layers.{s+1}.downsample
    depths = [2, 2, 18, 2]
    G = sum(depths) + 2
    assert layer_id("layers.1.downsample.norm.weight", "swinv2", G, depths) == 2
    assert layer_id("layers.2.downsample.reduction.weight", "swinv2", G, depths) == 4
    assert layer_id("layers.3.downsample.reduction.weight", "swinv2", G, depths) == 22
    assert layer_id("layers.2.blocks.17.mlp.fc2.weight", "swinv2", G, depths) == 22
    assert layer_id("layers.3.blocks.1.attn.qkv.weight", "swinv2", G, depths) == 24
    assert layer_id("head.fc.weight", "swinv2", G, depths) == 25


def test_swin_no_weight_decay_rules():
    s = swin_cfg()
    model = build_student(s, finetune=True)
    wd = wd_by_name(param_groups(model, OptimConfig(layer_decay=D, weight_decay=0.05), s))
    params = dict(model.named_parameters())
    cpb = [n for n in params if "cpb_mlp" in n]
    assert any(params[n].ndim == 2 for n in cpb)  # 2-D, excluded by keyword, not by shape
    for n in cpb + [n for n in params if "logit_scale" in n]:
        assert wd[n] == 0, n
    assert all(wd[n] == 0 for n, p in params.items() if p.ndim <= 1 or n.endswith(".bias"))
    assert wd["layers.0.blocks.0.attn.qkv.weight"] == 0.05
    assert wd["layers.1.downsample.reduction.weight"] == 0.05
    assert wd["head.fc.weight"] == 0.05


def test_layer_decay_off_gives_one_scale():
    s = vit_cfg()
    model = build_student(s, finetune=True)
    groups = param_groups(model, OptimConfig(layer_decay=1.0), s)
    assert {g["lr_scale"] for g in groups} == {1.0}
    assert len(groups) == 2  # decay + no-decay


def test_frozen_parameters_are_left_out():
    s = vit_cfg()
    model = build_student(s, finetune=True)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head."))
    groups = param_groups(model, OptimConfig(layer_decay=D), s)
    assert sorted(n for g in groups for n in g["names"]) == ["head.bias", "head.weight"]
