"""fdfast.interop: reading every checkpoint layout, converting for fine-tuning, loud loading, export.

Tiny timm models (Beit 32 px / patch 8 / width 32 / depth 2; SwinV2 32 px / patch 2 / width 16 / 2 stages /
window 4) with every parameter perturbed, so zero-initialised parts (relative position tables, q/v biases)
matter and a wrong mapping changes the outputs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import types
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from fdfast import checkpoint as ckpt
from fdfast.config import StudentConfig, config_from_dict, to_dict
from fdfast.interop import conversion as C
from fdfast.interop import export as E
from fdfast.interop import loading as L
from fdfast.interop import reading as R
from fdfast.models.student import DistillModel, build_student, timm_kwargs

BEIT = dict(arch="beit", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
SWIN = dict(arch="swinv2", img_size=32, patch_size=2, embed_dim=16, depth=[2, 2], num_heads=[2, 4], window_size=4)


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (1.0 if "relative_position_bias_table" in name else 0.1))
    return model.eval()


def build(fields, num_classes=0, finetune=False):
    """The trainer's student for a ``model.student`` section, with timm's init (SwinV2 has the same layout in
    both stages, with a head when ``num_classes`` > 0)."""
    cfg = StudentConfig(**fields, drop_path=0.0, num_classes=num_classes)
    return build_student(cfg, finetune=finetune or fields["arch"] == "swinv2", fd_init=False)


def kwargs(fields, num_classes=0, finetune=False):
    return timm_kwargs(StudentConfig(**fields, drop_path=0.0, num_classes=num_classes), finetune=finetune)


def save_distill_checkpoint(run: Path, step: int, model: DistillModel, fields=BEIT) -> Path:
    """A distillation checkpoint as the trainer writes it: state['model'] = DistillModel.state_dict()."""
    cfg = config_from_dict({"model": {"student": fields, "teacher": {"kind": "esvit"} if fields["arch"] == "swinv2"
                                      else {}}})
    return ckpt.save_checkpoint(run, step, {"model": model.state_dict(), "optimizer": {}, "step": step,
                                            "config": to_dict(cfg)}, keep=3)


def beit(seed=0, finetune=False, num_classes=0, **over):
    return perturbed(build({**BEIT, **over}, num_classes, finetune), seed)


def swin(seed=0, num_classes=0, **over):
    return perturbed(build({**SWIN, **over}, num_classes), seed)


def images(size=32, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(123))


def params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------
# ViT: shared relative position bias -> per-block tables
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_shared_rpb_to_per_block_keeps_the_network_output(tmp_path):
    distill = beit()
    path = E.export_official(distill, nn.Linear(32, 48), tmp_path / "fd.pth")
    ft = beit(seed=1, finetune=True, num_classes=5)
    report = L.load_student_weights(ft, path)

    shared = distill.rel_pos_bias.relative_position_bias_table
    for blk in ft.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, shared)
    assert report.layout == L.LAYOUT_OFFICIAL
    assert sorted(report.missing) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    assert {"norm.weight", "norm.bias", "rel_pos_bias.relative_position_bias_table"} <= set(report.dropped)

    # the fine-tune model has no final norm (it pools into fc_norm): apply the distilled norm to its tokens
    x = images()
    want = distill.forward_features(x)
    got = F.layer_norm(ft.forward_features(x), (32,), distill.norm.weight, distill.norm.bias, eps=1e-6)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # not vacuous: the bias matters to the output
    for blk in ft.blocks:
        blk.attn.relative_position_bias_table.zero_()
    off = F.layer_norm(ft.forward_features(x), (32,), distill.norm.weight, distill.norm.bias, eps=1e-6)
    assert (off - want).abs().max() > 1e-2


@torch.no_grad()
def test_grid_change_resizes_tables_keeping_the_cls_rows(tmp_path):
    distill = beit()
    src = distill.rel_pos_bias.relative_position_bias_table.clone()  # (2*4-1)^2 + 3 = 52 rows
    ft = beit(seed=1, finetune=True, num_classes=5, img_size=48)  # 6x6 patches
    report = L.load_converted_state_dict(ft, distill.state_dict(), source="mem")

    assert report.resized == {"blocks.*.attn.relative_position_bias_table": ((52, 2), (11 * 11 + 3, 2))}
    for blk in ft.blocks:
        t = blk.attn.relative_position_bias_table
        assert t.shape == (11 * 11 + 3, 2)
        assert torch.equal(t[-3:], src[-3:])  # cls->token, token->cls, cls->cls are not spatial
        # relative offset (0, 0) sits at the centre of both grids and is interpolated exactly
        assert torch.allclose(t[5 * 11 + 5], src[3 * 7 + 3], atol=1e-5)
        # the corners (largest offsets) map onto the corners
        assert torch.allclose(t[0], src[0], atol=1e-5) and torch.allclose(t[120], src[48], atol=1e-5)
    assert ft(images(48)).shape == (2, 5)


@torch.no_grad()
def test_pos_embed_is_resampled_when_present():
    src = timm.models.beit.Beit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                                use_abs_pos_emb=True, global_pool="")
    dst = timm.models.beit.Beit(img_size=48, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0,
                                use_abs_pos_emb=True, global_pool="")
    src.pos_embed.normal_()
    report = L.load_converted_state_dict(dst, src.state_dict(), source="mem")
    assert report.resized["pos_embed"] == ((1, 17, 32), (1, 37, 32))
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # CLS position is not interpolated


# ----------------------------------------------------------------------------------------------
# Official layout: export -> read -> convert -> identical network
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_official_vit_file_roundtrip(tmp_path):
    distill, proj = beit(), nn.Linear(32, 48)
    path = E.export_official(distill, proj, tmp_path / "fd.pth")
    raw = torch.load(path, weights_only=True)["model"]
    assert all(k.startswith(("encoder.", "decoder.")) for k in raw)
    assert raw["decoder.0.weight"].shape == (48, 32, 1) and torch.equal(raw["decoder.0.weight"][..., 0], proj.weight)
    assert torch.equal(raw["decoder.0.bias"], proj.bias)
    # the index the official module stores: 4x4 patches + CLS -> [17, 17], CLS rows use the last 3 entries
    idx = raw["encoder.rel_pos_bias.relative_position_index"]
    assert idx.shape == (17, 17) and idx[0, 0] == 51 and idx[0, 1] == 49 and idx[1, 0] == 50

    sd, layout = L.read_student_state_dict(path)
    assert layout == L.LAYOUT_OFFICIAL and "decoder.0.weight" not in sd and "norm.weight" in sd
    again = beit(seed=7)
    report = L.load_student_weights(again, path, expected_missing=())
    assert report.missing == []
    x = images()
    assert torch.equal(again.forward_features(x), distill.forward_features(x))


@torch.no_grad()
def test_official_swin_layout_roundtrip(tmp_path):
    student, proj = swin(), nn.Linear(32, 64)
    path = E.export_official(student, proj, tmp_path / "fd_swin.pth")
    raw = torch.load(path, weights_only=True)["model"]
    # official names: PatchMerging ends stage 0, rpe_mlp, no buffers
    assert "encoder.layers.0.downsample.reduction.weight" in raw
    assert not any(k.startswith("encoder.layers.1.downsample") for k in raw)
    assert "encoder.layers.1.blocks.0.attn.rpe_mlp.2.weight" in raw
    assert not any("cpb_mlp" in k or "attn_mask" in k or "relative_coords_table" in k for k in raw)
    assert torch.equal(raw["encoder.layers.0.downsample.reduction.weight"], student.layers[1].downsample.reduction.weight)

    # back through timm's own checkpoint_filter_fn (an independent check of the exporter's mapping)
    fresh = swin(seed=5)
    report = L.load_student_weights(fresh, path, expected_missing=())
    assert report.layout == L.LAYOUT_OFFICIAL and report.missing == []
    x = images()
    assert torch.equal(fresh.forward_features(x), student.forward_features(x))
    # and into the fine-tune model: only the new head starts fresh
    ft = swin(seed=6, num_classes=5)
    assert sorted(L.load_student_weights(ft, path).missing) == ["head.fc.bias", "head.fc.weight"]
    assert torch.equal(ft.forward_features(x), student.forward_features(x))


@torch.no_grad()
def test_shared_cpb_variant_is_copied_into_every_block():
    student = swin()
    sd = {k.replace(".cpb_mlp.", ".rpe_mlp."): v for k, v in student.state_dict().items()}
    shared = {}
    for s, stage in enumerate(student.layers):  # give each stage one shared MLP, as the variant does
        for part in ("0.weight", "0.bias", "2.weight"):
            shared[f"layers.{s}.rel_pos_bias.rpe_mlp.{part}"] = torch.randn_like(sd[f"layers.{s}.blocks.0.attn.rpe_mlp.{part}"])
            for b in range(len(stage.blocks)):
                del sd[f"layers.{s}.blocks.{b}.attn.rpe_mlp.{part}"]
    sd.update(shared)
    fresh = swin(seed=3)
    L.load_converted_state_dict(fresh, sd, source="mem", expected_missing=())
    for s, stage in enumerate(fresh.layers):
        for blk in stage.blocks:
            assert torch.equal(blk.attn.cpb_mlp[0].weight, shared[f"layers.{s}.rel_pos_bias.rpe_mlp.0.weight"])


# ----------------------------------------------------------------------------------------------
# Reading: layouts, pickles
# ----------------------------------------------------------------------------------------------
def _fake_yacs() -> type:
    """A byte-compatible stand-in for yacs.config.CfgNode (same module/class name, same __dict__ fields)."""
    class CfgNode(dict):
        def __init__(self, init=None):
            init = dict(init or {})
            for k, v in init.items():
                if type(v) is dict:
                    init[k] = CfgNode(v)
            super().__init__(init)
            self.__dict__["__immutable__"] = False
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {"EXAMPLE.RENAMED.KEY": ("EXAMPLE.KEY", "note")}
            self.__dict__["__new_allowed__"] = False

        def __getattr__(self, name):
            if name in self:
                return self[name]
            raise AttributeError(name)

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    return CfgNode


def _write_official_like(path: Path, student: nn.Module, monkeypatch) -> None:
    """What main_fd.py saves: model (encoder + decoder + teacher), optimizer, scheduler, yacs config."""
    pkg, mod = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    mod.CfgNode = _fake_yacs()
    pkg.config = mod
    monkeypatch.setitem(sys.modules, "yacs", pkg)
    monkeypatch.setitem(sys.modules, "yacs.config", mod)
    model = {f"encoder.{k}": v for k, v in student.state_dict().items()}
    model["encoder.rel_pos_bias.relative_position_index"] = student.rel_pos_bias.relative_position_index
    model["decoder.0.weight"] = torch.randn(48, 32, 1)
    model["decoder.0.bias"] = torch.randn(48)
    model["feature_model.visual.proj"] = torch.randn(32, 16)
    cfg = mod.CfgNode({"MODEL": {"TYPE": "vit", "VIT": {"DEPTH": 2}}, "DATA": {"IMG_SIZE": 32}})
    torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {},
                "scaler": {"scale": 65536.0}, "max_accuracy": 0.0, "epoch": 4, "config": cfg}, path)
    monkeypatch.delitem(sys.modules, "yacs")  # as on a machine without yacs
    monkeypatch.delitem(sys.modules, "yacs.config")


@torch.no_grad()
def test_official_file_with_pickled_yacs_config_loads_without_yacs(tmp_path, monkeypatch):
    student = beit()
    path = tmp_path / "ckpt_epoch_4.pth"
    _write_official_like(path, student, monkeypatch)
    with pytest.raises(Exception):  # the plain safe load cannot read it: this is the case we handle
        torch.load(path, weights_only=True)

    obj = R.load_torch_file(path)
    assert obj["config"]["MODEL"]["VIT"]["DEPTH"] == 2  # kept as plain data (an OrderedDict)
    assert type(obj["config"]).__name__ == "OrderedDict"
    sd, layout = L.read_student_state_dict(path)
    assert layout == L.LAYOUT_OFFICIAL
    assert set(sd) == set(student.state_dict()) | {"rel_pos_bias.relative_position_index"}
    ft = beit(seed=2, finetune=True, num_classes=3)
    L.load_student_weights(ft, path)
    assert torch.equal(ft.blocks[1].attn.relative_position_bias_table, student.rel_pos_bias.relative_position_bias_table)


_SIDE_EFFECTS: list = []


def _side_effect(tag):
    _SIDE_EFFECTS.append(tag)
    return tag


class _Payload:
    def __reduce__(self):
        return (_side_effect, ("ran",))


def test_arbitrary_pickles_are_refused_unless_trusted(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": beit().state_dict(), "extra": _Payload()}, path)
    _SIDE_EFFECTS.clear()
    with pytest.raises(R.CheckpointReadError) as e:
        L.read_student_state_dict(path)
    msg = str(e.value)
    assert str(path) in msg and "_side_effect" in msg and "trust_pickle=True" in msg
    assert _SIDE_EFFECTS == []  # refused before anything ran

    sd, _ = L.read_student_state_dict(path, trust_pickle=True)
    assert _SIDE_EFFECTS == ["ran"] and "blocks.0.attn.qkv.weight" in sd


@torch.no_grad()
def test_reads_every_layout(tmp_path):
    student = beit()
    sd = student.state_dict()
    ref = set(sd)
    # fdfast training checkpoint as the trainer writes it (DistillModel: encoder.* + decoder.*): file and step folder
    model = DistillModel(StudentConfig(**BEIT), 8)
    model.encoder.load_state_dict(sd)
    lin = model.decoder
    step = save_distill_checkpoint(tmp_path / "run", 10, model)
    for p in (step, step / "state.pt"):
        got, layout = L.read_student_state_dict(p)
        assert layout == L.LAYOUT_FDFAST and set(got) == ref
    ck = L.read_fdfast_checkpoint(step)
    assert ck.step == 10 and ck.projector["weight"].shape == (8, 32)
    assert {k: ck.config["model"]["student"][k] for k in BEIT} == BEIT and ck.task == "distill"
    assert set(ck.student) == ref and torch.equal(ck.projector["weight"], lin.weight)
    assert torch.equal(ck.student["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])

    # timm safetensors, DDP/compile prefixes, 'state_dict' wrapper, EsViT 'student' with a Namespace
    save_file({f"_orig_mod.{k}": v for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "w.pth")
    torch.save({"student": {f"module.{k}": v for k, v in sd.items()}, "args": argparse.Namespace(arch="x"),
                "epoch": 3}, tmp_path / "esvit.pth")
    torch.save({"model": {f"module.encoder.{k}": v for k, v in sd.items()}}, tmp_path / "ddp_fd.pth")
    expected = {"w.safetensors": L.LAYOUT_SAFETENSORS, "w.pth": L.LAYOUT_STATE_DICT,
                "esvit.pth": L.LAYOUT_STUDENT_KEY, "ddp_fd.pth": L.LAYOUT_OFFICIAL}
    for name, want in expected.items():
        got, layout = L.read_student_state_dict(tmp_path / name)
        assert (layout, set(got)) == (want, ref), name
        assert torch.equal(got["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])


def test_run_folder_resolves_to_the_newest_complete_checkpoint(tmp_path):
    model = DistillModel(StudentConfig(**BEIT), 8)
    for step in (5, 10):
        save_distill_checkpoint(tmp_path, step, model)
    (tmp_path / "checkpoints" / "step_00000015").mkdir()  # a crashed save: no state.pt / meta.json
    assert L.resolve_checkpoint_file(tmp_path) == tmp_path / "checkpoints" / "step_00000010" / "state.pt"
    assert L.read_fdfast_checkpoint(tmp_path).step == 10


def test_unreadable_inputs_fail_with_the_path(tmp_path):
    with pytest.raises(R.CheckpointReadError, match="no such file"):
        L.read_student_state_dict(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(R.CheckpointReadError, match="junk.pth: not a readable PyTorch checkpoint"):
        L.read_student_state_dict(tmp_path / "junk.pth")
    torch.save({"model": {"a": 1}}, tmp_path / "nottensors.pth")
    with pytest.raises(R.CheckpointReadError, match="non-tensor"):
        L.read_student_state_dict(tmp_path / "nottensors.pth")
    with pytest.raises(R.CheckpointReadError, match="holds no state.pt"):
        L.read_student_state_dict(tmp_path)
    torch.save(beit().state_dict(), tmp_path / "plain.pth")
    with pytest.raises(R.CheckpointReadError, match="not an fdfast training checkpoint"):
        L.read_fdfast_checkpoint(tmp_path / "plain.pth")


# ----------------------------------------------------------------------------------------------
# Loud loading
# ----------------------------------------------------------------------------------------------
def test_unexpected_and_missing_keys_fail_loudly_and_leave_the_model_alone(tmp_path):
    sd = beit().state_dict()
    sd["extra_head.weight"] = torch.zeros(3)
    sd["blocks.0.attn.k_bias"] = torch.zeros(32)
    del sd["blocks.1.mlp.fc1.weight"]
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    model = beit(seed=9)
    before = params(model)
    with pytest.raises(C.CheckpointKeyError) as e:
        L.load_student_weights(model, path)
    msg = str(e.value)
    assert str(path) in msg
    for key in ("extra_head.weight", "blocks.0.attn.k_bias", "blocks.1.mlp.fc1.weight"):
        assert key in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_prefix_and_depth_hints(tmp_path):
    sd = beit().state_dict()
    save_file({f"backbone.{k}": v for k, v in sd.items()}, str(tmp_path / "prefixed.safetensors"))
    with pytest.raises(C.CheckpointKeyError, match="without the prefix 'backbone.'"):
        L.load_student_weights(beit(), tmp_path / "prefixed.safetensors")
    deeper = beit(depth=3).state_dict()
    save_file(deeper, str(tmp_path / "deep.safetensors"))
    with pytest.raises(C.CheckpointKeyError, match=r"blocks: file 3 vs model 2") as e:
        L.load_student_weights(beit(), tmp_path / "deep.safetensors")
    assert "blocks.2.attn.qkv.weight" in str(e.value)


def test_wrong_arch_fails_with_both_shapes(tmp_path):
    wide = build({**BEIT, "embed_dim": 48, "num_heads": 3})
    path = E.export_official(wide, None, tmp_path / "wide.pth")
    with pytest.raises(C.CheckpointShapeError) as e:
        L.load_student_weights(beit(finetune=True, num_classes=5), path)
    msg = str(e.value)
    assert str(path) in msg and "patch_embed.proj.weight: file (48, 3, 8, 8) vs model (32, 3, 8, 8)" in msg
    assert "cls_token: file (1, 1, 48) vs model (1, 1, 32)" in msg
    assert "35 tensor(s) differ in shape" in msg and "... and 23 more" in msg  # long lists are cut

    other_patch = build({**SWIN, "patch_size": 4, "img_size": 64})
    path = E.export_official(other_patch, None, tmp_path / "swin4.pth")
    with pytest.raises(C.CheckpointShapeError, match=r"patch_embed.proj.weight: file \(16, 3, 4, 4\)"):
        L.load_student_weights(swin(), path)


@torch.no_grad()
def test_a_head_of_another_task_starts_fresh(tmp_path):
    src = beit(finetune=True, num_classes=7)
    save_file(src.state_dict(), str(tmp_path / "ft7.safetensors"))
    dst = beit(seed=4, finetune=True, num_classes=5)
    head_before = dst.head.weight.clone()
    report = L.load_student_weights(dst, tmp_path / "ft7.safetensors")
    assert set(report.dropped) == {"head.weight", "head.bias"} and report.missing == ["head.weight", "head.bias"]
    assert torch.equal(dst.head.weight, head_before) and torch.equal(dst.fc_norm.weight, src.fc_norm.weight)
    with pytest.raises(C.CheckpointShapeError):  # an exact load does not tolerate it
        L.load_student_weights(dst, tmp_path / "ft7.safetensors", expected_missing=())


@pytest.mark.parametrize("fields,num_classes,finetune", [(BEIT, 0, False), (BEIT, 5, True), (SWIN, 4, True)])
def test_timm_kwargs_rebuild_the_trainers_student(fields, num_classes, finetune):
    """The kwargs the export records are the ones build_student uses: timm.create_model with them (after a JSON
    round trip, as config.json stores them) builds the same network with the same init."""
    cfg = StudentConfig(**fields, drop_path=0.0, num_classes=num_classes)
    torch.manual_seed(0)
    built = build_student(cfg, finetune=finetune, fd_init=False)
    args = json.loads(json.dumps(timm_kwargs(cfg, finetune=finetune)))
    torch.manual_seed(0)
    reference = timm.create_model(E.default_timm_model_name(fields["arch"], args), **args)
    a, b = built.state_dict(), reference.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert built.num_classes == num_classes
    if fields["arch"] == "beit":  # FD's LayerNorm eps, without passing a norm_layer that JSON cannot hold
        assert {m.eps for m in built.modules() if isinstance(m, nn.LayerNorm)} == {1e-6}


# ----------------------------------------------------------------------------------------------
# timm export
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def test_export_timm_loads_back_three_ways(tmp_path):
    distill = beit()
    args = kwargs(BEIT)
    compiled = torch.compile(distill)  # wrapper only (never called): its keys carry '_orig_mod.'
    weights = E.export_timm(compiled, tmp_path / "fd_vit", model_args=args)
    assert weights == tmp_path / "fd_vit" / "model.safetensors"
    assert sorted(os.listdir(tmp_path / "fd_vit")) == ["config.json", "model.safetensors"]  # no temp files left

    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in f.keys())
    assert meta["timm_model_name"] == "beit_base_patch16_224" and json.loads(meta["timm_model_args"]) == args
    assert json.loads(meta["pretrained_cfg"])["input_size"] == [3, 32, 32]
    cfg = json.loads((tmp_path / "fd_vit" / "config.json").read_text())
    assert cfg["architecture"] == "beit_base_patch16_224" and cfg["model_args"] == args
    assert cfg["num_classes"] == 0 and cfg["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]

    x = images()
    want = distill.forward_features(x)
    loaded = [
        timm.create_model(f"local-dir:{tmp_path / 'fd_vit'}", pretrained=True),
        timm.create_model("beit_base_patch16_224", checkpoint_path=str(weights), **args),
        timm.create_model("beit_base_patch16_224", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)),
                          **args),
    ]
    for m in loaded:
        assert torch.equal(m.eval().forward_features(x), want)


@torch.no_grad()
def test_export_timm_finetuned_and_swin_logits(tmp_path):
    ft = beit(finetune=True, num_classes=5)
    args = kwargs(BEIT, num_classes=5, finetune=True)
    w = E.export_timm(ft, tmp_path / "ft.safetensors", model_args=args)
    assert (tmp_path / "config.json").is_file()
    rebuilt = timm.models.beit.Beit(**args)
    timm.models.load_checkpoint(rebuilt, str(w))
    x = images()
    assert torch.equal(rebuilt.eval()(x), ft(x))

    s = swin(num_classes=4)  # model_args inferred from the module
    w = E.export_timm(s, tmp_path / "swin")
    cfg = json.loads((tmp_path / "swin" / "config.json").read_text())
    assert cfg["model_args"]["window_size"] == 4 and cfg["pretrained_cfg"]["classifier"] == "head.fc"
    m = timm.create_model(f"local-dir:{tmp_path / 'swin'}", pretrained=True).eval()
    assert torch.equal(m(x), s(x))


@torch.no_grad()
def test_registered_timm_name_roundtrip(tmp_path):
    # beit_base_patch16_224 with its registered defaults (width 768, per-block tables, fc_norm, 1000-class
    # head) apart from depth, which is cut to 2 blocks to keep the CPU test short
    model = timm.create_model("beit_base_patch16_224", depth=2).eval()
    w = E.export_timm(model, tmp_path / "b16", "beit_base_patch16_224", model_args={"depth": 2})
    again = timm.create_model("beit_base_patch16_224", checkpoint_path=str(w), depth=2).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again(x), model(x))


def test_export_refuses_args_that_do_not_rebuild_it(tmp_path):
    args = kwargs(BEIT)
    with pytest.raises(ValueError, match="relative_position_bias_table"):
        E.export_timm(beit(), tmp_path / "x", model_args={**args, "use_shared_rel_pos_bias": False,
                                                          "use_rel_pos_bias": True})
    assert not (tmp_path / "x").exists()


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = tmp_path / "fd.pth"
    target.write_bytes(b"old")

    def broken_save(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        E.export_official(beit(), None, target)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["fd.pth"]


def test_official_export_refuses_a_classifier():
    with pytest.raises(ValueError, match="5-class head"):
        E.official_state_dict(beit(finetune=True, num_classes=5))
