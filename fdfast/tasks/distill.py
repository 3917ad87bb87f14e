"""Feature distillation (spec §1): a frozen teacher's whitened tokens are the student's regression target.

``loss(images, labels)``: the teacher target (teacher normalisation on the device, frozen teacher,
non-affine LayerNorm; compiled and CUDA-graph captured when configured) and the student's projected
tokens from the ImageNet-normalised pixels, compared with SmoothL1 (β = 2). Labels are unused. Only the
student + projector (:class:`~fdfast.models.student.DistillModel`) trains and sits in DDP; the teacher
stays outside, frozen, in eval mode.

Several teachers (``model.teachers``): one target per teacher (:mod:`.targets`), each with its own head on the
shared student tokens (:class:`~fdfast.models.heads.MultiDistillModel`), its own token set and its own
whitening (FD's LayerNorm or PHI-S); ``loss`` returns ``{"loss": Σ weightᵢ · lossᵢ, "loss_<name>": lossᵢ}``,
every ``lossᵢ`` the plain FD loss of teacher i (unweighted, comparable with a one-teacher run).

With ``train.knn_every`` the task evaluates: the weighted k-NN accuracy of the student's features
(``tasks/knn.py``).
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch

from ..config import FDConfig
from ..constants import IMAGENET_MEAN, IMAGENET_STD
from ..distributed import DistInfo
from ..logging import log
from ..models.heads import MultiDistillModel
from ..models.student import DistillModel
from ..models.teachers import build_teacher
from ..objective import fd_loss, normalize
from ..optim import param_groups
from ..parallelize import prepare_model, wrap_for_training
from .base import Task
from .evaluation import StopCheck
from .knn import KNNMonitor
from .targets import build_target, build_teacher_slots, estimate_phi_s

__all__ = ["DistillTask", "build_target"]


class DistillTask(Task):
    """Student + projector trained to regress the teacher's whitened tokens; with ``model.teachers``, student +
    one head per teacher trained on the weighted sum of their FD losses."""

    def __init__(self, cfg: FDConfig, info: DistInfo, compile_backend: Optional[str] = None, *,
                 trust_pickle: bool = False):
        s = cfg.model.student
        self.cfg, self.info = cfg, info
        self.beta = cfg.model.loss_beta
        if cfg.model.teachers:
            self.slots = build_teacher_slots(cfg, info, compile_backend, trust_pickle=trust_pickle)
            self.teacher = self.slots[0].teacher  # what code written for one teacher reads (e.g. its sha256)
            heads = {slot.name: (slot.head, slot.teacher.embed_dim) for slot in self.slots}
            self.model = prepare_model(MultiDistillModel(s, heads), cfg, info)
        else:
            self.slots = []
            # the token rules (input size, target tokens, student tokens) are resolved against this student
            self.teacher = build_teacher(cfg.model.teacher, s.img_size, trust_pickle=trust_pickle, student=s)
            self.teacher.to(info.device)
            self.plan = self.teacher.plan
            if info.is_main:
                log(self.teacher.describe())
                log(self.plan.describe())
            self.model = prepare_model(DistillModel(s, self.teacher.embed_dim), cfg, info)
        self.groups = param_groups(self.model, cfg.optim, s)
        self.train_model = wrap_for_training(self.model, cfg, info, compile_backend)
        if not self.slots:
            self.target = build_target(self.teacher, cfg, info.device, compile_backend)
        self.knn = KNNMonitor(cfg, info) if cfg.train.knn_every else None
        self.eval_every = cfg.train.knn_every or 1  # only read when the monitor is on

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> Union[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.slots:
            target = self.target(images)
            pred = self.train_model(normalize(images, IMAGENET_MEAN, IMAGENET_STD))
            return fd_loss(self.plan.student_tokens(pred), target, self.beta)
        targets = [slot.target(images) for slot in self.slots]
        preds = self.train_model(normalize(images, IMAGENET_MEAN, IMAGENET_STD))
        out: dict[str, torch.Tensor] = {}
        total: Optional[torch.Tensor] = None
        for slot, target in zip(self.slots, targets):
            part = fd_loss(slot.plan.student_tokens(preds[slot.name]), target, self.beta)
            total = slot.weight * part if total is None else total + slot.weight * part
            out[f"loss_{slot.name}"] = part.detach()
        return {"loss": total, **out}

    def prepare(self, batches: Iterable[tuple[torch.Tensor, Any]]) -> None:
        """PHI-S teachers without statistics (a fresh start) estimate them from the first batches; the k-NN
        monitor's loaders are built (a wrong data.knn_train fails here, before the first step)."""
        estimate_phi_s(self.slots, batches, self.cfg, self.info)
        if self.knn is not None:
            self.knn.build()

    def state_dict(self) -> dict:
        phi_s = {slot.name: slot.phi_s.state_dict() for slot in self.slots if slot.phi_s is not None}
        return {"phi_s": phi_s} if phi_s else {}

    def load_state_dict(self, state: dict) -> None:
        for slot in self.slots:
            saved = (state.get("phi_s") or {}).get(slot.name)
            if slot.phi_s is not None and saved is not None:
                slot.phi_s.load_state_dict(saved)  # in place: a captured graph keeps reading these buffers

    @property
    def teacher_sha256(self) -> Union[Optional[str], dict[str, Optional[str]]]:
        """The SHA-256 of the teacher's weights file (None for random weights), for the run's records; with
        several teachers, one per teacher name."""
        if self.slots:
            return {slot.name: slot.teacher.sha256 for slot in self.slots}
        return self.teacher.sha256

    @property
    def can_evaluate(self) -> bool:
        return self.knn is not None

    def evaluate(self, should_stop: Optional[StopCheck] = None) -> dict:
        """k-NN accuracy of the student's own features (the encoder's tokens, not the projector's or
        the heads')."""
        return self.knn(self.model.encoder, should_stop)
