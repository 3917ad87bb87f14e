"""The training loop: epochs, accumulation, logging cadence, checkpoint cadence, resume.

A *task* (``build_task``) owns the models and the per-micro-batch loss; the loop here only moves
batches into ``TrainStep``, reads metrics every ``train.log_every`` steps (the one place that waits
for the device), writes checkpoints and resumes. Distillation is built in ``build_distill_task``;
fine-tuning and the linear probe in ``fdfast.finetune``.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

import pipelines
from pipelines.generate import make_image_folder

from . import checkpoint as ckpt
from .config import ConfigError, FDConfig, dump_config, to_dict
from .distributed import DistInfo, all_reduce_mean, all_reduce_sum, init_distributed
from .logging import Progress, log
from .models.student import DistillModel, num_tokens, set_attention_kernel
from .optim import Schedule, build_optimizer, param_groups
from .step import TeacherTarget, TrainStep, distill_loss_fn, resolve_precision


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/Inf; the run stops and the last good checkpoint is kept."""


@dataclass
class Task:
    """What the loop needs from a task. ``model`` is the unwrapped trainable module (saved);
    ``train_model`` is what runs (compiled / DDP)."""

    model: nn.Module
    train_model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    groups: list[dict]
    evaluate: Optional[Callable[[], dict]] = None
    extra_state: dict = field(default_factory=dict)
    teacher: Optional[nn.Module] = None  # frozen, outside DDP and the optimizer
    target_fn: Optional[Callable] = None  # uint8 images -> whitened teacher tokens


def seed_all(seed: int) -> None:
    import random  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_model(model: nn.Module, cfg: FDConfig, info: DistInfo) -> nn.Module:
    """What every task does to its trainable model before wrapping: process-wide backend flags (TF32,
    cudnn.benchmark), the device, channels-last memory and the attention kernel."""
    from .fast import apply_backend_settings  # noqa: PLC0415

    apply_backend_settings(cfg, info.device)
    model = model.to(info.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    set_attention_kernel(model, cfg.train.attention)
    return model


def wrap_for_training(model: nn.Module, cfg: FDConfig, info: DistInfo,
                      compile_backend: Optional[str] = None) -> nn.Module:
    """Compile (before DDP, as timm's distillation task does), then DDP over the trainable module.
    ``compile_backend`` (e.g. 'aot_eager') is for CPU checks of the compiled path."""
    run = model
    if cfg.train.compile:
        from .fast import compile_student  # noqa: PLC0415

        run = compile_student(model, cfg, backend=compile_backend)
    if info.enabled:
        kwargs = {"device_ids": [info.local_rank]} if info.device.type == "cuda" else {}
        run = nn.parallel.DistributedDataParallel(run, broadcast_buffers=False, **kwargs)
    return run


def build_target_fn(teacher: nn.Module, cfg: FDConfig, device: torch.device,
                    compile_backend: Optional[str] = None) -> Callable:
    target = TeacherTarget(teacher, cfg.model.whiten_eps)
    if cfg.train.cuda_graph_teacher or cfg.train.compile:
        from .fast import build_fast_target  # noqa: PLC0415

        return build_fast_target(target, cfg, device, backend=compile_backend)
    return target


def build_distill_task(cfg: FDConfig, info: DistInfo, compile_backend: Optional[str] = None) -> Task:
    from .models.teachers import build_teacher  # noqa: PLC0415

    s = cfg.model.student
    teacher = build_teacher(cfg.model.teacher, s.img_size).to(info.device)
    if teacher.num_tokens != num_tokens(s):
        raise ConfigError(
            f"student ({s.arch}, img {s.img_size}, patch {s.patch_size}) gives {num_tokens(s)} tokens but the "
            f"teacher {cfg.model.teacher.model!r} gives {teacher.num_tokens}; FD matches tokens index by index, "
            "so change model.student.img_size/patch_size or model.teacher.img_size")
    model = prepare_model(DistillModel(s, teacher.embed_dim), cfg, info)
    groups = param_groups(model, cfg.optim, s)
    run = wrap_for_training(model, cfg, info, compile_backend)
    target_fn = build_target_fn(teacher, cfg, info.device, compile_backend)
    return Task(model=model, train_model=run, loss_fn=distill_loss_fn(run, target_fn, cfg.model.loss_beta),
                groups=groups, teacher=teacher, target_fn=target_fn)


def build_task(cfg: FDConfig, info: DistInfo) -> Task:
    if cfg.train.task == "distill":
        return build_distill_task(cfg, info)
    from .finetune import build_finetune_task  # noqa: PLC0415

    return build_finetune_task(cfg, info)


def build_training(task: Task, cfg: FDConfig, info: DistInfo, steps_per_epoch: int,
                   ) -> tuple[torch.optim.Optimizer, TrainStep, Schedule]:
    """Optimizer, step and LR schedule for a task (LR scaled by the total batch over all ranks)."""
    tr = cfg.train
    precision = resolve_precision(tr.precision, info.device)
    optimizer = build_optimizer(task.groups, cfg.optim, info.device)
    params = [p for g in task.groups for p in g["params"]]
    step_fn = TrainStep(task.train_model, task.loss_fn, optimizer, params, precision=precision,
                        device=info.device, clip_grad=cfg.optim.clip_grad)
    total_batch = tr.batch_size * info.world_size * tr.accum_steps
    schedule = Schedule(cfg.optim, total_batch, steps_per_epoch, tr.epochs, [g["lr_scale"] for g in task.groups])
    return optimizer, step_fn, schedule


def prepare_data(cfg: FDConfig, info: DistInfo) -> None:
    """Demo convenience: write a synthetic ImageFolder where data.train / data.val are missing."""
    if not cfg.data.generate_if_missing or cfg.data.backend == "synthetic":
        return
    if info.is_main:
        for i, path in enumerate((cfg.data.train, cfg.data.val)):
            if path and not Path(path).exists():
                log(f"generating a synthetic image folder at {path}")
                make_image_folder(path, num_classes=min(cfg.data.num_classes, 8), per_class=64 if i == 0 else 16,
                                  seed=cfg.train.seed + i)
    from .distributed import barrier  # noqa: PLC0415

    barrier()


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    """After a resume, drop metric lines logged after the checkpoint (they will be re-logged)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    path.write_text("".join(line + "\n" for line in keep))


def train(cfg: FDConfig, info: Optional[DistInfo] = None,
          on_end: Optional[Callable[[Task], None]] = None) -> dict[str, Any]:
    """Run (or resume) the configured task; returns a summary dict. ``on_end(task)`` is called on
    every rank after the final checkpoint (tests use it to compare ranks' in-memory weights)."""
    info = info or init_distributed()
    out = Path(cfg.train.output_dir)
    precision = resolve_precision(cfg.train.precision, info.device)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, out / "config.yaml")
    prepare_data(cfg, info)

    # Same init on every rank (DDP also broadcasts rank 0's weights), then per-rank streams.
    seed_all(cfg.train.seed)
    task = build_task(cfg, info)
    seed_all(cfg.train.seed + info.rank)

    tr = cfg.train
    loader = pipelines.build_loader(cfg.data, train=True, batch_size=tr.batch_size,
                                    img_size=cfg.model.student.img_size, device=info.device,
                                    rank=info.rank, world_size=info.world_size, seed=tr.seed)
    steps_per_epoch = len(loader) // tr.accum_steps
    if steps_per_epoch == 0:
        raise ConfigError(f"{len(loader)} batches per epoch is fewer than train.accum_steps={tr.accum_steps}")
    total_steps = steps_per_epoch * tr.epochs
    last_step = min(total_steps, tr.max_steps) if tr.max_steps else total_steps
    total_batch = tr.batch_size * info.world_size * tr.accum_steps

    optimizer, step_fn, schedule = build_training(task, cfg, info, steps_per_epoch)

    step = resumed_at = 0
    best: dict[str, Any] = {}
    metrics_path = out / "metrics.jsonl"
    latest = ckpt.find_latest(out, info.world_size) if tr.resume else None
    if latest is not None:
        state, rng = ckpt.load_checkpoint(latest, info.rank, map_location=info.device)
        task.model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step_fn.load_state_dict(state["step_state"])
        for k, v in state.get("extra", {}).items():
            task.extra_state[k] = v
        best = dict(state.get("best", {}))
        step = resumed_at = int(state["step"])
        if rng is not None:
            ckpt.set_rng_state(rng)
        if info.is_main:
            _truncate_metrics(metrics_path, step)
            log(f"resumed from {latest} at step {step} (epoch {step // steps_per_epoch})")

    def save(at: int) -> None:
        state = {"model": task.model.state_dict(), "optimizer": optimizer.state_dict(),
                 "step_state": step_fn.state_dict(), "step": at, "epoch": at // steps_per_epoch,
                 "steps_per_epoch": steps_per_epoch, "config": to_dict(cfg), "best": best,
                 "extra": task.extra_state}
        path = ckpt.save_checkpoint(out, at, state, rank=info.rank, keep=tr.keep_ckpts)
        if path is not None:
            log(f"checkpoint {path}")

    if info.is_main:
        log(f"task={tr.task} steps={last_step} (epoch = {steps_per_epoch} steps of {total_batch} images) "
            f"device={info.device} x{info.world_size} precision={precision} backend={cfg.data.backend}")
    progress = Progress(total=last_step, start=step, enabled=info.is_main, mode=tr.progress)
    bad = torch.zeros((), dtype=torch.bool, device=info.device)
    last_loss = float("nan")
    window_t0, window_steps, data_wait = time.perf_counter(), 0, 0.0
    t_start = time.perf_counter()

    def check_finite(at: int) -> None:
        # agreed across ranks: a rank that stopped alone would leave the others waiting in the next
        # collective (the all-reduce of the loss, or the checkpoint barrier)
        if bool(all_reduce_sum(bad.float())):
            raise NonFiniteLoss(f"loss became NaN/Inf at or before step {at}; stopping. The last good checkpoint "
                                f"in {ckpt.ckpt_root(out)} is intact: lower optim.base_lr, enable optim.clip_grad, "
                                "or use train.precision=fp32/bf16, then rerun to resume from it")

    try:
        while step < last_step:
            epoch = step // steps_per_epoch
            loader.set_epoch(epoch, (step % steps_per_epoch) * tr.accum_steps)
            it = iter(loader)
            epoch_end = min((epoch + 1) * steps_per_epoch, last_step)
            while step < epoch_end:
                t0 = time.perf_counter()
                batches = [next(it) for _ in range(tr.accum_steps)]
                data_wait += time.perf_counter() - t0
                lrs = schedule(step)
                step_fn.set_lr(lrs)
                out_t = step_fn(batches)
                bad |= ~torch.isfinite(out_t["loss"])
                step += 1
                window_steps += 1
                if step % tr.log_every == 0 or step == last_step:
                    loss = all_reduce_mean(out_t["loss"].detach().clone())
                    check_finite(step)
                    now = time.perf_counter()
                    dt = now - window_t0
                    rec = {"step": step, "epoch": step / steps_per_epoch, "loss": float(loss),
                           "grad_norm": float(out_t["grad_norm"]), "lr": lrs[-1],
                           "img_per_s_per_device": window_steps * tr.batch_size * tr.accum_steps / dt,
                           "data_wait": data_wait / dt, "time": now - t_start}
                    last_loss = rec["loss"]
                    if info.is_main:
                        _append_jsonl(metrics_path, rec)
                    progress.update(step, rec)
                    window_t0, window_steps, data_wait = now, 0, 0.0
                if step % tr.ckpt_every == 0 and step != last_step:
                    check_finite(step)
                    save(step)
            del it
            if task.evaluate is not None and (step % steps_per_epoch == 0 or step == last_step):
                ep = math.ceil(step / steps_per_epoch)
                if ep % tr.eval_every == 0 or step == last_step:
                    res = task.evaluate()
                    res.update(step=step, epoch=ep, kind="eval")
                    if res.get("top1", -1) > best.get("top1", -1):
                        best = dict(res)
                    if info.is_main:
                        _append_jsonl(metrics_path, res)
                        log(f"eval epoch {ep}: " + ", ".join(f"{k}={v:.4f}" for k, v in res.items()
                                                              if isinstance(v, float)))
        check_finite(step)
        if latest is None or step > resumed_at:  # a rerun of a finished job rewrites nothing
            save(step)
    finally:
        progress.close()
    if on_end is not None:
        on_end(task)
    summary = {"step": step, "loss": last_loss, "best": best, "output_dir": str(out),
               "seconds": time.perf_counter() - t_start}
    if info.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
