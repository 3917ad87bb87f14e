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
