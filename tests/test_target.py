"""fdfast.models.target and the distillation task's choice of target: the teacher target on the device
(bit-identical to the plain TeacherTarget, fused teacher attention), its CUDA-graph replay (GPU)."""
from __future__ import annotations

import pytest
import torch

from fdfast.models.target import GraphedTarget, TeacherTarget
from fdfast.models.teachers import build_teacher
from fdfast.step import autocast
from fdfast.tasks.distill import build_target
from _step_helpers import cuda_only, exact_fp32, uint8_batches


@pytest.mark.parametrize("teacher_img", [None, 16])
def test_target_is_teacher_target(tiny_cfg, teacher_img):
    """Without compile or CUDA graphs the run's target is the plain TeacherTarget: bit-identical targets
    (incl. the resize path of a teacher with a smaller input), fp32, no grad, fused teacher attention."""
    cfg = tiny_cfg(model={"teacher": {"img_size": teacher_img}}, compile={"enabled": False})
    torch.manual_seed(0)
    teacher = build_teacher(cfg.model.teacher, 32)
    for m in teacher.modules():  # as a teacher might arrive; the target must switch fused attention on
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    ref = TeacherTarget(teacher)
    images = uint8_batches(1, batch=3)[0][0]
    fn = build_target(teacher, cfg, torch.device("cpu"))
    assert isinstance(fn, TeacherTarget)
    out = fn(images)
    assert out.dtype == torch.float32 and not out.requires_grad
    assert torch.equal(out, ref(images))
    # fused attention is on for the teacher (FlashAttention on CUDA under bf16)
    assert all(m.fused_attn for m in teacher.modules() if hasattr(m, "fused_attn"))


def test_graphed_target_refuses_cpu():
    with pytest.raises(ValueError, match="CUDA"):
        GraphedTarget(lambda x: x, torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# GPU (run by bench/device.sh)
# ----------------------------------------------------------------------------------------------
def _cuda_teacher(cfg):
    torch.manual_seed(0)
    return build_teacher(cfg.model.teacher, 32).cuda()


def _batch(n: int, seed: int):
    return uint8_batches(1, batch=n, device="cuda", seed=seed)[0][0]


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_graph_target_matches_eager(tiny_cfg, precision):
    dev = torch.device("cuda")
    cfg = tiny_cfg(compile={"enabled": False, "cuda_graph_teacher": True})
    teacher = _cuda_teacher(cfg)
    ref = TeacherTarget(teacher)
    fn = build_target(teacher, cfg, dev)
    assert isinstance(fn, GraphedTarget)
    # fp32 without TF32: the replayed kernels are eager's, up to cuBLAS algorithm choice on the capture
    # stream; bf16: the same up to bf16 rounding. Either way far below the O(1) difference between the
    # targets of two different batches, which is what a stale replay would return.
    atol = 1e-4 if precision == "fp32" else 5e-2
    with exact_fp32(), autocast(precision, dev):
        a, b, c = _batch(4, 1), _batch(4, 2), _batch(3, 3)
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
@pytest.mark.parametrize("scope", ["whole", "blocks"])
def test_compiled_cuda_graph_target_close_to_eager(tiny_cfg, scope):
    dev = torch.device("cuda")
    cfg = tiny_cfg(compile={"enabled": True, "scope": scope, "cuda_graph_teacher": True})
    teacher = _cuda_teacher(cfg)
    ref = TeacherTarget(teacher)
    fn = build_target(teacher, cfg, dev)
    assert isinstance(fn, GraphedTarget)
    with autocast("bf16", dev):
        for seed in (1, 2):
            x = _batch(4, seed)
            # whitened targets are ~N(0,1); bf16 matmuls with different fusion -> ~1e-2 differences
            torch.testing.assert_close(fn(x), ref(x), rtol=0, atol=0.1)
    torch._dynamo.reset()
