"""bench/: the analytic FLOP count (against torch's FlopCounterMode and design.md's 141 GFLOP/img),
the benchmark's modes on CPU with tiny models (JSON keys, no timing assertions), the device script's
dry run and summary."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch.utils.flop_counter import FlopCounterMode

from bench import throughput
from bench.flops import model_count, spec_peak_tflops, vit_pair_flops
from fdfast.config import StudentConfig
from fdfast.models.attention import set_attention_kernel
from fdfast.models.student import DistillModel

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def test_vit_b16_pair_is_141_gflop():
    f = vit_pair_flops(224)
    assert f["total"] / 1e9 == pytest.approx(141, abs=2)
    assert (f["student_fwd_bwd"] + f["projector_fwd_bwd"]) / 1e9 == pytest.approx(106, abs=1)
    assert f["teacher_fwd"] / 1e9 == pytest.approx(35, abs=0.5)
    assert f["total"] == pytest.approx(f["student_fwd_bwd"] + f["projector_fwd_bwd"] + f["teacher_fwd"])
    # L/14 student at 224 with an L/14 teacher: 257 tokens, ~4.4x B/16
    big = vit_pair_flops(224, student=(14, 1024, 24), teacher=(14, 1024, 24))
    assert 4.0 < big["total"] / f["total"] < 4.8


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def test_analytic_count_equals_flop_counter():
    """The formulas against torch's operator-level count on real (tiny) models, forward and fwd+bwd."""
    x = torch.randn(1, 3, 32, 32)
    student = DistillModel(StudentConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                                         drop_path=0.0), 32)
    set_attention_kernel(student.encoder, "eager")  # explicit matmuls, counted one by one
    c = model_count(student.encoder)
    assert _flops(lambda: student.encoder.forward_features(x)) == c.fwd
    assert _flops(lambda: student.encoder.forward_features(x).sum().backward()) == c.fwd_bwd
    teacher = timm.create_model("vit_base_patch16_clip_quickgelu_224", num_classes=0, img_size=32, patch_size=8,
                                embed_dim=32, depth=2, num_heads=2)
    for m in teacher.modules():  # explicit matmuls: the counter has no formula for the CPU SDPA kernel
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    assert _flops(lambda: teacher.forward_features(x)) == model_count(teacher).fwd
    x64 = torch.randn(1, 3, 64, 64)
    swin2 = SwinTransformerV2(img_size=64, patch_size=4, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4),
                              window_size=4, num_classes=0)
    c2 = model_count(swin2)
    assert _flops(lambda: swin2.forward_features(x64)) == c2.fwd
    assert _flops(lambda: swin2.forward_features(x64).sum().backward()) == c2.fwd_bwd
    swin1 = timm.create_model("swin_base_patch4_window7_224", num_classes=0, img_size=64, window_size=4, embed_dim=16,
                              depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4))
    assert _flops(lambda: swin1.forward_features(x64)) == model_count(swin1).fwd


def test_spec_peak_lookup():
    assert spec_peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert spec_peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert spec_peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert spec_peak_tflops("Some CPU") is None


TINY = ["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--set", "train.compile=false"]


def test_step_mode_with_baseline_writes_json(tmp_path):
    out = tmp_path / "step.json"
    data = throughput.main(["--mode", "step", "--baseline", *TINY, "--variant", "fast",
                            "--variant", "eager-blocks:train.compile_scope=blocks,train.channels_last=false",
                            "--json", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk["results"] == json.loads(json.dumps(data["results"], default=str))
    for key in ("env", "flops_per_img", "peak_tflops", "ratios", "results", "notes", "student", "teacher"):
        assert key in on_disk, key
    names = [r["name"] for r in on_disk["results"]]
    assert names == ["official", "fast", "eager-blocks"]
    for r in on_disk["results"]:
        assert r["ok"], r.get("traceback")
        for key in ("img_per_s", "step_ms", "wall_ms_per_step", "loss_first", "loss_last", "mfu_spec", "peak_mem_gib"):
            assert key in r, key
        assert set(r["step_ms"]) >= {"median", "p10", "p90"}
    # same seed, same data: the official-style and fast steps start from the same loss (fp32 on CPU)
    assert on_disk["results"][1]["loss_first"] == pytest.approx(on_disk["results"][0]["loss_first"], rel=1e-4)
    assert on_disk["results"][2]["switches"]["channels_last"] is False  # a fast switch not (yet) in the schema works
    assert set(on_disk["ratios"]) == {"fast/official", "eager-blocks/official"}
    assert on_disk["flops_per_img"]["total"] > 0
    assert any("fp32" in n for n in on_disk["results"][0]["notes"])  # the CPU baseline says it is fp32


def test_teacher_loader_e2e_modes(tmp_path):
    data = tmp_path / "jpegs"
    t = throughput.main(["--mode", "teacher", *TINY, "--compile-backend", "aot_eager", "--json", str(tmp_path / "t.json")])
    assert [r["name"] for r in t["results"]] == ["official-fp16", "eager", "compiled"]  # no CUDA: no graph rows
    assert all(r["ok"] for r in t["results"]), [r.get("traceback") for r in t["results"]]
    ld = throughput.main(["--mode", "loader", *TINY, "--generate", "40", "--data", str(data), "--workers", "1",
                          "--backends", "torchvision,nvjpeg,ffcv,synthetic", "--json", str(tmp_path / "l.json")])
    by = {r["name"]: r for r in ld["results"]}
    assert by["torchvision"]["ok"] and by["nvjpeg"]["ok"] and by["synthetic"]["ok"]
    assert "beton" in by["ffcv"]["skipped"]  # skipped with a reason, not failed
    assert "nvjpeg/torchvision" in ld["ratios"]
    assert len(list(data.rglob("*.jpg"))) == 40
    e = throughput.main(["--mode", "e2e", *TINY, "--data", str(data), "--workers", "1", "--backends", "nvjpeg",
                         "--json", str(tmp_path / "e.json")])
    names = [r["name"] for r in e["results"]]
    assert names == ["step-only (synthetic)", "nvjpeg"]
    r = e["results"][1]
    assert r["ok"], r.get("traceback")
    assert 0 <= r["data_wait"] <= 1 and r["img_per_s"] > 0 and "vs_step_only" in r
    assert json.loads((tmp_path / "e.json").read_text())["results"][1]["name"] == "nvjpeg"


def test_bad_override_fails_fast():
    with pytest.raises(Exception, match="unknown config key"):
        throughput.main(["--mode", "step", *TINY, "--set", "train.no_such_switch=1"])


def test_device_script_dry_run(tmp_path):
    """bench/device.sh end to end on the CPU (tiny models), for two sections; then the summary of a
    directory holding every section's JSON (from the runs above, re-made here cheaply)."""
    out = tmp_path / "out"
    env = dict(os.environ, DEVICE_DRY_RUN="1", OUT=str(out), DEVICE_SECTIONS="env,teacher",
               PYTHON=sys.executable, PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", str(REPO / "bench" / "device.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = json.loads((out / "device.json").read_text())
    assert [s["name"] for s in merged["sections"]] == ["env", "teacher"]
    assert merged["env"]["torch"] == torch.__version__
    assert merged["teacher"]["results"][0]["name"] == "official-fp16"
    summary = (out / "summary.md").read_text()
    assert "Teacher target alone" in summary and "Sections" in summary
    assert proc.stdout.rindex("Sections") > proc.stdout.rindex("results in")  # the table comes last
    assert (out / "device.log").stat().st_size > 0
