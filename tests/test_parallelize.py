"""fdfast.parallelize: the compiled step computes what the eager step does (aot_eager and inductor on CPU,
bf16 on the GPU), per-block compile keeps the keys and covers every block past dynamo's recompile limit,
compile.mode reaches torch.compile and modes with CUDA graphs are refused by the config."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from fdfast.config import CompileConfig, ConfigError, StudentConfig, load_config
from fdfast.distributed import DistInfo
from fdfast.models.student import DistillModel
from fdfast.parallelize import apply_compile, transformer_blocks
from fdfast.step import autocast
from _step_helpers import (build_run, cuda_only, max_weight_change, max_weight_diff, tiny_sections,
                           uint8_batches)


@pytest.mark.parametrize("scope", ["whole", "blocks"])
def test_compiled_step_matches_eager_aot_eager(tiny_cfg, scope):
    """The traced graphs (student fwd+bwd, teacher target) compute what eager does: aot_eager runs the
    captured FX graphs with eager kernels, so losses and weights agree to fp32 rounding."""
    batches = uint8_batches(3)
    eager = build_run(tiny_cfg(**tiny_sections(compile={"enabled": False})))
    init = copy.deepcopy(eager.task.model.state_dict())
    l_eager = eager.losses(batches, 3)
    comp = build_run(tiny_cfg(**tiny_sections(compile={"enabled": True, "scope": scope})), backend="aot_eager")
    assert max_weight_diff(comp.task.model, eager.task.model) > 0  # the eager copy has trained; the new one has not
    l_comp = comp.losses(batches, 3)
    torch._dynamo.reset()
    assert l_comp == pytest.approx(l_eager, rel=1e-5, abs=1e-6)
    change = max_weight_change(eager.task.model, init)
    assert change > 1e-4, "the LR is too small for the comparison to mean anything"
    assert max_weight_diff(comp.task.model, eager.task.model) < 1e-3 * change + 1e-6


def test_compiled_step_matches_eager_inductor(tiny_cfg):
    """One real inductor (C++ on CPU) compile of the whole student and teacher target: generated
    kernels reorder float reductions, so agreement is to ~1e-5 relative on the loss and a small
    fraction of the weight update after 3 AdamW steps."""
    batches = uint8_batches(3)
    eager = build_run(tiny_cfg(**tiny_sections(compile={"enabled": False})))
    init = copy.deepcopy(eager.task.model.state_dict())
    l_eager = eager.losses(batches, 3)
    comp = build_run(tiny_cfg(**tiny_sections(compile={"enabled": True})))
    l_comp = comp.losses(batches, 3)
    torch._dynamo.reset()
    assert l_comp == pytest.approx(l_eager, rel=1e-4, abs=1e-6)
    change = max_weight_change(eager.task.model, init)
    # AdamW's first steps move every weight by ~lr * sign(grad); a gradient within rounding noise of 0
    # can flip sign, so bound the difference by a fraction of the update, not by rounding alone.
    assert max_weight_diff(comp.task.model, eager.task.model) < 0.01 * change


def _student(depth: int = 2, drop_path: float = 0.1) -> DistillModel:
    return DistillModel(StudentConfig(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=2,
                                      drop_path=drop_path), 48)


def test_compile_blocks_in_place_keeps_state_dict_keys():
    model = _student()
    keys = list(model.state_dict())
    out = apply_compile(model, CompileConfig(), scope="blocks", backend="aot_eager")
    assert out is model and list(model.state_dict()) == keys
    assert len(transformer_blocks(model)) == 2
    whole = apply_compile(model, CompileConfig(), scope="whole", backend="aot_eager")
    assert whole is not model
    with pytest.raises(ValueError, match="compile.scope"):
        apply_compile(model, CompileConfig(), scope="layers")
    with pytest.raises(ValueError, match="compile.scope=whole"):
        apply_compile(nn.Linear(2, 2), CompileConfig(), scope="blocks")
    torch._dynamo.reset()


@pytest.mark.parametrize("backend,expect_mode", [(None, True), ("inductor", True), ("aot_eager", False)])
def test_compile_mode_reaches_inductor_only(monkeypatch, backend, expect_mode):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: seen.append(kwargs) or module)
    apply_compile(nn.Linear(2, 2), CompileConfig(mode="max-autotune-no-cudagraphs"), scope="whole", backend=backend)
    assert seen[0]["dynamic"] is False
    assert seen[0].get("mode") == ("max-autotune-no-cudagraphs" if expect_mode else None)
    apply_compile(nn.Linear(2, 2), CompileConfig(), scope="whole", backend=backend)
    assert "mode" not in seen[1]  # the default mode is torch's own default


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_compile_modes_with_cuda_graphs_are_refused_by_the_config(mode):
    """CUDA graphs come from compile.cuda_graph_teacher, never from a mode: the config says so and names
    the valid modes."""
    with pytest.raises(ConfigError, match=rf"compile\.mode: '{mode}' is not one of \['default', "
                                          r"'max-autotune-no-cudagraphs'\]"):
        load_config(None, [f"compile.mode={mode}"])
    assert load_config(None, ["compile.mode=max-autotune-no-cudagraphs"]).compile.mode == "max-autotune-no-cudagraphs"


def test_block_compile_covers_every_block_past_the_recompile_limit():
    """A 12-block student with a drop-path ramp: every block gets a compiled graph. With dynamo's default
    recompile limit (8) the deeper blocks would silently run eagerly."""
    torch._dynamo.reset()
    compiled = []

    def counting_backend(gm, example_inputs):
        compiled.append(gm)
        return gm.forward

    model = _student(depth=12, drop_path=0.3)
    apply_compile(model.encoder, CompileConfig(scope="blocks"), backend=counting_backend)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert len(compiled) > 8, f"only {len(compiled)} block graphs compiled: blocks past the limit ran eagerly"
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# GPU (run by bench/device.sh)
# ----------------------------------------------------------------------------------------------
CUDA = DistInfo(device=torch.device("cuda")) if torch.cuda.is_available() else None


@pytest.mark.gpu
@cuda_only
def test_bf16_fast_step_close_to_fp32_eager_step(tiny_cfg):
    """The full fast configuration (bf16, compiled student + teacher, CUDA-graph teacher, channels-last,
    fused AdamW) follows the fp32 eager step over a few steps."""
    batches = uint8_batches(3, device="cuda")
    ref = build_run(tiny_cfg(**tiny_sections(train={"batch_size": 4, "precision": "fp32"},
                                             optim={"base_lr": 0.2},
                                             compile={"enabled": False, "cuda_graph_teacher": False})), CUDA)
    l_ref = ref.losses(batches, 5)
    fast = build_run(tiny_cfg(**tiny_sections(train={"batch_size": 4, "precision": "bf16"},
                                              optim={"base_lr": 0.2},
                                              compile={"enabled": True, "cuda_graph_teacher": True})), CUDA)
    l_fast = fast.losses(batches, 5)
    torch._dynamo.reset()
    assert fast.task.target.captures == 1
    assert l_fast == pytest.approx(l_ref, rel=3e-2)


def _loss_and_grads(run, images, labels) -> tuple[float, dict]:
    with autocast("bf16", images.device):
        loss = run.task.loss(images, labels)
    loss.backward()
    return float(loss), {n: p.grad.float().clone() for n, p in run.task.model.named_parameters() if p.grad is not None}


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("switches", [
    {"compile": {"enabled": True, "scope": "whole", "cuda_graph_teacher": True}},
    {"compile": {"enabled": True, "scope": "blocks", "cuda_graph_teacher": True}},
    {"compile": {"enabled": True, "scope": "whole", "cuda_graph_teacher": True}, "model": {"attention": "flex"}},
], ids=["as-shipped", "blocks", "flex"])
def test_compiled_loss_and_grads_close_to_eager_bf16(tiny_cfg, switches):
    """Each compiled configuration against the eager bf16 step from the same weights and batch: the loss
    and every gradient agree within bf16 tolerance (relative to the gradient's own size)."""
    images, labels = uint8_batches(1, device="cuda", seed=5)[0]
    eager = build_run(tiny_cfg(**tiny_sections(compile={"enabled": False, "cuda_graph_teacher": False})), CUDA)
    comp = build_run(tiny_cfg(**tiny_sections(**switches)), CUDA)
    l_e, g_e = _loss_and_grads(eager, images, labels)
    l_c, g_c = _loss_and_grads(comp, images, labels)
    torch._dynamo.reset()
    assert l_c == pytest.approx(l_e, rel=2e-2)
    assert g_c.keys() == g_e.keys()
    for name, g in g_e.items():
        assert (g_c[name] - g).norm() <= 0.05 * g.norm() + 1e-6, name
