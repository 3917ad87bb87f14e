"""bench/: the analytic FLOP count (against torch's FlopCounterMode and design.md's 141 GFLOP/img),
the benchmark's modes on CPU with tiny models (JSON keys, no timing assertions), the profile's kernel
families and table, the device script's dry run and summary."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from timm.models.swin_transformer_v2 import SwinTransformerV2
from torch.autograd import DeviceType
from torch.utils.flop_counter import FlopCounterMode

from bench import throughput
from bench.device_summary import merge
from bench.flops import distill_step_flops, model_count, spec_peak_tflops, vit_pair_flops
from bench.profiling import FAMILIES, classify, family_times, write_profile
from bench.timing import stats, timing_warnings, wait_warning
from conftest import tiny_dict
from fdfast.config import StudentConfig, config_from_dict
from fdfast.distributed import DistInfo
from fdfast.models.attention import set_attention_kernel
from fdfast.models.student import DistillModel
from fdfast.tasks import DistillTask

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


TINY = ["--tiny", "--device", "cpu", "--steps", "2", "--warmup", "1", "--set", "compile.enabled=false"]


def test_step_mode_with_baseline_writes_json(tmp_path, capsys):
    out = tmp_path / "step.json"
    data = throughput.main(["--mode", "step", "--baseline", *TINY, "--variant", "fast",
                            "--variant", "eager-blocks:compile.scope=blocks,train.channels_last=false",
                            "--json", str(out)])
    on_disk = json.loads(out.read_text())
    # provenance as summary.json has it, and a CPU table that says so and warns about 2 timed steps
    env = on_disk["env"]
    assert env["fdfast"] == importlib.metadata.version("fdfast") and env["cpu"] and env["gpu"] is None
    assert "git_commit" in env and env["device"] == "cpu"
    printed = capsys.readouterr().out
    assert "per device (CPU)" in printed and "per GPU" not in printed
    assert all(any("2 timed steps, fewer than 10" in w for w in r["warnings"]) for r in on_disk["results"])
    assert "warning: fast: 2 timed steps" in printed
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
    assert on_disk["results"][2]["switches"]["channels_last"] is False
    assert on_disk["results"][2]["switches"]["compile"]["scope"] == "blocks"
    assert set(on_disk["ratios"]) == {"fast/official", "eager-blocks/official"}
    assert on_disk["flops_per_img"]["total"] > 0
    assert any("fp32" in n for n in on_disk["results"][0]["notes"])  # the CPU baseline says it is fp32


def test_teacher_loader_e2e_modes(tmp_path):
    data = tmp_path / "jpegs"
    t = throughput.main(["--mode", "teacher", *TINY, "--compile-backend", "aot_eager", "--json", str(tmp_path / "t.json")])
    assert [r["name"] for r in t["results"]] == ["official-fp16", "eager", "compiled", "compiled+bf16"]  # no graphs
    labels = {r["name"]: (r["label"], r["precision"]) for r in t["results"]}
    assert labels["official-fp16"] == ("official (fp32: no fp16 on a CPU)", "fp32")  # what ran, not the name
    assert labels["compiled+bf16"] == ("compiled+bf16", "bf16 (whole teacher)")
    assert any("skipped on a CPU (CUDA graphs need a GPU): eager+graph, compiled+graph, compiled+graph+bf16" in n
               for n in t["notes"])
    assert all(r["ok"] for r in t["results"]), [r.get("traceback") for r in t["results"]]
    bf16 = t["results"][-1]  # the bf16 teacher's target against the default one: close, not identical
    assert 0.999 < bf16["target_cosine_min"] < 1 and 0 < bf16["target_fd_loss"] < 1e-3, bf16
    assert "target_cosine_min" not in t["results"][2]
    t2 = throughput.main(["--mode", "teacher", *TINY, "--variant", "compiled", "--variant", "compiled+graph",
                          "--compile-backend", "aot_eager"])
    assert [r["name"] for r in t2["results"]] == ["compiled", "compiled+graph"]
    assert t2["results"][1]["skipped"] == "CUDA graphs need a GPU" and not t2["results"][1]["ok"]
    ld = throughput.main(["--mode", "loader", *TINY, "--generate", "40", "--data", str(data), "--workers", "1",
                          "--backends", "torchvision,nvjpeg,ffcv,synthetic,dali@0.75", "--json", str(tmp_path / "l.json")])
    by = {r["name"]: r for r in ld["results"]}
    assert by["torchvision"]["ok"] and by["nvjpeg"]["ok"] and by["synthetic"]["ok"]
    assert "beton" in by["ffcv"]["skipped"]  # skipped with a reason, not failed
    assert by["dali@0.75"]["ok"], by["dali@0.75"].get("traceback")  # DALI's CPU mode here
    assert "nvjpeg/torchvision" in ld["ratios"]
    assert len(list(data.rglob("*.jpg"))) == 40
    e = throughput.main(["--mode", "e2e", *TINY, "--data", str(data), "--workers", "1", "--backends", "nvjpeg",
                         "--json", str(tmp_path / "e.json")])
    names = [r["name"] for r in e["results"]]
    assert names == ["step-only (synthetic)", "nvjpeg"]
    r = e["results"][1]
    assert r["ok"], r.get("traceback")
    assert 0 <= r["data_wait"] <= 1 and r["img_per_s"] > 0 and "vs_step_only" in r and "warnings" in r
    assert json.loads((tmp_path / "e.json").read_text())["results"][1]["name"] == "nvjpeg"


def test_timing_warnings_name_too_few_steps_a_wide_spread_and_a_wait_that_does_not_explain_the_ratio():
    steady = stats([10.0, 10.2, 10.1, 9.9, 10.0, 10.3, 10.1, 10.0, 9.8, 10.2])
    assert timing_warnings("fast", steady) == []
    (few,) = timing_warnings("fast", stats([10.0, 10.1, 10.2]))
    assert few.startswith("fast: 3 timed steps, fewer than 10")
    (wide,) = timing_warnings("fast", stats([43.7] * 5 + [241.6] * 5))
    assert "p90/p10 5.5 > 1.5" in wide
    assert wait_warning("dali", 0.50, 0.48) == []  # waiting explains it
    (odd,) = wait_warning("nvjpeg", 0.50, 0.02)
    assert odd.startswith("nvjpeg: 0.50x step-only with 2% data wait") and "about 0.98x" in odd
    assert wait_warning("torchvision", 1.30, 0.0)  # faster than the step alone: the reference is noisy


def test_bad_override_and_options_fail_fast(capsys):
    with pytest.raises(Exception, match="unknown config key"):
        throughput.main(["--mode", "step", *TINY, "--set", "train.no_such_switch=1"])
    with pytest.raises(Exception, match="has moved: use 'compile.enabled'"):
        throughput.main(["--mode", "step", *TINY, "--set", "train.compile=true"])
    for bad in (["--backends", "torchvision@0.5"], ["--mode", "teacher", "--variant", "fastest"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            throughput.parse_args(bad)
    err = capsys.readouterr().err
    assert "teacher mode knows" in err and "--steps: must be >= 1, got 0" in err


def test_a_bad_config_on_the_command_line_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "bench/throughput.py", "--tiny", "--set", "optim.bas_lr=1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("bench/throughput.py: ConfigError: unknown config key "
                                                          "'optim.bas_lr'")


def test_profile_mode_writes_the_family_table(tmp_path):
    """--profile on a recorded CPU profile (tiny models, eager): every family of a training step has time,
    the families and idle add up to the measured step, and the table lands in --profile-dir."""
    data = throughput.main(["--profile", *TINY, "--steps", "3", "--profile-dir", str(tmp_path)])
    prof = data["results"][0]
    fam = prof["families"]
    assert list(fam) == list(FAMILIES)
    for family in ("GEMM", "attention fwd", "attention bwd", "norms/elementwise", "optimizer", "copies"):
        assert fam[family]["ms_per_step"] > 0, family
    assert fam["idle"]["ms_per_step"] >= 0
    assert sum(f["ms_per_step"] for f in fam.values()) == pytest.approx(prof["wall_ms_per_step"], rel=1e-6)
    assert any("_backward" in name for name, _ in fam["attention bwd"]["top"])
    assert all(name.startswith("Optimizer.step: ") for name, _ in fam["optimizer"]["top"]
               if not name.startswith("aten::_foreach"))
    md, = tmp_path.glob("profile-cpu-*.md")
    assert json.loads(md.with_suffix(".json").read_text())["families"] == fam


@pytest.mark.parametrize("name,family", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off", "GEMM"),
    ("nvjet_tst_192x192_64x3_2x1_v_bz_coopB_TNN", "GEMM"),
    ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_bf16_s16816wgrad_optimized_bf16_64x64_64x5_nhwc>", "GEMM"),
    ("triton_tem_fused_addmm_gelu_3", "GEMM"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<bf16>::Params)", "attention fwd"),
    ("fmha_cutlassB_bf16_aligned_64x64_k64_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<bf16>)", "attention bwd"),
    ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4>>", "attention fwd"),
    ("triton_tem_fused_flex_attention_backward_5", "attention bwd"),
    ("void (anonymous namespace)::cunn_SoftMaxBackward<4, float, float>", "attention bwd"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 2>>", "optimizer"),
    ("void at::native::lpnorm_cleanup<float, (at::native::NormType)1, float>", "optimizer"),
    ("triton_per_fused_native_layer_norm_native_layer_norm_backward_7", "norms/elementwise"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "norms/elementwise"),
    ("Memcpy DtoD (Device -> Device)", "copies"),
    ("void at::native::elementwise_kernel<128, 2, direct_copy_kernel_cuda>", "copies"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "other"),
])
def test_classifier_on_gpu_kernel_names(name, family):
    assert classify(name) == family


class _Kernel:
    """A CUDA kernel event as the profiler lists it (name, device, time range)."""

    def __init__(self, name: str, start: float, end: float):
        self.name, self.device_type = name, DeviceType.CUDA
        self.time_range = type("R", (), {"start": start, "end": end, "elapsed_us": lambda _: end - start})()


def test_gpu_family_times_count_overlap_once_and_idle():
    """Two streams overlapping for 20 us are busy 100 us, not 120; the rest of 200 us is idle."""
    events = [_Kernel("nvjet_tst_gemm", 0, 60), _Kernel("fmha_cutlassF_attention", 40, 80),
              _Kernel("FusedAdamMathFunctor", 100, 120)]
    out = family_times(events, "cuda", wall_us=200.0, steps=2)
    fam = out["families"]
    assert out["wall_ms_per_step"] == pytest.approx(0.1)
    assert fam["idle"]["ms_per_step"] == pytest.approx(0.05)
    assert sum(f["ms_per_step"] for f in fam.values()) == pytest.approx(0.1)
    assert fam["GEMM"]["ms_per_step"] > fam["attention fwd"]["ms_per_step"] > 0


def test_profile_table_format(tmp_path):
    fam = {f: {"ms_per_step": 0.0, "share": 0.0, "top": []} for f in FAMILIES}
    fam["GEMM"] = {"ms_per_step": 30.0, "share": 0.5, "top": [["nvjet_a", 20.0], ["nvjet_b", 10.0]]}
    fam["idle"] = {"ms_per_step": 30.0, "share": 0.5, "top": []}
    data = {"families": fam, "wall_ms_per_step": 60.0, "steps": 20, "device": "NVIDIA H200", "config": "c.yaml",
            "overrides": [], "batch_size": 128, "precision": "bf16", "torch": "2.x"}
    md, js = write_profile(tmp_path, data)
    assert md.name.startswith("profile-h200-") and md.suffix == ".md" and js.suffix == ".json"
    lines = md.read_text().splitlines()
    head = lines.index("| family | ms/step | % of step | top kernels (ms/step) |")
    assert lines[head + 1] == "|---|---|---|---|"
    assert lines[head + 2] == "| GEMM | 30.00 | 50.0 | nvjet_a (20.00); nvjet_b (10.00) |"
    assert [row.split(" | ")[0][2:] for row in lines[head + 2:head + 2 + len(FAMILIES) + 1]] == [*FAMILIES, "total"]
    assert lines[head + 2 + len(FAMILIES)] == "| total | 60.00 | 100.0 |  |"
    assert json.loads(js.read_text()) == data


def _fake_wheel(folder: Path, name: str, payload_bytes: int) -> Path:
    """A valid pure-Python wheel whose payload makes it as large as asked (stored, not compressed)."""
    whl = folder / f"{name}-0.1-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{name}/__init__.py", "__version__ = '0.1'\n")
        z.writestr(f"{name}/payload.bin", os.urandom(payload_bytes))
        z.writestr(f"{name}-0.1.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        z.writestr(f"{name}-0.1.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: fdfast-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}-0.1.dist-info/RECORD", "")
    return whl


def _device_sh(tmp_path, *args: str, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEVICE_DRY_RUN="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable, PYTHONPATH=str(REPO),
               WHEEL_DIR=str(tmp_path / ".whl"), WHEELS_SHA256=str(tmp_path / "wheels.sha256"),
               SITE_DIR=str(tmp_path / "site"), **env)
    return subprocess.run(["bash", str(REPO / "bench" / "device.sh"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def test_device_script_dry_run_with_wheel_parts(tmp_path):
    """The whole carrying sequence, on the CPU with fake small wheels: pack into transfers of at most 1 MiB,
    one `device.sh --stash` per transfer (each transfer replaces the carried folder, as the device tool
    does), then `device.sh` reassembles, checks the sha256, installs and runs the sections (two of them
    here). A damaged part is refused, recorded, and fails the run without stopping the sections."""
    dl = tmp_path / "dl"
    dl.mkdir()
    big, small = _fake_wheel(dl, "fakedali", 3 * 2 ** 20), _fake_wheel(dl, "fakedep", 1000)
    (tmp_path / "wheels.sha256").write_text("# test list\n" + "".join(
        f"{hashlib.sha256(w.read_bytes()).hexdigest()}  {w.name}\n" for w in (big, small)))
    env = dict(os.environ, WHEEL_DIR=str(tmp_path / ".whl"), WHEELS_SHA256=str(tmp_path / "wheels.sha256"))
    subprocess.run([sys.executable, str(REPO / "bench" / "wheels.py"), "pack", str(dl), "--max-mib", "1"], env=env,
                   check=True, capture_output=True, timeout=60)
    calls = sorted((tmp_path / ".whl" / "calls").iterdir())
    assert len(calls) == 4 and all(sum(f.stat().st_size for f in c.iterdir()) <= 2 ** 20 for c in calls)
    staged = tmp_path / "staged"
    (tmp_path / ".whl" / "calls").rename(staged)
    for i, call in enumerate(sorted(staged.iterdir())):
        shutil.rmtree(tmp_path / ".whl" / "calls", ignore_errors=True)  # a transfer carries only its folder
        shutil.copytree(call, tmp_path / ".whl" / "calls" / call.name)
        if i < 3:
            proc = _device_sh(tmp_path, "--stash")
            assert proc.returncode == 0, proc.stderr
            assert "stashed" in proc.stdout and not any((tmp_path / ".whl" / "calls" / call.name).iterdir())
    proc = _device_sh(tmp_path, DEVICE_SECTIONS="env,teacher")
    out = tmp_path / "out"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    merged = json.loads((out / "device.json").read_text())
    assert merged["summary"]["wheels"] == {big.name: True, small.name: True}
    rec = {w["name"]: w for w in merged["wheels"]["wheels"]}
    assert rec[big.name]["parts"] == ["aa", "ab", "ac", "ad"] and rec[small.name]["parts"] == []
    assert (tmp_path / "site" / "fakedali" / "payload.bin").stat().st_size == 3 * 2 ** 20
    assert [s["name"] for s in merged["sections"]] == ["env", "teacher"]
    assert merged["env"]["torch"] == torch.__version__
    assert merged["env"]["fdfast"] == importlib.metadata.version("fdfast") and "git_commit" in merged["env"]
    assert merged["teacher"]["results"][0]["name"] == "official-fp16"
    summary = (out / "summary.md").read_text()
    assert "Teacher target alone" in summary and "Carried wheels" in summary and "Sections" in summary
    assert proc.stdout.rindex("Sections") > proc.stdout.rindex("results in")  # the table comes last
    assert (out / "device.log").stat().st_size > 0
    assert json.loads(next(out.glob("cpu-dryrun-*.json")).read_text())["summary"] == merged["summary"]

    part = tmp_path / ".whl" / "stash" / f"{big.name}.part-ab"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    proc = _device_sh(tmp_path, DEVICE_SECTIONS="env")
    assert proc.returncode == 1
    merged = json.loads((out / "device.json").read_text())
    assert merged["summary"]["wheels"] == {big.name: False, small.name: True}
    assert "sha256 mismatch after reassembling parts" in {w["name"]: w for w in merged["wheels"]["wheels"]}[
        big.name]["reason"]
    assert merged["sections"][0]["rc"] == 0  # the sections still ran


def test_summary_holds_the_headline_numbers(tmp_path):
    """device.json's `summary` from section JSONs as the benchmark writes them (here made by hand)."""
    def res(name, **kw):
        return {"name": name, "ok": True, **kw}

    files = {
        "env.json": {"gpu": "NVIDIA H200"},
        "step128.json": {"results": [res("official", img_per_s=1000.0), res("fast", img_per_s=2100.0,
                                                                                mfu_measured=0.38, warmup_s=27.0),
                                     {"name": "flex", "ok": False, "error": "InductorError"}]},
        "teacher.json": {"results": [res("official-fp16", img_per_s=4900.0), res("compiled+graph", img_per_s=11000.0)]},
        "e2e.json": {"results": [res("step-only (synthetic)", img_per_s=2100.0, data_wait=0.0),
                                 res("dali@0.65", img_per_s=2050.0, data_wait=0.02),
                                 res("dali@0.75", img_per_s=2060.0, data_wait=0.01),
                                 res("torchvision", img_per_s=2000.0, data_wait=0.05),
                                 res("nvjpeg", img_per_s=1700.0, data_wait=0.5),
                                 {"name": "ffcv", "ok": False, "skipped": "ffcv skipped: no module named ffcv"}]},
        "vitl14.json": {"results": [res("fast", img_per_s=400.0, mfu_measured=0.4, peak_mem_gib=60.0)]},
    }
    for name, d in files.items():
        (tmp_path / name).write_text(json.dumps(d))
    sections = [{"name": n} for n in ("env", "step128", "teacher", "e2e", "vitl14", "swinv2b")]
    s = merge(tmp_path, sections, dry=False, budget_s=470)["summary"]
    assert s["gpu"] == "NVIDIA H200"
    assert (s["step_img_s"], s["official_img_s"], s["mfu_measured"], s["teacher_img_s"]) == (2100.0, 1000.0, 0.38, 11000.0)
    assert s["x_official"] == pytest.approx(2.1)
    assert set(s["e2e"]) == {"dali", "dali@0.75", "torchvision", "nvjpeg", "ffcv"}
    assert s["e2e"]["dali"]["img_s"] == 2050.0 and s["e2e"]["dali"]["data_wait"] == 0.02
    assert s["e2e"]["ffcv"]["img_s"] is None and "ffcv" in s["e2e"]["ffcv"]["why"]
    assert s["variants_b16"]["flex"]["img_s"] is None and s["variants_b16"]["fast"]["compile_s"] == 27.0
    assert s["vit_l14"] == {"img_s": 400.0, "mfu_measured": 0.4, "peak_mem_gib": 60.0, "compile_s": None}
    assert s["swinv2_b"]["img_s"] is None  # the section did not run: unmeasured, not zero


def test_several_teachers_step_count(tmp_path):
    """Two tiny teachers (a SigLIP-like one without CLS, a DINOv2-like one with 4 registers at 28 px) and their
    heads (linear, MLP) under a 17-token student: the count by hand, and torch's count of the real step."""
    d = tiny_dict(tmp_path)
    del d["model"]["teacher"]
    d["model"]["teachers"] = [
        {"name": "sig", "kind": "timm", "model": "vit_base_patch16_siglip_224",
         "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
        {"name": "dino", "kind": "timm", "model": "vit_base_patch14_reg4_dinov2", "head": "mlp",
         "model_kwargs": {"patch_size": 7, "embed_dim": 48, "depth": 1, "num_heads": 2}}]
    d["model"]["student"].update(drop_path=0.0)
    task = DistillTask(config_from_dict(d), DistInfo())
    heads = task.model.heads
    f = distill_step_flops(task.model.encoder, 17, [(t.name, t.teacher, heads[t.name]) for t in task.slots])

    def vit(n, patches, patch, dim, depth, hidden):  # forward matmuls of a ViT on n tokens
        blocks = depth * (2 * n * dim * 3 * dim + 2 * n * dim * dim + 4 * n * n * dim + 4 * n * dim * hidden)
        return 2 * patches * 3 * patch ** 2 * dim, blocks
    embed, blocks = vit(17, 16, 8, 32, 2, 128)  # the student: CLS + 4x4 patches
    sig, dino = sum(vit(16, 16, 8, 32, 1, 128)), sum(vit(21, 16, 7, 48, 1, 192))  # no CLS; CLS + 4 registers
    sig_head, dino_head = 3 * 2 * 17 * 32 * 32, 3 * 2 * 17 * (32 * 48 + 48 * 48)  # fwd + input and weight grads
    assert f["student_fwd_bwd"] == 3 * blocks + 2 * embed
    assert f["teachers"] == {"sig": {"teacher_fwd": sig, "head_fwd_bwd": sig_head},
                             "dino": {"teacher_fwd": dino, "head_fwd_bwd": dino_head}}
    assert f["total"] == 3 * blocks + 2 * embed + sig + dino + sig_head + dino_head == 5_712_320
    set_attention_kernel(task.model.encoder, "eager")
    for t in task.slots:
        for m in t.teacher.modules():
            if hasattr(m, "fused_attn"):
                m.fused_attn = False
    images = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)
    assert _flops(lambda: task.loss(images, None)["loss"].backward()) == f["total"]


def test_step_mode_with_two_teachers_counts_both(tmp_path):
    """The shipped two-teacher config in step mode (random tiny teachers by name, PHI-S estimated first); its
    JSON is what device.sh's teachers2 section gives the summary."""
    out = tmp_path / "teachers2.json"
    data = throughput.main(["--mode", "step", *TINY, "--config",
                            str(REPO / "configs" / "pretrain" / "fd_siglip2_dinov2_vit_base.yaml"),
                            "--json", str(out)])
    (r,) = data["results"]
    assert r["ok"], r.get("traceback")
    assert set(data["flops_per_img"]["teachers"]) == {"siglip2", "dinov2"}
    assert [t["weights"] for t in data["teachers"]] == ["random", "random"]
    s = merge(tmp_path, [{"name": "teachers2"}], dry=True, budget_s=470)["summary"]
    assert s["two_teachers"]["img_s"] == r["img_per_s"] and s["dinov2_b14"]["img_s"] is None


def test_teacher_mode_measures_each_of_several_teachers(tmp_path):
    """A two-teacher config: every variant once per teacher, each built from its own entry (not model.teacher's
    defaults), its ratio taken against the official-style row of the same teacher."""
    data = throughput.main(["--mode", "teacher", *TINY, "--config",
                            str(REPO / "configs" / "pretrain" / "fd_siglip2_dinov2_vit_base.yaml"),
                            "--variant", "official-fp16", "--variant", "compiled+bf16", "--compile-backend", "aot_eager"])
    rows = {r["name"]: r for r in data["results"]}
    assert list(rows) == ["official-fp16/siglip2", "official-fp16/dinov2", "compiled+bf16/siglip2",
                          "compiled+bf16/dinov2"]
    assert all(r["ok"] for r in rows.values()), [r.get("traceback") for r in rows.values()]
    assert rows["official-fp16/dinov2"]["label"] == "official/dinov2 (fp32: no fp16 on a CPU)"
    assert rows["compiled+bf16/dinov2"]["precision"] == "bf16 (whole teacher)"
    # different teachers, different work per image: SigLIP-like (no CLS) and DINOv2-like (registers, 14 px)
    assert rows["official-fp16/siglip2"]["teacher_fwd_flops"] != rows["official-fp16/dinov2"]["teacher_fwd_flops"]
    assert rows["compiled+bf16/dinov2"]["teacher_fwd_flops"] == rows["official-fp16/dinov2"]["teacher_fwd_flops"]


@pytest.mark.parametrize("name", ["eva02_base_patch16_clip_224", "vit_base_patch16_dinov3", "vit_pe_core_base_patch16_224"])
def test_any_timm_teacher_is_counted_like_the_flop_counter(name):
    """Eva teachers: separate q/k/v and SwiGLU (EVA-02), storage tokens (DINOv3), PE: counted from their blocks."""
    teacher = timm.create_model(name, num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    for m in teacher.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    x = torch.randn(1, 3, 32, 32)
    assert _flops(lambda: teacher.forward_features(x)) == model_count(teacher).fwd
