"""fdfast.models.attention: FlexAttention == SDPA == eager (outputs and grads, incl. the shared relative
position bias table), with each kernel-option preset, across compiled-graph boundaries and with a bf16
capture of the bias; the kernel switch only swaps classes; the teacher runs on FlashAttention (GPU)."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.attention.flex_attention as fa

from fdfast.config import CompileConfig, StudentConfig
from fdfast.models import attention
from fdfast.models.attention import (FLEX_KERNEL_OPTIONS, FlexBeitAttention, flex_kernel_options,
                                     only_sdpa_backends, set_attention_kernel)
from fdfast.models.student import build_beit
from fdfast.models.teachers import build_teacher
from fdfast.parallelize import apply_compile, prepare_model
from _step_helpers import CPU, cuda_only, exact_fp32

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
PRESETS = ["default", "sm90_fit", "small"]
TABLE = "rel_pos_bias.relative_position_bias_table"


def _beit(per_block: bool = False):
    cfg = StudentConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, drop_path=0.0,
                        num_classes=10 if per_block else 0)
    torch.manual_seed(0)
    model = build_beit(cfg, finetune=per_block)
    with torch.no_grad():  # a non-zero bias, so a wrong index or a missing bias shows
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name:
                p.normal_(0, 0.5)
    return model


def _outputs_and_grads(model, x, kind: str, kernel_options=None, wrap=lambda m: m.forward_features):
    """Forward (and, when the model trains, backward of a fixed projection) under attention ``kind``."""
    m = copy.deepcopy(model)
    set_attention_kernel(m, kind, kernel_options)
    f = wrap(m)
    if not m.training:
        with torch.no_grad():
            return f(x), {}
    y = f(x)
    (y.float() * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.fixture
def cpu_flex_backward(monkeypatch):
    """torch has no CPU FlexAttention backward kernel and refuses requires_grad inputs on CPU; lifting that
    guard runs its reference (math) implementation of the same autograd op, which checks the gradient
    wiring of the score_mod bias. The Triton kernel gets the same checks in the GPU tests."""
    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)


def _assert_grads_equal(ga: dict, gb: dict, rtol: float, atol: float) -> None:
    assert ga.keys() == gb.keys()
    assert TABLE in ga
    assert ga[TABLE].abs().sum() > 0
    for name in gb:
        torch.testing.assert_close(ga[name], gb[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("per_block", [False, True])
def test_flex_forward_matches_sdpa_and_eager_cpu(per_block):
    model = _beit(per_block).eval()
    x = torch.randn(2, 3, 32, 32)
    ref, _ = _outputs_and_grads(model, x, "sdpa")
    eager, _ = _outputs_and_grads(model, x, "eager")
    torch.testing.assert_close(eager, ref, rtol=1e-5, atol=1e-5)
    for preset in PRESETS:  # the reference path ignores tiles: every preset computes the same attention
        out, _ = _outputs_and_grads(model, x, "flex", FLEX_KERNEL_OPTIONS[preset])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", PRESETS)
def test_flex_grads_match_sdpa_and_eager_cpu_reference(cpu_flex_backward, preset):
    model = _beit().train()
    x = torch.randn(2, 3, 32, 32)
    ref, g_ref = _outputs_and_grads(model, x, "sdpa")
    _, g_eager = _outputs_and_grads(model, x, "eager")
    out, g_flex = _outputs_and_grads(model, x, "flex", FLEX_KERNEL_OPTIONS[preset])
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _assert_grads_equal(g_flex, g_ref, rtol=1e-4, atol=1e-5)
    _assert_grads_equal(g_flex, g_eager, rtol=1e-4, atol=1e-5)


def _break_inside(model):
    """A graph break between the two blocks of a whole-model compile: the shared bias then crosses a
    graph boundary as an input that requires grad (where torch once dropped captured-buffer grads)."""
    blk = model.blocks[1]
    forward = blk.forward

    @functools.wraps(forward)
    def broken(*args, **kwargs):
        torch._dynamo.graph_break()
        return forward(*args, **kwargs)

    blk.forward = broken
    return torch.compile(model.forward_features, backend="aot_eager", dynamic=False)


COMPILED = {
    "whole": lambda m: torch.compile(m.forward_features, backend="aot_eager", dynamic=False),
    "blocks": lambda m: apply_compile(m, CompileConfig(), scope="blocks", backend="aot_eager").forward_features,
    "whole-with-graph-break": _break_inside,
}


@pytest.mark.parametrize("how", list(COMPILED))
def test_flex_bias_grad_survives_compiled_graph_boundaries(cpu_flex_backward, how):
    """Traced FlexAttention (aot_eager runs the captured graphs with eager kernels): the RPB-table gradient
    equals eager's whether the bias is captured inside one graph, enters each block's graph as an input,
    or crosses a graph break."""
    model = _beit().train()
    x = torch.randn(2, 3, 32, 32)
    ref, g_ref = _outputs_and_grads(model, x, "eager")
    out, g_flex = _outputs_and_grads(model, x, "flex", FLEX_KERNEL_OPTIONS["sm90_fit"], wrap=COMPILED[how])
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    _assert_grads_equal(g_flex, g_ref, rtol=1e-4, atol=1e-5)


def test_bf16_bias_is_captured_in_bf16(monkeypatch):
    """Under bf16 the score_mod captures a bf16 bias and casts it to the score dtype: the result matches
    SDPA with the same bf16 model to bf16 rounding."""
    captured = []

    def recording_flex(q, k, v, score_mod=None, **kwargs):
        captured.extend(c.cell_contents for c in score_mod.__closure__ if torch.is_tensor(c.cell_contents))
        return fa.flex_attention(q, k, v, score_mod=score_mod, **kwargs)

    monkeypatch.setattr(attention, "flex_attention", recording_flex)
    model = _beit().eval().bfloat16()
    x = torch.randn(2, 3, 32, 32, dtype=torch.bfloat16)
    ref, _ = _outputs_and_grads(model, x, "sdpa")
    out, _ = _outputs_and_grads(model, x, "flex")
    assert len(captured) == 2 and all(t.dtype == torch.bfloat16 for t in captured)
    torch.testing.assert_close(out.float(), ref.float(), rtol=0, atol=0.1)
    assert (out.float() - ref.float()).abs().mean() < 0.02


def test_kernel_option_presets():
    cpu = torch.device("cpu")
    assert flex_kernel_options("auto", cpu) is None  # tiles mean nothing to the CPU reference path
    assert flex_kernel_options("default", cpu) is None
    fit = flex_kernel_options("sm90_fit", cpu)
    assert (fit["fwd_BLOCK_M"], fit["fwd_BLOCK_N"], fit["fwd_num_stages"], fit["fwd_num_warps"]) == (128, 64, 3, 4)
    assert (fit["bwd_BLOCK_M1"], fit["bwd_BLOCK_N1"], fit["bwd_BLOCK_M2"], fit["bwd_BLOCK_N2"]) == (32, 64, 64, 32)
    assert (fit["bwd_num_stages"], fit["bwd_num_warps"]) == (3, 4)
    small = flex_kernel_options("small", cpu)
    assert (small["fwd_BLOCK_M"], small["fwd_BLOCK_N"], small["fwd_num_stages"], small["bwd_num_stages"]) == (64, 64, 2, 2)
    fit["fwd_BLOCK_M"] = 1  # a copy: the presets cannot be changed through it
    assert FLEX_KERNEL_OPTIONS["sm90_fit"]["fwd_BLOCK_M"] == 128
    with pytest.raises(ValueError, match="flex_kernel_options"):
        flex_kernel_options("huge", cpu)


@pytest.mark.parametrize("preset", PRESETS)
def test_config_switch_reaches_flex_attention(tiny_cfg, monkeypatch, preset):
    """compile.flex_kernel_options -> prepare_model -> every flex module -> flex_attention(kernel_options=)."""
    seen = []

    def recording_flex(q, k, v, **kwargs):
        seen.append(kwargs["kernel_options"])
        return fa.flex_attention(q, k, v, **kwargs)

    monkeypatch.setattr(attention, "flex_attention", recording_flex)
    cfg = tiny_cfg(model={"attention": "flex"}, compile={"flex_kernel_options": preset})
    model = prepare_model(_beit(), cfg, CPU)
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, 32, 32))
    assert seen == [FLEX_KERNEL_OPTIONS[preset]] * 2


def test_set_attention_kernel_swaps_class_only():
    model = _beit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert set_attention_kernel(model, "flex") == 2
    assert set_attention_kernel(model, "flex") == 2  # idempotent
    assert all(type(blk.attn) is FlexBeitAttention for blk in model.blocks)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert set_attention_kernel(model, "sdpa") == 2
    assert not any(type(m) is FlexBeitAttention for m in model.modules())
    assert set_attention_kernel(model, "eager") == 2
    assert not any(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    with pytest.raises(ValueError, match="Beit"):
        set_attention_kernel(nn.Sequential(nn.Linear(2, 2)), "flex")
    with pytest.raises(ValueError, match="model.attention"):
        set_attention_kernel(model, "flash")


# ----------------------------------------------------------------------------------------------
# GPU (run by bench/device.sh)
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("compiled,preset", [(False, "auto"), (True, "auto"), (True, "small")])
def test_flex_grads_match_sdpa_cuda(compiled, preset):
    """The Triton FlexAttention kernel (eager student -> compiled flex; compiled student -> traced flex)
    against SDPA with the same bias: outputs and grads incl. the shared RPB table (fp32)."""
    model = _beit().cuda().train()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    options = flex_kernel_options(preset, x.device)
    wrap = (lambda m: torch.compile(m.forward_features, dynamic=False)) if compiled else (lambda m: m.forward_features)
    with exact_fp32():
        ref, g_ref = _outputs_and_grads(model, x, "sdpa", wrap=wrap)
        out, g_flex = _outputs_and_grads(model, x, "flex", options, wrap=wrap)
    torch._dynamo.reset()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    _assert_grads_equal(g_flex, g_ref, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@cuda_only
def test_flex_bf16_grads_close_to_eager_cuda():
    """The bf16 path as trained (autocast, bf16 bias capture, sm90 tiles on an H100/H200): RPB-table grads
    within bf16 tolerance of the eager fp32 reference."""
    model = _beit().cuda().train()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with exact_fp32():
        _, g_ref = _outputs_and_grads(model, x, "eager")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, g_flex = _outputs_and_grads(model, x, "flex", flex_kernel_options("auto", x.device),
                                       wrap=lambda m: torch.compile(m.forward_features, dynamic=False))
    torch._dynamo.reset()
    scale = g_ref[TABLE].abs().max()
    assert (g_flex[TABLE] - g_ref[TABLE]).abs().max() < 0.05 * scale


@pytest.mark.gpu
@cuda_only
def test_teacher_attention_runs_on_flash(tiny_cfg):
    teacher = build_teacher(tiny_cfg().model.teacher, 32).cuda()
    set_attention_kernel(teacher, "sdpa")
    with only_sdpa_backends("FLASH_ATTENTION"), torch.autocast("cuda", dtype=torch.bfloat16):
        out = teacher(torch.randn(2, 3, 32, 32, device="cuda"))
    assert torch.isfinite(out).all()
