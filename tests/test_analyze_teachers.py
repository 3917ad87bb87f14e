"""fdfast-analyze with ``--teacher-kind timm`` teachers, and on runs distilled from them (with their token rules)."""
from __future__ import annotations

import json

import pytest

import _timm_layouts as L
from conftest import tiny_dict
from fdfast.cli.analyze import main
from fdfast.config import config_from_dict
from fdfast.trainer import train


@pytest.mark.parametrize("key, prefix", [("dinov2_reg4", 5), ("dinov3", 5), ("siglip", 0), ("pe_core", 1),
                                         ("eva02_clip", 1)])
def test_analyze_reads_the_attention_of_every_teacher_family(tmp_path, key, prefix):
    name, source, img = L.tiny_source(key)
    folder = L.timm_folder(source, tmp_path / "teacher")
    out = tmp_path / "out"
    assert main(["--teacher", str(folder), "--teacher-kind", "timm", "--teacher-model", name, "--teacher-img-size",
                 str(img), "--synthetic", "--num-images", "2", "--batch-size", "2", "--no-landscape",
                 "--out", str(out), "-q"]) == 0
    models = json.loads((out / "attention_distance.json").read_text())["models"]
    layers = models["teacher-timm"]["layers"]
    assert len(layers) == 2 and all(len(lay["distance_px"]) == 2 for lay in layers)  # 2 blocks x 2 heads
    assert models["teacher-timm"]["mean"] == list(source.pretrained_cfg["mean"])
    diagonal = json.loads((out / "diagonality.json").read_text())["models"]["teacher-timm"]["layers"]
    assert all(0 <= v <= 1 for lay in diagonal for v in lay["locality"])
    assert source.num_prefix_tokens == prefix


@pytest.mark.parametrize("teacher, patch", [("vit_base_patch16_siglip_224", 8),  # no CLS: student CLS left out
                                            ("vit_base_patch14_reg4_dinov2", 7)])  # registers, 28 px input
def test_the_loss_landscape_of_a_run_uses_its_teachers_token_rules(tmp_path, teacher, patch):
    cfg = tiny_dict(tmp_path, model={"teacher": {"kind": "timm", "model": teacher, "model_kwargs": {
        "patch_size": patch, "embed_dim": 24, "depth": 1, "num_heads": 2}}}, train={"max_steps": 2})
    train(config_from_dict(cfg))
    out = tmp_path / "out"
    assert main([str(tmp_path / "run"), "--synthetic", "--num-images", "2", "--batch-size", "2", "--grid", "3",
                 "--line-points", "3", "--out", str(out), "-q"]) == 0
    land = json.loads((out / "landscape.json").read_text())["models"]["run"]
    assert land["loss"] == "fd" and 0 < land["center"] < 10
    models = json.loads((out / "attention_distance.json").read_text())["models"]
    assert models["run-teacher"]["img_size"] == 4 * patch  # the run's resolved teacher input
