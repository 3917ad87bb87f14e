"""The BEiT-style students at the sizes the configs name: ViT-Ti/16 and ViT-S/16 at their real widths and heads
(two blocks instead of twelve, to stay fast on a CPU: distilled for two steps, exported, fine-tuned, exported)
and all three of ViT-Ti/16, ViT-S/16 and ViT-L/16 at full depth on the meta device (layer decay, export recipe).

The student config takes embed_dim / depth / num_heads directly; these tests hold the pieces that depend on
them (FD's init with its per-depth rescaling, the shared relative position bias with one column per head,
layer scale, layer-wise LR decay over depth + 2 groups, the timm export's rebuild) to every size.
"""
from __future__ import annotations

import pytest
import timm
import torch

from conftest import tiny_dict
from fdfast.config import OptimConfig, StudentConfig, config_from_dict
from fdfast.interop.export import _check_rebuild, default_timm_model_name, export_checkpoint
from fdfast.models.student import build_student, timm_kwargs
from fdfast.optim import param_groups
from fdfast.trainer import train

SIZES = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_large": (1024, 24, 16)}


@pytest.mark.parametrize("size", ["vit_tiny", "vit_small"])
def test_small_students_distil_export_and_finetune(tmp_path, image_folder, size):
    dim, _, heads = SIZES[size]
    depth = 2
    student = {"img_size": 32, "patch_size": 16, "embed_dim": dim, "depth": depth, "num_heads": heads}
    teacher = {"model_kwargs": {"patch_size": 16, "embed_dim": 48, "depth": 1, "num_heads": 2}}
    train(config_from_dict(tiny_dict(tmp_path, model={"student": student, "teacher": teacher},
                                     train={"max_steps": 2})))
    run = tmp_path / "run"
    weights = export_checkpoint(run, "timm", tmp_path / "timm")
    net = timm.create_model(f"local-dir:{weights.parent}", pretrained=True).eval()
    assert len(net.blocks) == depth and net.rel_pos_bias.relative_position_bias_table.shape[1] == heads
    assert net.blocks[0].gamma_1.shape == (dim,)  # layer scale
    out = net.forward_features(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 5, dim) and torch.isfinite(out).all()
    ft = dict(tiny_dict(tmp_path / "ft", model={"student": {**student, "num_classes": 4}, "pretrained": str(run)},
                        data={"backend": "torchvision", "train": str(image_folder), "val": str(image_folder),
                              "num_classes": 4, "eval_resize": 36},
                        optim={"layer_decay": 0.75}, train={"task": "finetune", "max_steps": 2},
                        augment={"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1}))
    ft["model"].pop("teacher")
    summary = train(config_from_dict(ft))
    assert summary is not None
    weights = export_checkpoint(tmp_path / "ft" / "run", "timm", tmp_path / "timm_ft")
    net = timm.create_model(f"local-dir:{weights.parent}", pretrained=True)
    assert net.num_classes == 4 and len(net.blocks) == depth


@pytest.mark.parametrize("size", sorted(SIZES))
def test_full_depth_layer_decay_and_export_recipe(size):
    dim, depth, heads = SIZES[size]
    cfg = StudentConfig(img_size=224, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads, num_classes=1000)
    with torch.device("meta"):
        model = build_student(cfg, finetune=True, fd_init=False)
    groups = param_groups(model, OptimConfig(layer_decay=0.75), cfg)
    scales = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert len({g["lr_scale"] for g in groups}) == depth + 2  # patch embed + blocks + head
    assert scales["patch_embed.proj.weight"] == pytest.approx(0.75 ** (depth + 1))
    assert scales[f"blocks.{depth - 1}.mlp.fc2.weight"] == pytest.approx(0.75)
    assert scales["head.weight"] == 1.0
    args = timm_kwargs(cfg, finetune=True)
    name = default_timm_model_name("beit", args)
    assert name == ("beit_large_patch16_224" if size == "vit_large" else "beit_base_patch16_224")
    _check_rebuild(name, args, model.state_dict())  # the export's recipe rebuilds exactly these tensors
