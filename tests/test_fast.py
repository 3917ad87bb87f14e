"""fdfast.fast: compiled step == eager step, FlexAttention == SDPA (outputs and grads, incl. the
relative position bias table), the device-resident teacher target, CUDA-graph target (GPU)."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from bench.throughput import TINY_OVERRIDES, build_fast_step, load_bench_config, synthetic_batches
from fdfast import fast
from fdfast.config import StudentConfig
from fdfast.distributed import DistInfo
from fdfast.models.attention import set_attention_kernel
from fdfast.models.student import DistillModel, build_beit
from fdfast.models.teachers import build_teacher
from fdfast.models.target import TeacherTarget

CPU = DistInfo(device=torch.device("cpu"))
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_cfg(*extra: str):
    return load_bench_config(None, ["model.teacher.weights=random", "data.backend=synthetic", "train.batch_size=4",
                                    "model.student.drop_path=0.0", *TINY_OVERRIDES, *extra])


def run_steps(built, batches, n: int) -> list[float]:
    return [float(built.run(*batches[i % len(batches)], i)["loss"]) for i in range(n)]


def max_weight_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def max_weight_change(model: nn.Module, init: dict) -> float:
    return max((v.float() - init[k].float()).abs().max().item() for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------
# compiled vs eager
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["whole", "blocks"])
def test_compiled_step_matches_eager_aot_eager(scope):
    """The traced graphs (student fwd+bwd, teacher target) compute what eager does: aot_eager runs the
    captured FX graphs with eager kernels, so losses and weights agree to fp32 rounding."""
    steps = 3
    eager = build_fast_step(tiny_cfg("train.compile=false", "optim.base_lr=0.5", "optim.warmup_epochs=0"), CPU)
    batches = synthetic_batches(tiny_cfg(), CPU.device, 3, 4)
    init = copy.deepcopy(eager.model.state_dict())
    l_eager = run_steps(eager, batches, steps)
    comp = build_fast_step(tiny_cfg("train.compile=true", f"train.compile_scope={scope}", "optim.base_lr=0.5", "optim.warmup_epochs=0"),
                           CPU, backend="aot_eager")
    assert max_weight_diff(comp.model, eager.model) > 0  # the eager copy has trained; the new one has not
    l_comp = run_steps(comp, batches, steps)
    torch._dynamo.reset()
    assert l_comp == pytest.approx(l_eager, rel=1e-5, abs=1e-6)
    change = max_weight_change(eager.model, init)
    assert change > 1e-4, "the LR is too small for the comparison to mean anything"
    assert max_weight_diff(comp.model, eager.model) < 1e-3 * change + 1e-6


def test_compiled_step_matches_eager_inductor():
    """One real inductor (C++ on CPU) compile of the whole student and teacher target: generated
    kernels reorder float reductions, so agreement is to ~1e-5 relative on the loss and a small
    fraction of the weight update after 3 AdamW steps."""
    steps = 3
    eager = build_fast_step(tiny_cfg("train.compile=false", "optim.base_lr=0.5", "optim.warmup_epochs=0"), CPU)
    batches = synthetic_batches(tiny_cfg(), CPU.device, 3, 4)
    init = copy.deepcopy(eager.model.state_dict())
    l_eager = run_steps(eager, batches, steps)
    comp = build_fast_step(tiny_cfg("train.compile=true", "optim.base_lr=0.5", "optim.warmup_epochs=0"), CPU)
    l_comp = run_steps(comp, batches, steps)
    torch._dynamo.reset()
    assert l_comp == pytest.approx(l_eager, rel=1e-4, abs=1e-6)
    change = max_weight_change(eager.model, init)
    # AdamW's first steps move every weight by ~lr * sign(grad); a gradient within rounding noise of 0
    # can flip sign, so bound the difference by a fraction of the update, not by rounding alone.
    assert max_weight_diff(comp.model, eager.model) < 0.01 * change


def test_compile_blocks_in_place_keeps_state_dict_keys():
    model = DistillModel(StudentConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2), 32)
    keys = list(model.state_dict())
    out = fast.compile_module(model, tiny_cfg(), scope="blocks", backend="aot_eager")
    assert out is model and list(model.state_dict()) == keys
    assert len(fast.transformer_blocks(model)) == 2
    whole = fast.compile_module(model, tiny_cfg(), scope="whole", backend="aot_eager")
    assert whole is not model
    with pytest.raises(ValueError, match="compile_scope"):
        fast.compile_module(model, tiny_cfg(), scope="layers")
    torch._dynamo.reset()


def test_compile_mode_rejects_cudagraph_modes():
    cfg = tiny_cfg()
    cfg.train.compile_mode = "reduce-overhead"
    with pytest.raises(ValueError, match="compile_mode"):
        fast.compile_module(nn.Linear(2, 2), cfg, scope="whole")


# ----------------------------------------------------------------------------------------------
# teacher target
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("teacher_img", [None, 16])
def test_fast_target_is_teacher_target(teacher_img):
    """Device-resident constants give bit-identical targets (incl. the bicubic resize path)."""
    cfg = tiny_cfg()
    tcfg = cfg.model.teacher
    if teacher_img:
        tcfg.img_size = teacher_img
    torch.manual_seed(0)
    teacher = build_teacher(tcfg, 32)
    ref = TeacherTarget(teacher)
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    fn = fast.build_fast_target(TeacherTarget(teacher), cfg, torch.device("cpu"))
    assert isinstance(fn, TeacherTarget)
    out = fn(images)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(out, ref(images))
    # fused attention is on for the teacher (FlashAttention on CUDA under bf16)
    assert all(m.fused_attn for m in teacher.modules() if hasattr(m, "fused_attn"))


def test_graphed_target_refuses_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        fast.GraphedTarget(lambda x: x, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# FlexAttention
# ----------------------------------------------------------------------------------------------
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


def _flex_vs_sdpa(model, x, grads: bool):
    outs, gs = {}, {}
    for kind in ("sdpa", "flex"):
        m = copy.deepcopy(model)
        set_attention_kernel(m, kind)
        if not grads:
            with torch.no_grad():
                outs[kind] = m.forward_features(x)
            continue
        y = m.forward_features(x)
        (y * torch.linspace(-1, 1, y.shape[-1], device=y.device)).sum().backward()
        outs[kind] = y.detach()
        gs[kind] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return outs, gs


@pytest.mark.parametrize("per_block", [False, True])
def test_flex_forward_matches_sdpa_cpu(per_block):
    model = _beit(per_block).eval()
    x = torch.randn(2, 3, 32, 32)
    outs, _ = _flex_vs_sdpa(model, x, grads=False)
    torch.testing.assert_close(outs["flex"], outs["sdpa"], rtol=1e-5, atol=1e-5)


def test_flex_grads_match_sdpa_cpu_reference(monkeypatch):
    """Gradient wiring of the score_mod bias (incl. the shared RPB table) on CPU. torch has no CPU
    FlexAttention backward kernel and refuses requires_grad inputs on CPU; lifting that guard runs its
    reference (math) implementation of the same autograd op. The Triton kernel gets the same check in
    the GPU test below."""
    import torch.nn.attention.flex_attention as fa

    monkeypatch.setattr(fa, "_validate_device", lambda *a, **k: None)
    model = _beit().train()
    x = torch.randn(2, 3, 32, 32)
    outs, gs = _flex_vs_sdpa(model, x, grads=True)
    torch.testing.assert_close(outs["flex"], outs["sdpa"], rtol=1e-5, atol=1e-5)
    assert gs["flex"].keys() == gs["sdpa"].keys()
    assert "rel_pos_bias.relative_position_bias_table" in gs["flex"]
    for name in gs["sdpa"]:
        torch.testing.assert_close(gs["flex"][name], gs["sdpa"][name], rtol=1e-4, atol=1e-5, msg=name)


def test_use_flex_attention_swaps_class_only():
    model = _beit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fast.use_flex_attention(model) == 2
    assert fast.use_flex_attention(model) == 2  # idempotent
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert fast.use_sdpa_attention(model) == 2
    with pytest.raises(ValueError, match="Beit"):
        fast.use_flex_attention(nn.Sequential(nn.Linear(2, 2)))


# ----------------------------------------------------------------------------------------------
# GPU (run by bench/device.sh)
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def exact_fp32():
    """No TF32 and no autotuned conv algorithms (an earlier build_fast_step turns TF32 on process-wide),
    so fp32 comparisons measure the code, not the math mode."""
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]


def _cuda_teacher(cfg):
    torch.manual_seed(0)
    return build_teacher(cfg.model.teacher, 32).cuda()


def _uint8_batch(n: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, device="cuda", generator=g).permute(0, 3, 1, 2)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_target_matches_eager(precision):
    from fdfast.step import autocast

    dev = torch.device("cuda")
    cfg = tiny_cfg("train.compile=false", "train.cuda_graph_teacher=true")
    teacher = _cuda_teacher(cfg)
    ref = TeacherTarget(teacher)
    fn = fast.build_fast_target(TeacherTarget(teacher), cfg, dev)
    assert isinstance(fn, fast.GraphedTarget)
    # fp32 without TF32: the replayed kernels are eager's, up to cuBLAS algorithm choice on the capture
    # stream; bf16: the same up to bf16 rounding. Either way far below the O(1) difference between the
    # targets of two different batches, which is what a stale replay would return.
    atol = 1e-4 if precision == "fp32" else 5e-2
    with exact_fp32(), autocast(precision, dev):
        a, b, c = _uint8_batch(4, 1), _uint8_batch(4, 2), _uint8_batch(3, 3)
        out_a = fn(a)
        torch.testing.assert_close(out_a, ref(a), rtol=0, atol=atol)
        ptr = out_a.data_ptr()
        out_b = fn(b)
        assert out_b.data_ptr() == ptr  # the static output buffer is reused ...
        torch.testing.assert_close(out_b, ref(b), rtol=0, atol=atol)  # ... with the new batch's target
        assert (ref(a) - ref(b)).abs().mean() > 0.3
        out_c = fn(c)  # a partial batch: re-captured for the new shape
        torch.testing.assert_close(out_c, ref(c), rtol=0, atol=atol)
        assert fn.captures == 2
        torch.testing.assert_close(fn(a), ref(a), rtol=0, atol=atol)
        assert fn.captures == 2  # the first graph is kept


@pytest.mark.gpu
@cuda_only
def test_compiled_cuda_graph_target_close_to_eager():
    from fdfast.step import autocast

    dev = torch.device("cuda")
    cfg = tiny_cfg("train.compile=true", "train.cuda_graph_teacher=true")
    teacher = _cuda_teacher(cfg)
    ref = TeacherTarget(teacher)
    fn = fast.build_fast_target(TeacherTarget(teacher), cfg, dev)
    with autocast("bf16", dev):
        for seed in (1, 2):
            x = _uint8_batch(4, seed)
            # whitened targets are ~N(0,1); bf16 matmuls with different fusion -> ~1e-2 differences
            torch.testing.assert_close(fn(x), ref(x), rtol=0, atol=0.1)
    torch._dynamo.reset()


@pytest.mark.gpu
@cuda_only
def test_teacher_attention_runs_on_flash():
    dev = torch.device("cuda")
    cfg = tiny_cfg()
    teacher = _cuda_teacher(cfg)
    fast.enable_fused_attention(teacher)
    with fast.only_sdpa_backends("FLASH_ATTENTION"), torch.autocast("cuda", dtype=torch.bfloat16):
        out = teacher(torch.randn(2, 3, 32, 32, device=dev))
    assert torch.isfinite(out).all()


@pytest.mark.gpu
@cuda_only
def test_bf16_fast_step_close_to_fp32_eager_step():
    """The full fast configuration (bf16, compiled student + teacher, CUDA-graph teacher, channels-last,
    fused AdamW) follows the fp32 eager step over a few steps."""
    info = DistInfo(device=torch.device("cuda"))
    ref = build_fast_step(tiny_cfg("train.precision=fp32", "train.compile=false", "train.cuda_graph_teacher=false",
                                   "optim.base_lr=0.2", "optim.warmup_epochs=0"), info)
    batches = synthetic_batches(tiny_cfg(), info.device, 3, 4)
    l_ref = run_steps(ref, batches, 5)
    fast_step = build_fast_step(tiny_cfg("train.precision=bf16", "train.compile=true", "train.cuda_graph_teacher=true",
                                         "optim.base_lr=0.2", "optim.warmup_epochs=0"), info)
    l_fast = run_steps(fast_step, batches, 5)
    torch._dynamo.reset()
    assert fast_step.target_fn.captures == 1
    assert l_fast == pytest.approx(l_ref, rel=3e-2)


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("compiled", [False, True])
def test_flex_grads_match_sdpa_cuda(compiled):
    """The Triton FlexAttention kernel (eager student -> compiled flex; compiled student -> traced
    flex) against SDPA with the same bias: outputs and grads incl. the shared RPB table (fp32)."""
    model = _beit().cuda().train()
    x = torch.randn(4, 3, 32, 32, device="cuda")
    outs, gs = {}, {}
    with exact_fp32():
        _flex_sdpa_cuda(model, x, compiled, outs, gs)
    torch._dynamo.reset()
    fast._compiled_flex = None
    torch.testing.assert_close(outs["flex"], outs["sdpa"], rtol=1e-3, atol=1e-3)
    assert "rel_pos_bias.relative_position_bias_table" in gs["flex"]
    for name in gs["sdpa"]:
        torch.testing.assert_close(gs["flex"][name], gs["sdpa"][name], rtol=1e-3, atol=1e-3, msg=name)


def _flex_sdpa_cuda(model, x, compiled, outs, gs):
    for kind in ("sdpa", "flex"):
        m = copy.deepcopy(model)
        set_attention_kernel(m, kind)
        f = torch.compile(m.forward_features, dynamic=False) if compiled else m.forward_features
        y = f(x)
        (y * torch.linspace(-1, 1, y.shape[-1], device="cuda")).sum().backward()
        outs[kind] = y.detach()
        gs[kind] = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def test_block_compile_covers_every_block_past_the_recompile_limit():
    """A 12-block student with a drop-path ramp: every block gets a compiled graph. With dynamo's default
    recompile limit (8) the deeper blocks would silently run eagerly."""
    import torch._dynamo

    torch._dynamo.reset()
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    s = StudentConfig(img_size=32, patch_size=8, embed_dim=32, depth=12, num_heads=2, drop_path=0.3)
    model = DistillModel(s, 48)
    cfg = tiny_cfg()
    cfg.train.compile_scope = "blocks"
    fast.compile_module(model.encoder, cfg, backend=counting_backend)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert len(compiled) > 8, f"only {len(compiled)} block graphs compiled: blocks past the limit ran eagerly"
    torch._dynamo.reset()
