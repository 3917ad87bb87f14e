"""The training loop: epochs, accumulation, logging cadence, checkpoint cadence, resume, clean stops.

A *task* (``fdfast.tasks``, picked by ``train.task``) owns the models and the per-micro-batch loss;
:class:`Trainer` owns everything around it: the loader, the optimizer, the LR schedule, the
:class:`~fdfast.step.TrainStep`, and the loop, which moves batches into the step, reads metrics every
``log.every`` steps (the one place that waits for the device), evaluates, writes checkpoints and
resumes (``fdfast.resume``). ``Trainer.state_dict()`` is exactly what a checkpoint holds.

Safety (``fdfast.guard``, ``fdfast.checkpoint``): one run per output folder (a lock); SIGTERM / SIGINT /
SIGUSR1 finish the current step, write a checkpoint and a ``preempted`` record (``fdfast.records``) and exit
with ``EXIT_PREEMPTED``; a step whose gradient norm is NaN/Inf is skipped (counted in ``skipped_steps``), a
NaN/Inf loss stops the run before anything else is saved, and no checkpoint ever holds a non-finite tensor.
A peer process that dies makes the survivors raise :class:`~fdfast.distributed.LostRank` (one line).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import pipelines

from . import checkpoint as ckpt
from .config import ConfigError, FDConfig, to_dict
from .distributed import (DistInfo, all_reduce_mean, any_rank, broadcast_object, init_distributed, is_lost_peer,
                          lost_rank, max_rank)
from .errors import UserError
from .guard import RunLock, StopRequest
from .logging import Progress, log
from .tracking import Tracker, device_peak_memory_gib, run_environment
from .optim import Schedule, build_optimizer
from .records import note_resume, record_preemption, signal_name, write_config, write_summary
from .resume import check_config_drift, check_state_fits, choose_checkpoint, map_position
from .rng import seed_all, set_rng_state
from .step import TrainStep, resolve_precision
from .tasks import TASKS, EvaluationStopped, Task
from .tasks.classes import resolve_num_classes
from .tasks.evaluation import StopCheck


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/Inf; the run stops and the last good checkpoint is kept."""


class Preempted(Exception):
    """A stop signal arrived; a checkpoint of the current step was written."""


def build_task(cfg: FDConfig, info: DistInfo, compile_backend: Optional[str] = None, *,
               trust_pickle: bool = False) -> Task:
    """The task of ``train.task``; ``compile_backend`` (distillation only) is for CPU checks of the
    compiled path; ``trust_pickle`` (the command line's ``--trust-pickle``) allows model files that pickle code."""
    if cfg.train.task == "distill":
        return TASKS["distill"](cfg, info, compile_backend=compile_backend, trust_pickle=trust_pickle)
    return TASKS[cfg.train.task](cfg, info, trust_pickle=trust_pickle)


def build_training(task: Task, cfg: FDConfig, info: DistInfo, steps_per_epoch: int,
                   batches_per_epoch: Optional[int] = None) -> tuple[torch.optim.Optimizer, TrainStep, Schedule]:
    """Optimizer, step and LR schedule for a task (LR scaled by the total batch over all ranks; the
    schedule counts the loader's ``batches_per_epoch`` micro-batches, as the official one does)."""
    tr = cfg.train
    precision = resolve_precision(tr.precision, info.device)
    optimizer = build_optimizer(task.groups, cfg.optim, info.device)
    params = [p for g in task.groups for p in g["params"]]
    step_fn = TrainStep(task.train_model, task.loss, optimizer, params, precision=precision,
                        device=info.device, clip_grad=cfg.optim.clip_grad)
    total_batch = tr.batch_size * info.world_size * tr.accum_steps
    schedule = Schedule(cfg.optim, total_batch, steps_per_epoch, tr.epochs, [g["lr_scale"] for g in task.groups],
                        accum_steps=tr.accum_steps, batches_per_epoch=batches_per_epoch)
    return optimizer, step_fn, schedule


def _agreed_error(error: Optional[UserError], what: str) -> None:
    """Raise on every rank when any rank failed (a rank that stopped alone would hang the others)."""
    if any_rank(error is not None):
        raise error if error is not None else UserError(f"{what} failed on rank 0 (its message says why)")


class Trainer:
    """Builds a run from its config (task, loader, optimizer, step, schedule) and trains it with
    :meth:`fit`. Every rank builds the same :class:`Trainer`; rank 0 writes the shared files."""

    def __init__(self, cfg: FDConfig, info: Optional[DistInfo] = None, *, allow_config_change: bool = False,
                 trust_pickle: bool = False):
        self.cfg, self.allow_config_change, self.trust_pickle = cfg, allow_config_change, trust_pickle
        self.info = info = info or init_distributed()
        self.out = Path(cfg.train.output_dir)
        self.lock = RunLock(self.out)
        error = None
        if info.is_main:
            try:
                self.lock.acquire()
            except UserError as e:
                error = e
        _agreed_error(error, "locking train.output_dir")
        try:
            self._build()
        except BaseException:
            self.lock.release(restore=True)  # refused before any work: leave the folder as it was found
            raise

    def _build(self) -> None:
        self.cfg = resolve_num_classes(self.cfg)  # before any weights load; the records hold the resolved count
        cfg, info, tr = self.cfg, self.info, self.cfg.train
        self.precision = resolve_precision(tr.precision, info.device)  # fails fast for fp16 on a CPU

        # Same init on every rank (DDP also broadcasts rank 0's weights), then per-rank streams.
        seed_all(tr.seed)
        self.task = build_task(cfg, info, trust_pickle=self.trust_pickle)
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
        self.optimizer, self.step_fn, self.schedule = build_training(self.task, cfg, info, self.steps_per_epoch,
                                                                       len(self.loader))
        # step: position in this geometry's numbering (schedule, data order, checkpoint names); images: the
        # same position in images (comparable across world sizes); metrics_step: metrics.jsonl's x-axis
        self.step = self.images = self.metrics_step = 0
        self.evaluated_epoch = 0
        self.best: dict[str, Any] = {}
        self.metrics_path = self.out / "metrics.jsonl"

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a checkpoint holds (tensors and plain values only: ``weights_only=True`` reads it)."""
        return {"model": self.task.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step_state": self.step_fn.state_dict(), "step": self.step, "images": self.images,
                "metrics_step": self.metrics_step,
                "epoch": self.step // self.steps_per_epoch, "steps_per_epoch": self.steps_per_epoch,
                "total_batch": self.total_batch, "world_size": self.info.world_size,
                "evaluated_epoch": self.evaluated_epoch, "config": to_dict(self.cfg), "best": self.best,
                "extra": self.task.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.task.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_fn.load_state_dict(state["step_state"])
        self.task.load_state_dict(state.get("extra", {}))
        self.best = dict(state.get("best", {}))
        position = map_position(state, self.steps_per_epoch, self.total_batch)
        if position.note and self.info.is_main:
            log(f"WARNING: {position.note}")
        self.step, self.images = position.step, position.images
        self.metrics_step = int(state.get("metrics_step", state["step"]))  # before the field: one numbering
        spe_old = int(state.get("steps_per_epoch") or self.steps_per_epoch)
        # checkpoints before this field: an epoch boundary was evaluated before the checkpoint was written
        self.evaluated_epoch = int(state.get("evaluated_epoch", int(state["step"]) // spe_old))

    def _warn(self, path: Path, why: str) -> None:
        self.skipped_checkpoints.append(f"{path.name}: {why}")
        if self.info.is_main:
            log(f"WARNING: skipping checkpoint {path}: {why}")

    def resume(self) -> Optional[Path]:
        """Load the checkpoint to continue from (see ``fdfast.resume``), with this rank's RNG state."""
        info, chosen, state, rng, error = self.info, None, None, None, None
        self.skipped_checkpoints: list[str] = []
        if info.is_main:
            try:
                candidates = choose_checkpoint(self.out, self.cfg.train.resume, self._warn)
                for path in candidates:
                    try:
                        state, rng = ckpt.load_checkpoint(path, 0, map_location=info.device)
                        chosen = path
                        break
                    except ckpt.CheckpointLoadError as e:
                        self._warn(path, str(e))
                if chosen is None and self.cfg.train.resume is not False and ckpt.list_checkpoints(self.out):
                    raise ckpt.CheckpointLoadError(
                        f"{ckpt.ckpt_root(self.out)} holds checkpoints but none can be used "
                        f"({'; '.join(self.skipped_checkpoints)}); fdfast does not silently start again from "
                        "step 0: move them away, or set train.resume=false to start fresh")
                if chosen is not None:
                    check_config_drift(state.get("config"), to_dict(self.cfg), allow=self.allow_config_change,
                                       where=chosen, log=log)
                    check_state_fits(state, self.task.model, self.optimizer, where=chosen)
            except UserError as e:
                error = e
        _agreed_error(error, "choosing the checkpoint to resume from")
        chosen = broadcast_object(str(chosen) if chosen is not None else None)
        if chosen is None:
            return None
        chosen = Path(chosen)
        if not info.is_main:
            state, rng = ckpt.load_checkpoint(chosen, info.rank, map_location=info.device)
        self.load_state_dict(state)
        same_world = int(state.get("world_size", info.world_size)) == info.world_size
        if rng is not None and same_world:
            set_rng_state(rng)  # else every rank keeps the seed + rank streams it started with
        if info.is_main:
            note_resume(self.metrics_path, state, metrics_step=self.metrics_step, step=self.step, images=self.images,
                        world_size=info.world_size, total_batch=self.total_batch, redo_eval=self._eval_pending())
            log(f"resumed from {chosen} at step {self.step} (epoch {self.step // self.steps_per_epoch})")
        return chosen

    def write_config(self) -> None:
        if self.info.is_main:
            write_config(self.out, to_dict(self.cfg))

    def save(self) -> Optional[Path]:
        path = ckpt.save_checkpoint(self.out, self.step, self.state_dict(), rank=self.info.rank,
                                    keep=self.cfg.checkpoint.keep, world_size=self.info.world_size,
                                    config=to_dict(self.cfg))
        if path is not None:
            log(f"checkpoint {path}")
        return path

    def close(self) -> None:
        """Drop the models: the DDP wrapper's reducer holds the process group, and must be freed before it."""
        self.task = self.step_fn = self.optimizer = None  # type: ignore[assignment]

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        try:
            with StopRequest() as stop:  # also while naming a lost peer: the launcher's SIGTERM comes meanwhile
                try:
                    return self._fit(stop)
                except RuntimeError as e:  # a collective the loop waited in failed: one line, not a traceback
                    if not is_lost_peer(e):
                        raise
                    raise lost_rank(e, f"after step {self.step}") from None
        except BaseException:
            # stopped before it wrote a checkpoint or a metric: leave the folder as it was found
            self.lock.release(restore=not (self.metrics_path.exists() or ckpt.ckpt_root(self.out).exists()))
            raise
        finally:
            self.lock.release()

    def _fit(self, stop: StopRequest) -> dict[str, Any]:
        cfg, info, tr = self.cfg, self.info, self.cfg.train
        latest = self.resume()
        self.task.prepare(self.loader)  # e.g. PHI-S statistics a fresh start estimates (a resume loaded them)
        self.write_config()
        self.tracker = Tracker(cfg.log, self.out, rank=info.rank, resume_step=self.metrics_step, config=to_dict(cfg))
        resumed_at = self.step
        spe, last_step = self.steps_per_epoch, self.last_step
        if info.is_main:
            log(f"task={tr.task} steps={last_step} (epoch = {spe} steps of {self.total_batch} images) "
                f"device={info.device} x{info.world_size} precision={self.precision} backend={cfg.data.backend}")
        progress = Progress(total=last_step, start=self.step, enabled=info.is_main, mode=cfg.log.progress)
        bad_loss = torch.zeros((), dtype=torch.bool, device=info.device)
        skipped = torch.zeros((), dtype=torch.int64, device=info.device)
        last_loss = float("nan")
        window_t0, window_steps, data_wait = time.perf_counter(), 0, 0.0
        t_start, train_seconds = time.perf_counter(), 0.0
        # acted on where the loop already waits for the device (single process: every step, for free)
        signal_every = 1 if info.world_size == 1 else min(cfg.log.every, 10)

        def stop_and_save(where: str) -> None:
            check_finite(self.step)
            path = self.save()
            signum = max_rank(stop.signum or 0)  # the signal, whichever rank it reached
            if info.is_main:
                record_preemption(self.out, self.metrics_path, step=self.step, metrics_step=self.metrics_step,
                                  images=self.images, signum=signum, checkpoint=path)
            raise Preempted(f"stopped by signal {signal_name(signum) or signum} {where}; a checkpoint was "
                            "written: rerun the same command to resume")

        def evaluate() -> None:
            # SLURM and Kubernetes send SIGKILL a grace period after SIGTERM: a full validation pass may
            # outlast it, so a stop abandons the pass (redone on resume) instead of waiting for its end
            try:
                progress.show_eval(self._evaluate(lambda batch: batch % signal_every == 0 and any_rank(stop.requested)))
            except EvaluationStopped:
                stop_and_save(f"during the evaluation at step {self.step} (it is redone on resume)")

        def paused(work: Callable[[], None]) -> None:
            """Run a checkpoint or an evaluation off the training clock: img/s and data_wait cover steps only."""
            nonlocal window_t0
            t0 = time.perf_counter()
            work()
            window_t0 += time.perf_counter() - t0

        def check_finite(at: int) -> None:
            if any_rank(bool(bad_loss)):
                raise NonFiniteLoss(f"loss became NaN/Inf at or before step {at}; stopping. The last good "
                                    f"checkpoint in {ckpt.ckpt_root(self.out)} is intact: lower optim.base_lr, "
                                    "enable optim.clip_grad, or use train.precision=fp32/bf16, then rerun to "
                                    "resume from it")

        try:
            if self._eval_pending():
                paused(evaluate)  # the run stopped after this epoch's checkpoint but before its evaluation
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
                    bad_loss |= ~torch.isfinite(out_t["loss"])
                    skipped += out_t["skipped"]
                    self.step, self.images, self.metrics_step = self.step + 1, self.images + self.total_batch, \
                        self.metrics_step + 1
                    window_steps += 1
                    if self.step % cfg.log.every == 0 or self.step == last_step:
                        loss = all_reduce_mean(out_t["loss"].detach().clone())
                        check_finite(self.step)
                        now = time.perf_counter()
                        dt = now - window_t0
                        rec = {"step": self.metrics_step, "images": self.images, "epoch": self.step / spe,
                               "loss": float(loss),
                               **{k: float(all_reduce_mean(v.clone())) for k, v in out_t.items() if k[:5] == "loss_"},
                               "grad_norm": float(out_t["grad_norm"]), "lr": lrs[-1], "lr_groups": list(lrs),
                               "img_per_s_per_device": window_steps * tr.batch_size * tr.accum_steps / dt,
                               "data_wait": data_wait / dt, "skipped_steps": int(skipped), "time": now - t_start,
                               "wall_time": time.time(), "peak_mem_gib": device_peak_memory_gib(info.device)}
                        last_loss = rec["loss"]
                        self.tracker.log(rec)
                        progress.update(self.step, rec)
                        train_seconds += dt
                        window_t0, window_steps, data_wait = now, 0, 0.0
                    if self.step % signal_every == 0 and any_rank(stop.requested) and self.step != last_step:
                        stop_and_save(f"at step {self.step}")
                    if self.step % cfg.checkpoint.every == 0 and self.step != last_step:
                        check_finite(self.step)
                        paused(self.save)
                del it
                if self.task.can_evaluate and self._due_for_eval():
                    paused(evaluate)
            check_finite(self.step)
            if latest is None or self.step > resumed_at:  # a rerun of a finished job rewrites nothing
                self.save()
        finally:
            progress.close()
            self.tracker.close()
        per_device = (self.step - resumed_at) * tr.batch_size * tr.accum_steps
        summary = {"status": "finished", "step": self.step, "images": self.images, "loss": last_loss,
                   "best": self.best, "output_dir": str(self.out),
                   "skipped_steps": int(skipped), "seconds": time.perf_counter() - t_start,
                   "img_per_s_per_device_mean": per_device / train_seconds if train_seconds > 0 else None,
                   "teacher_sha256": getattr(self.task, "teacher_sha256", None),
                   "environment": run_environment()}
        if info.is_main:
            write_summary(self.out, summary)
        return summary

    def _eval_pending(self) -> bool:
        """The run stopped after this epoch's checkpoint but before its evaluation."""
        epoch = self.step // self.steps_per_epoch
        return self.task.can_evaluate and self._due_for_eval() and self.evaluated_epoch < epoch

    def _due_for_eval(self) -> bool:
        """At an epoch end that the eval cadence asks for, or at the last step."""
        if self.step == self.last_step:
            return True
        epoch, within = divmod(self.step, self.steps_per_epoch)
        return within == 0 and epoch % self.task.eval_every == 0

    def _evaluate(self, should_stop: Optional[StopCheck] = None) -> dict:
        ep = math.ceil(self.step / self.steps_per_epoch)
        res = self.task.evaluate(should_stop)
        res.update(step=self.metrics_step, images=self.images, epoch=ep, kind="eval")
        self.evaluated_epoch = max(self.evaluated_epoch, self.step // self.steps_per_epoch)
        if res.get("top1", -1) > self.best.get("top1", -1):
            self.best = dict(res)
            if self.info.is_main:
                path = ckpt.save_best(self.out, {"model": self.task.model.state_dict(), "step": self.step,
                                                 "epoch": ep, "best": self.best, "config": to_dict(self.cfg)},
                                      config=to_dict(self.cfg))
                log(f"best top-1 so far: {res['top1']:.2f}% at epoch {ep}, weights in {path}")
        self.tracker.log(res)
        if self.info.is_main:
            log(f"eval epoch {ep}: " + ", ".join(f"{k}={v:.4f}" for k, v in res.items() if isinstance(v, float)))
        return res


def train(cfg: FDConfig, info: Optional[DistInfo] = None, on_end: Optional[Callable[[Task], None]] = None, *,
          allow_config_change: bool = False, trust_pickle: bool = False) -> dict[str, Any]:
    """Run (or resume) the configured task; returns a summary dict. ``on_end(task)`` is called on
    every rank after the final checkpoint (tests use it to compare ranks' in-memory weights)."""
    trainer = Trainer(cfg, info, allow_config_change=allow_config_change, trust_pickle=trust_pickle)
    try:
        summary = trainer.fit()
        if on_end is not None:
            on_end(trainer.task)
        return summary
    finally:
        trainer.close()
