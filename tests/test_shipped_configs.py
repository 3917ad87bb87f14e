"""Every shipped distillation config, and every fine-tune config after it, runs two steps on the CPU.

The configs keep everything but the sizes: tiny widths and depths (student and teacher, with the same patch-size
ratio, so a patch-14 teacher under a patch-16 student still needs its input resized), ``weights: random``,
synthetic or generated images. The fine-tune configs start from the distillation run they name (their
``model.pretrained`` points at that config's run folder), so the chain distil -> fine-tune is exercised for
every student the configs ship (ViT-B/16, ViT-S/16, ViT-L/14, SwinV2-B).
"""
from __future__ import annotations

import json

import pytest
import timm
import torch

from fdfast.config import load_config
from fdfast.config.load import list_configs
from fdfast.distributed import DistInfo
from fdfast.trainer import train

PRETRAIN = sorted(n for n, _ in list_configs() if n.startswith("fd_"))
FINETUNE = sorted(n for n, _ in list_configs() if not n.startswith(("fd_", "pretrain/", "finetune/")))


def _student(cfg):
    s = cfg.model.student
    if s.arch == "swinv2":  # 32 px, patch 2, two stages: an 8x8 output grid
        return ["model.student.img_size=32", "model.student.patch_size=2", "model.student.embed_dim=16",
                "model.student.depth=[1, 1]", "model.student.num_heads=[1, 2]", "model.student.window_size=4"]
    patch = s.patch_size // 2
    return [f"model.student.img_size={4 * patch}", f"model.student.patch_size={patch}", "model.student.embed_dim=32",
            "model.student.depth=2", "model.student.num_heads=2"]


def _teacher(cfg):
    out = []
    for t in cfg.model.teacher_configs:  # model.teacher, or each entry of model.teachers (by name)
        with torch.device("meta"):  # the configured teacher's patch size, halved below with the student's
            probe = timm.create_model(t.model, pretrained=False, num_classes=0, **t.model_kwargs)
        patch = int(probe.patch_embed.patch_size[0])
        if t.kind == "esvit":
            kwargs = "{patch_size: 2, embed_dim: 16, depths: [1, 1], num_heads: [1, 2], window_size: 4}"
        else:
            kwargs = f"{{patch_size: {patch // 2}, embed_dim: 32, depth: 1, num_heads: 2}}"
        out += [f"{t.key}.weights=random", f"{t.key}.img_size=null", f"{t.key}.model_kwargs={kwargs}"]
    return out


COMMON = ["data.num_workers=0", "train.max_steps=2", "compile.enabled=false", "log.progress=none",
          "log.every=1", "checkpoint.every=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Distillation runs by config name, each trained on first use."""
    root, done = tmp_path_factory.mktemp("runs"), {}

    def run(name):
        if name not in done:
            cfg = load_config(name)
            out = root / name
            cfg = load_config(name, [*COMMON, *_student(cfg), *_teacher(cfg), "data.backend=synthetic",
                                     "data.synthetic_size=8", "train.batch_size=4", "compile.cuda_graph_teacher=false",
                                     f"train.output_dir={out}"])
            torch.manual_seed(0)
            summary = train(cfg, DistInfo())
            done[name] = (out, summary)
        return done[name]
    return run


def _losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and "top1" not in r]  # training steps, not evaluations


@pytest.mark.parametrize("name", PRETRAIN)
def test_distillation_config_runs_two_steps(runs, name):
    out, _ = runs(name)
    losses = _losses(out)
    assert len(losses) == 2 and all(0 < v < 10 for v in losses), losses
    teachers = load_config(name).model.teachers
    if teachers:  # several teachers: each one's loss beside the total
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(0 < r[f"loss_{t.name}"] < 10 for r in records if "loss" in r for t in teachers)


@pytest.mark.parametrize("name", FINETUNE)
def test_finetune_config_runs_two_steps_from_its_distillation_run(runs, image_folder, tmp_path, name):
    cfg = load_config(name)
    source = cfg.model.pretrained.split("/")[-1]
    assert source in PRETRAIN, f"{name}: model.pretrained={cfg.model.pretrained!r} names no shipped distillation"
    pretrained, _ = runs(source)
    src_cfg = load_config(source)
    s_over = _student(src_cfg)
    img = int(s_over[0].split("=")[1])
    cfg = load_config(name, [*COMMON, *s_over, "model.student.num_classes=4", f"model.pretrained={pretrained}",
                             "data.backend=torchvision", f"data.train={image_folder}", f"data.val={image_folder}",
                             "data.num_classes=4", f"data.eval_resize={img + img // 8}", "train.batch_size=8",
                             f"train.output_dir={tmp_path / 'ft'}"])
    train(cfg, DistInfo())
    losses = _losses(tmp_path / "ft")
    assert len(losses) == 2 and all(0 < v < 10 for v in losses), losses
