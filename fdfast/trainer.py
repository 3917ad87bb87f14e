"""The training loop: epochs, accumulation, logging cadence, checkpoint cadence, resume.

A *task* (``fdfast.tasks``, picked by ``train.task``) owns the models and the per-micro-batch loss;
:class:`Trainer` owns everything around it: the loader, the optimizer, the LR schedule, the
:class:`~fdfast.step.TrainStep`, and the loop, which moves batches into the step, reads metrics every
``log.every`` steps (the one place that waits for the device), evaluates, writes checkpoints and
resumes. ``Trainer.state_dict()`` is exactly what a checkpoint holds.
"""
from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

import pipelines

from . import checkpoint as ckpt
from .config import ConfigError, FDConfig, dump_config, to_dict
from .distributed import DistInfo, all_reduce_mean, all_reduce_sum, init_distributed
from .logging import Progress, append_jsonl, log
from .optim import Schedule, build_optimizer
from .step import TrainStep, resolve_precision
from .tasks import TASKS, Task


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/Inf; the run stops and the last good checkpoint is kept."""


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_task(cfg: FDConfig, info: DistInfo, compile_backend: Optional[str] = None) -> Task:
    """The task of ``train.task``; ``compile_backend`` (distillation only) is for CPU checks of the
    compiled path."""
    if cfg.train.task == "distill":
        return TASKS["distill"](cfg, info, compile_backend=compile_backend)
    return TASKS[cfg.train.task](cfg, info)


def build_training(task: Task, cfg: FDConfig, info: DistInfo, steps_per_epoch: int,
                   ) -> tuple[torch.optim.Optimizer, TrainStep, Schedule]:
    """Optimizer, step and LR schedule for a task (LR scaled by the total batch over all ranks)."""
    tr = cfg.train
    precision = resolve_precision(tr.precision, info.device)
    optimizer = build_optimizer(task.groups, cfg.optim, info.device)
    params = [p for g in task.groups for p in g["params"]]
    step_fn = TrainStep(task.train_model, task.loss, optimizer, params, precision=precision,
                        device=info.device, clip_grad=cfg.optim.clip_grad)
    total_batch = tr.batch_size * info.world_size * tr.accum_steps
    schedule = Schedule(cfg.optim, total_batch, steps_per_epoch, tr.epochs, [g["lr_scale"] for g in task.groups])
    return optimizer, step_fn, schedule


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


class Trainer:
    """Builds a run from its config (task, loader, optimizer, step, schedule) and trains it with
    :meth:`fit`. Every rank builds the same :class:`Trainer`; rank 0 writes the shared files."""

    def __init__(self, cfg: FDConfig, info: Optional[DistInfo] = None):
        self.cfg = cfg
        self.info = info = info or init_distributed()
        self.out = Path(cfg.train.output_dir)
        tr = cfg.train
        self.precision = resolve_precision(tr.precision, info.device)  # fails fast for fp16 on a CPU
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.out / "config.yaml")

        # Same init on every rank (DDP also broadcasts rank 0's weights), then per-rank streams.
        seed_all(tr.seed)
        self.task = build_task(cfg, info)
        seed_all(tr.seed + info.rank)

        self.loader = pipelines.build_loader(cfg.data, train=True, batch_size=tr.batch_size,
                                             img_size=cfg.model.student.img_size, device=info.device,
                                             rank=info.rank, world_size=info.world_size, seed=tr.seed)
        self.steps_per_epoch = len(self.loader) // tr.accum_steps
        if self.steps_per_epoch == 0:
            raise ConfigError(f"{len(self.loader)} batches per epoch is fewer than train.accum_steps={tr.accum_steps}")
        total_steps = self.steps_per_epoch * tr.epochs
        self.last_step = min(total_steps, tr.max_steps) if tr.max_steps else total_steps
        self.total_batch = tr.batch_size * info.world_size * tr.accum_steps
        self.optimizer, self.step_fn, self.schedule = build_training(self.task, cfg, info, self.steps_per_epoch)
        self.step = 0
        self.best: dict[str, Any] = {}
        self.metrics_path = self.out / "metrics.jsonl"

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint holds (tensors and plain values only: ``weights_only=True`` reads it)."""
        return {"model": self.task.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step_state": self.step_fn.state_dict(), "step": self.step,
                "epoch": self.step // self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
                "config": to_dict(self.cfg), "best": self.best, "extra": self.task.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_fn.load_state_dict(state["step_state"])
        self.task.load_state_dict(state.get("extra", {}))
        self.best = dict(state.get("best", {}))
        self.step = int(state["step"])

    def resume(self) -> Optional[Path]:
        """Load the newest complete checkpoint of ``output_dir`` (with this rank's RNG state), if any."""
        latest = ckpt.find_latest(self.out, self.info.world_size) if self.cfg.train.resume else None
        if latest is None:
            return None
        state, rng = ckpt.load_checkpoint(latest, self.info.rank, map_location=self.info.device)
        self.load_state_dict(state)
        if rng is not None:
            ckpt.set_rng_state(rng)
        if self.info.is_main:
            _truncate_metrics(self.metrics_path, self.step)
            log(f"resumed from {latest} at step {self.step} (epoch {self.step // self.steps_per_epoch})")
        return latest

    def save(self) -> None:
        path = ckpt.save_checkpoint(self.out, self.step, self.state_dict(), rank=self.info.rank,
                                    keep=self.cfg.checkpoint.keep)
        if path is not None:
            log(f"checkpoint {path}")

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        cfg, info, tr = self.cfg, self.info, self.cfg.train
        latest = self.resume()
        resumed_at = self.step
        spe, last_step = self.steps_per_epoch, self.last_step
        if info.is_main:
            log(f"task={tr.task} steps={last_step} (epoch = {spe} steps of {self.total_batch} images) "
                f"device={info.device} x{info.world_size} precision={self.precision} backend={cfg.data.backend}")
        progress = Progress(total=last_step, start=self.step, enabled=info.is_main, mode=cfg.log.progress)
        bad = torch.zeros((), dtype=torch.bool, device=info.device)
        last_loss = float("nan")
        window_t0, window_steps, data_wait = time.perf_counter(), 0, 0.0
        t_start = time.perf_counter()

        def check_finite(at: int) -> None:
            # agreed across ranks: a rank that stopped alone would leave the others waiting in the next
            # collective (the all-reduce of the loss, or the checkpoint barrier)
            if bool(all_reduce_sum(bad.float())):
                raise NonFiniteLoss(f"loss became NaN/Inf at or before step {at}; stopping. The last good "
                                    f"checkpoint in {ckpt.ckpt_root(self.out)} is intact: lower optim.base_lr, "
                                    "enable optim.clip_grad, or use train.precision=fp32/bf16, then rerun to "
                                    "resume from it")

        try:
            while self.step < last_step:
                epoch = self.step // spe
                self.loader.set_epoch(epoch, (self.step % spe) * tr.accum_steps)
                it = iter(self.loader)
                epoch_end = min((epoch + 1) * spe, last_step)
                while self.step < epoch_end:
                    t0 = time.perf_counter()
                    batches = [next(it) for _ in range(tr.accum_steps)]
                    data_wait += time.perf_counter() - t0
                    lrs = self.schedule(self.step)
                    self.step_fn.set_lr(lrs)
                    out_t = self.step_fn(batches)
                    bad |= ~torch.isfinite(out_t["loss"])
                    self.step += 1
                    window_steps += 1
                    if self.step % cfg.log.every == 0 or self.step == last_step:
                        loss = all_reduce_mean(out_t["loss"].detach().clone())
                        check_finite(self.step)
                        now = time.perf_counter()
                        dt = now - window_t0
                        rec = {"step": self.step, "epoch": self.step / spe, "loss": float(loss),
                               "grad_norm": float(out_t["grad_norm"]), "lr": lrs[-1],
                               "img_per_s_per_device": window_steps * tr.batch_size * tr.accum_steps / dt,
                               "data_wait": data_wait / dt, "time": now - t_start}
                        last_loss = rec["loss"]
                        if info.is_main:
                            append_jsonl(self.metrics_path, rec)
                        progress.update(self.step, rec)
                        window_t0, window_steps, data_wait = now, 0, 0.0
                    if self.step % cfg.checkpoint.every == 0 and self.step != last_step:
                        check_finite(self.step)
                        self.save()
                del it
                if self.task.can_evaluate and (self.step % spe == 0 or self.step == last_step):
                    self._maybe_evaluate()
            check_finite(self.step)
            if latest is None or self.step > resumed_at:  # a rerun of a finished job rewrites nothing
                self.save()
        finally:
            progress.close()
        summary = {"step": self.step, "loss": last_loss, "best": self.best, "output_dir": str(self.out),
                   "seconds": time.perf_counter() - t_start}
        if info.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _maybe_evaluate(self) -> None:
        ep = math.ceil(self.step / self.steps_per_epoch)
        if ep % self.cfg.train.eval_every != 0 and self.step != self.last_step:
            return
        res = self.task.evaluate()
        res.update(step=self.step, epoch=ep, kind="eval")
        if res.get("top1", -1) > self.best.get("top1", -1):
            self.best = dict(res)
        if self.info.is_main:
            append_jsonl(self.metrics_path, res)
            log(f"eval epoch {ep}: " + ", ".join(f"{k}={v:.4f}" for k, v in res.items() if isinstance(v, float)))


def train(cfg: FDConfig, info: Optional[DistInfo] = None,
          on_end: Optional[Callable[[Task], None]] = None) -> dict[str, Any]:
    """Run (or resume) the configured task; returns a summary dict. ``on_end(task)`` is called on
    every rank after the final checkpoint (tests use it to compare ranks' in-memory weights)."""
    trainer = Trainer(cfg, info)
    summary = trainer.fit()
    if on_end is not None:
        on_end(trainer.task)
    return summary
