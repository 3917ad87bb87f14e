"""The FD step: what receives gradients, what stays frozen, what it returns."""
import copy

import pytest
import torch

from fdfast.distributed import DistInfo
from fdfast.optim import build_optimizer
from fdfast.step import TrainStep
from fdfast.tasks import DistillTask


def _setup(cfg):
    torch.manual_seed(0)
    task = DistillTask(cfg, DistInfo())
    opt = build_optimizer(task.groups, cfg.optim, torch.device("cpu"))
    params = [p for g in task.groups for p in g["params"]]
    step = TrainStep(task.train_model, task.loss, opt, params, precision="fp32", device=torch.device("cpu"),
                     clip_grad=cfg.optim.clip_grad)
    step.set_lr([1e-3] * len(opt.param_groups))
    return task, step


def _batch(n=4, size=32):
    img = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    return img, torch.zeros(n, dtype=torch.long)


def test_only_student_and_projector_train_and_teacher_is_bit_identical(tiny_cfg):
    task, step = _setup(tiny_cfg())
    teacher = task.teacher
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in task.model.state_dict().items()}
    assert all(not p.requires_grad for p in teacher.parameters())
    assert not any(p is q for p in teacher.parameters() for q in task.model.parameters())

    out = step([_batch()])
    assert set(out) == {"loss", "grad_norm", "skipped"}
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in out.values())
    assert torch.isfinite(out["loss"]) and out["loss"] > 0 and not out["skipped"]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_t[k]), f"teacher tensor {k} changed"
    assert not teacher.training
    changed = [k for k, v in task.model.state_dict().items() if not torch.equal(v, before_s[k])]
    assert any(k.startswith("encoder.") for k in changed) and "decoder.weight" in changed
    assert all(p.grad is None for p in teacher.parameters())


def test_accumulation_equals_big_batch(tiny_cfg):
    cfg = tiny_cfg(model={"student": {"drop_path": 0.0}})
    img, lab = _batch(8)
    _, step_a = _setup(cfg)
    out_a = step_a([(img, lab)])
    task_b, step_b = _setup(cfg)
    out_b = step_b([(img[:4], lab[:4]), (img[4:], lab[4:])])
    assert torch.allclose(out_a["loss"], out_b["loss"], atol=1e-6)
    assert torch.allclose(out_a["grad_norm"], out_b["grad_norm"], rtol=1e-4)
    wa = step_a.model.state_dict()
    for k, v in task_b.model.state_dict().items():
        assert torch.allclose(wa[k], v, atol=1e-6), k


def test_gradient_clipping_caps_the_update(tiny_cfg):
    cfg = tiny_cfg(optim={"clip_grad": 1e-4})
    _, step = _setup(cfg)
    out = step([_batch()])
    # grad_norm reports the pre-clip norm; the clipped norm is 1e-4 < the raw one
    assert out["grad_norm"] > 1e-4


@pytest.mark.parametrize("fused", [True, False])
def test_infinite_gradient_skips_the_update_instead_of_poisoning_the_weights(tiny_cfg, fused):
    """An Inf gradient with a finite loss: clipping turns it into NaN updates. The step must leave every
    weight and the optimizer state as they were, report the skip, and train normally on the next batch."""
    cfg = tiny_cfg(optim={"fused": fused})
    task, step = _setup(cfg)
    step([_batch()])  # one normal step: optimizer state exists
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    opt_before = copy.deepcopy(step.optimizer.state_dict())
    hook = task.model.decoder.weight.register_hook(lambda g: g * float("inf"))
    out = step([_batch()])
    hook.remove()
    assert torch.isfinite(out["loss"]) and not torch.isfinite(out["grad_norm"]) and bool(out["skipped"])
    assert all(torch.equal(v, before[k]) for k, v in task.model.state_dict().items())
    after = step.optimizer.state_dict()
    for pid, st in opt_before["state"].items():
        assert all(torch.equal(st[k], after["state"][pid][k]) for k in st), "optimizer state moved on a skipped step"
    out = step([_batch()])
    assert not out["skipped"] and all(torch.isfinite(v).all() for v in task.model.state_dict().values())
    assert any(not torch.equal(v, before[k]) for k, v in task.model.state_dict().items())


def _grads_after_one_step(cfg):
    torch.manual_seed(0)
    task = DistillTask(cfg, DistInfo())
    torch.manual_seed(1)  # same drop-path draws for both runs
    loss = task.loss(*_batch())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["beit", "swinv2"])
def test_grad_checkpointing_leaves_loss_and_gradients_unchanged(tiny_cfg, arch):
    """Recomputing activations in backward (with drop path active, so the RNG replay matters) gives the
    same loss and gradients as storing them; and checkpointing is really on (timm's flag set)."""
    sections = {"model": {"student": {"drop_path": 0.3}}}
    if arch == "swinv2":
        sections = {"model": {"student": {"arch": "swinv2", "img_size": 32, "patch_size": 2, "embed_dim": 16,
                                          "depth": [2, 2], "num_heads": [2, 4], "window_size": 4, "drop_path": 0.3},
                              "teacher": {"kind": "esvit", "model": "swin_tiny_patch4_window7_224",
                                          "model_kwargs": {"patch_size": 2, "embed_dim": 16, "depths": [2, 2],
                                                           "num_heads": [2, 4], "window_size": 4}}}}
    plain_loss, plain = _grads_after_one_step(tiny_cfg(**sections))
    sections["model"]["grad_checkpointing"] = True
    cfg = tiny_cfg(**sections)
    ckpt_loss, ckpt = _grads_after_one_step(cfg)
    model = DistillTask(cfg, DistInfo()).model  # Beit keeps the flag on the network, SwinV2 on its stages
    assert any(getattr(m, "grad_checkpointing", False) is True for m in model.modules())
    assert torch.equal(plain_loss, ckpt_loss)
    assert plain.keys() == ckpt.keys() and len(plain) > 10
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7, msg=k)
