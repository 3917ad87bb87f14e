"""The teacher targets of a distillation run: one for ``model.teacher``, one per entry of ``model.teachers``.

:func:`build_target` makes a teacher's target function (compiled, CUDA-graph replayed), the same for one
teacher or several. :func:`build_teacher_slots` builds every teacher of ``model.teachers`` with its token rules
(:class:`~fdfast.models.token_rules.TargetPlan`), its whitening (FD's LayerNorm or :class:`~fdfast.models.phi_s.PhiS`)
and its target; :func:`estimate_phi_s` fills the PHI-S statistics from the first ``model.phi_s_batches`` batches.

Several targets and one CUDA graph each: every :class:`~fdfast.models.target.GraphedTarget` captures its own
graphs in its own private memory pool, so replaying one teacher's graph never overwrites another teacher's
output; each output is read by the loss and by backward before the next micro-batch replays the same graph,
as with one teacher, so no copy is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn as nn

from ..config import FDConfig
from ..distributed import DistInfo
from ..errors import UserError
from ..logging import log
from ..models.attention import set_attention_kernel
from ..models.phi_s import PhiS, PhiSEstimate
from ..models.target import GraphedTarget, TeacherTarget
from ..models.teachers import Teacher, build_teacher
from ..models.token_rules import TargetPlan
from ..parallelize import apply_compile
from ..step import autocast, resolve_precision

TargetFn = Callable[[torch.Tensor], torch.Tensor]


def compile_target(fn: nn.Module, cfg: FDConfig, device: torch.device,
                   compile_backend: Optional[str] = None) -> TargetFn:
    """A :class:`TeacherTarget` compiled (``compile.scope``: the whole target incl. normalise/whiten, or the
    teacher's blocks) when ``compile.enabled``, replayed from a CUDA graph per input shape with
    ``compile.cuda_graph_teacher`` on CUDA."""
    if cfg.compile.enabled:
        if cfg.compile.scope == "whole":
            fn = apply_compile(fn, cfg.compile, scope="whole", backend=compile_backend)
        else:
            apply_compile(fn.teacher, cfg.compile, scope="blocks", backend=compile_backend)
    if cfg.compile.cuda_graph_teacher and device.type == "cuda":
        return GraphedTarget(fn, device)
    return fn


def build_target(teacher: Teacher, cfg: FDConfig, device: torch.device,
                 compile_backend: Optional[str] = None) -> TargetFn:
    """The teacher target of a run: :class:`TeacherTarget` on the teacher's fused (flash) attention, through
    :func:`compile_target`. ``compile_backend`` (e.g. 'aot_eager') is for CPU checks of the compiled path."""
    set_attention_kernel(teacher, "sdpa")
    return compile_target(TeacherTarget(teacher, cfg.model.whiten_eps).to(device), cfg, device, compile_backend)


@dataclass
class TeacherSlot:
    """One teacher of ``model.teachers``: its loss weight, frozen teacher, token plan, target module (holds the
    PHI-S buffers, runs eagerly for the estimate) and target function (compiled / graphed)."""
    name: str
    weight: float
    head: str
    teacher: Teacher
    plan: TargetPlan
    module: TeacherTarget
    target: TargetFn

    @property
    def phi_s(self) -> Optional[PhiS]:
        return self.module.phi_s


def build_teacher_slots(cfg: FDConfig, info: DistInfo, compile_backend: Optional[str] = None, *,
                        trust_pickle: bool = False) -> list[TeacherSlot]:
    """Every teacher of ``model.teachers``, in order, on ``info.device``; a teacher that cannot be built is the
    same one-line error, prefixed with the entry it comes from."""
    s, slots = cfg.model.student, []
    for entry in cfg.model.teachers:
        try:
            teacher = build_teacher(entry, s.img_size, trust_pickle=trust_pickle, student=s)
        except UserError as e:
            raise type(e)(f"{entry.key}: {e}") from None
        teacher.to(info.device)
        if info.is_main:
            log(f"{entry.name} (weight {entry.weight:g}, head {entry.head}, whiten {entry.whiten}): "
                f"{teacher.describe()}")
            log(f"{entry.name}: {teacher.plan.describe()}")
        set_attention_kernel(teacher, "sdpa")
        phi_s = PhiS(teacher.embed_dim) if entry.whiten == "phi_s" else None
        module = TeacherTarget(teacher, cfg.model.whiten_eps, phi_s=phi_s).to(info.device)
        slots.append(TeacherSlot(name=entry.name, weight=float(entry.weight), head=entry.head, teacher=teacher,
                                 plan=teacher.plan, module=module,
                                 target=compile_target(module, cfg, info.device, compile_backend)))
    return slots


def estimate_phi_s(slots: list[TeacherSlot], batches: Iterable[tuple[torch.Tensor, Any]], cfg: FDConfig,
                   info: DistInfo) -> None:
    """Fill the PHI-S statistics of every slot that has none yet from the teacher tokens of the first
    ``model.phi_s_batches`` batches of ``batches`` (a loader: its epoch 0; every rank's own shard, summed over
    ranks). A collective: every rank calls it with the same slots. Slots whose statistics a checkpoint already
    gave are left alone, so a resumed run never re-estimates."""
    pending = [slot for slot in slots if slot.phi_s is not None and not slot.phi_s.ready]
    if not pending:
        return
    set_epoch = getattr(batches, "set_epoch", None)
    if set_epoch is not None:
        set_epoch(0)  # the run's first batches, the same on every start; the loop sets its own epoch again
    sums = {slot.name: PhiSEstimate() for slot in pending}
    precision = resolve_precision(cfg.train.precision, info.device)
    seen = 0
    for images, _ in batches:
        with autocast(precision, info.device):  # the tokens the step's targets will see
            for slot in pending:
                sums[slot.name].add(slot.module.features(images))
        seen += 1
        if seen == cfg.model.phi_s_batches:
            break
    for slot in pending:
        sums[slot.name].finish(slot.phi_s, rank=info.rank)
        if info.is_main:
            log(f"{slot.name}: PHI-S from {int(slot.phi_s.tokens):,} tokens of {seen} batches per rank "
                f"(scale {float(slot.phi_s.scale):.4g})")
