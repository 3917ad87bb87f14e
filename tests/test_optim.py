import math

import pytest
import torch

from fdfast.config import OptimConfig, StudentConfig
from fdfast.models.student import DistillModel
from fdfast.optim import Schedule, lr_at, param_groups, scaled_lrs


def test_lr_scaling_per_512():
    cfg = OptimConfig(base_lr=3e-4, warmup_lr=5e-7, min_lr=5e-6)
    peak, warm, low = scaled_lrs(cfg, total_batch=128 * 16)
    assert (peak, warm, low) == pytest.approx((1.2e-3, 2e-6, 2e-5))


def test_schedule_values():
    # 10 steps/epoch, 100 epochs, 10 warm-up epochs
    total, warm, peak, w0, low = 1000, 100, 1.2e-3, 2e-6, 2e-5
    assert lr_at(0, total, warm, peak, w0, low) == pytest.approx(w0)
    assert lr_at(50, total, warm, peak, w0, low) == pytest.approx((w0 + peak) / 2)
    assert lr_at(100, total, warm, peak, w0, low) == pytest.approx(peak)          # warm-up end
    assert lr_at(550, total, warm, peak, w0, low) == pytest.approx((peak + low) / 2)  # cosine midpoint
    assert lr_at(999, total, warm, peak, w0, low) == pytest.approx(low, rel=1e-3)
    assert lr_at(1000, total, warm, peak, w0, low) == pytest.approx(low)


def test_schedule_matches_timm_cosine_scheduler():
    from timm.scheduler import CosineLRScheduler
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.2e-3)
    total, warm = 200, 20
    sched = CosineLRScheduler(opt, t_initial=total - warm, lr_min=2e-5, warmup_lr_init=2e-6, warmup_t=warm,
                              cycle_limit=1, t_in_epochs=False, warmup_prefix=True)
    for t in (0, 7, 20, 21, 110, 199):
        sched.step_update(t)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(t, total, warm, 1.2e-3, 2e-6, 2e-5))


def test_schedule_applies_lr_as_the_official_loop_does():
    """Official train_one_epoch: the step runs with the optimizer's current LR, then
    lr_scheduler.step_update(epoch * num_steps + idx). So step t runs at the schedule's t - 1, and steps
    0 and 1 both at warmup_lr (timm's scheduler sets warmup_lr_init when it is built)."""
    from timm.scheduler import CosineLRScheduler
    steps_per_epoch, epochs, warm_epochs = 7, 5, 2
    cfg = OptimConfig(base_lr=512e-3, warmup_lr=512e-6, min_lr=512e-5, warmup_epochs=warm_epochs)
    peak, w0, low = scaled_lrs(cfg, 512)
    total, warm = steps_per_epoch * epochs, steps_per_epoch * warm_epochs
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=peak)
    sched = CosineLRScheduler(opt, t_initial=total - warm, lr_min=low, warmup_lr_init=w0, warmup_t=warm,
                              cycle_limit=1, t_in_epochs=False, warmup_prefix=True)
    official = []
    for epoch in range(epochs):
        for idx in range(steps_per_epoch):
            official.append(opt.param_groups[0]["lr"])  # what this optimizer step runs with
            sched.step_update(epoch * steps_per_epoch + idx)
    ours = [Schedule(cfg, 512, steps_per_epoch, epochs, [1.0])(t)[0] for t in range(total)]
    assert ours == pytest.approx(official, rel=1e-12, abs=0)
    assert ours[0] == ours[1] == pytest.approx(w0)


def test_layer_decay_scales_only_the_peak():
    cfg = OptimConfig(base_lr=512e-3, warmup_lr=512e-6, min_lr=512e-5, warmup_epochs=1)
    s = Schedule(cfg, 512, steps_per_epoch=10, epochs=10, lr_scales=[0.5, 1.0])
    assert s(0) == pytest.approx([0.512e-3, 0.512e-3])  # both groups start at warmup_lr
    assert s(11) == pytest.approx([0.5 * 0.512, 0.512])  # step 11 runs at the schedule's step 10
    assert s(101) == pytest.approx([5.12e-3, 5.12e-3])


def _names(groups, wd):
    return {n for g in groups if (g["weight_decay"] > 0) == wd for n in g["names"]}


def test_no_weight_decay_rules_vit():
    s = StudentConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = DistillModel(s, 48)
    groups = param_groups(model, OptimConfig(), s)
    no_wd = _names(groups, wd=False)
    wd = _names(groups, wd=True)
    assert "encoder.cls_token" in no_wd
    assert {"encoder.blocks.0.gamma_1", "encoder.blocks.0.attn.q_bias", "encoder.blocks.0.attn.v_bias",
            "encoder.blocks.0.norm1.weight", "encoder.norm.bias", "decoder.bias"} <= no_wd
    # the official code decays the shared RPB table (2-D, no keyword list for ViT) and the projector
    assert {"encoder.rel_pos_bias.relative_position_bias_table", "decoder.weight",
            "encoder.patch_embed.proj.weight", "encoder.blocks.1.mlp.fc1.weight"} <= wd
    groups = param_groups(model, OptimConfig(decay_rel_pos_bias=False), s)
    assert "encoder.rel_pos_bias.relative_position_bias_table" in _names(groups, wd=False)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_no_weight_decay_rules_swin():
    s = StudentConfig(arch="swinv2", img_size=32, patch_size=2, embed_dim=16, depth=[2, 2], num_heads=[2, 4],
                      window_size=4)
    model = DistillModel(s, 48)
    groups = param_groups(model, OptimConfig(), s)
    no_wd, wd = _names(groups, wd=False), _names(groups, wd=True)
    assert any("cpb_mlp" in n and n.endswith("weight") for n in no_wd)  # 2-D but keyword-excluded
    assert any("logit_scale" in n for n in no_wd)
    assert not any("cpb_mlp" in n or "logit_scale" in n for n in wd)
    assert "encoder.layers.0.blocks.0.attn.qkv.weight" in wd
    assert math.isclose(groups[0]["lr_scale"], 1.0)


def _official_lrs(cfg: OptimConfig, total_batch: int, batches_per_epoch: int, epochs: int, accum: int) -> list:
    """The LR each optimizer step of the official loop runs with (see the test below)."""
    from timm.scheduler import CosineLRScheduler
    peak, w0, low = scaled_lrs(cfg, total_batch)
    total, warm = batches_per_epoch * epochs, int(cfg.warmup_epochs * batches_per_epoch)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = CosineLRScheduler(opt, t_initial=total - warm, lr_min=low, warmup_lr_init=w0, warmup_t=warm,
                              cycle_limit=1, t_in_epochs=False, warmup_prefix=True)
    lrs = []
    for epoch in range(epochs):
        for idx in range(batches_per_epoch):
            if (idx + 1) % accum == 0:
                lrs.append(opt.param_groups[0]["lr"])
                sched.step_update(epoch * batches_per_epoch + idx)
    return lrs


@pytest.mark.parametrize("accum, batches_per_epoch", [(4, 28), (3, 23)])
def test_with_accumulation_the_schedule_counts_micro_batches_as_the_official_loop(accum, batches_per_epoch):
    """Official train_one_epoch with ACCUMULATION_STEPS = A: the scheduler is built over len(loader)
    micro-batches per epoch and step_update(epoch * num_steps + idx) follows each optimizer step, idx being the
    micro-batch that ended it; leftover micro-batches (len % A) make no step. fdfast's step k must run at the
    LR the official optimizer holds when it takes its k-th step."""
    epochs = 4
    cfg = OptimConfig(base_lr=512e-3, warmup_lr=512e-6, min_lr=512e-5, warmup_epochs=1.5)
    official = _official_lrs(cfg, 512, batches_per_epoch, epochs, accum)
    steps_per_epoch = batches_per_epoch // accum
    schedule = Schedule(cfg, 512, steps_per_epoch, epochs, [1.0], accum_steps=accum,
                        batches_per_epoch=batches_per_epoch)
    ours = [schedule(t)[0] for t in range(steps_per_epoch * epochs)]
    assert len(ours) == len(official)
    assert ours == pytest.approx(official, rel=1e-12, abs=0)
    assert ours[1] > ours[0] == pytest.approx(scaled_lrs(cfg, 512)[1])  # step 1: A - 1 micro-batches into warm-up


def test_the_trainer_with_accumulation_runs_the_official_lr_per_step(tiny_cfg, tmp_path):
    import json

    from fdfast.trainer import train
    cfg = tiny_cfg(train={"accum_steps": 2, "epochs": 2}, data={"synthetic_size": 40}, checkpoint={"every": 100})
    train(cfg)  # 40 images of 8 = 5 micro-batches per epoch: 2 optimizer steps, one micro-batch left over
    logged = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
              if "lr" in r]
    assert logged == pytest.approx(_official_lrs(cfg.optim, 16, 5, 2, 2), rel=1e-12, abs=0)
