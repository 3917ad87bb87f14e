"""The task protocol: what the training loop needs from distillation, fine-tuning or a linear probe.

A task owns its models and the maths of one micro-batch; :class:`fdfast.trainer.Trainer` owns the
loop (optimizer, schedule, accumulation, cadences, checkpoints). A task provides:

* ``model`` — the unwrapped trainable module; its ``state_dict()`` is what checkpoints hold;
* ``train_model`` — what forward/backward runs through (the same module compiled and/or in DDP);
* ``groups`` — optimizer parameter groups (``params``, ``names``, ``weight_decay``, ``lr_scale``);
* ``loss(images, labels)`` — uint8 channels-last pixels and int64 labels -> scalar loss tensor, or a dict of
  scalar tensors: ``"loss"`` (the total that is back-propagated) and ``"loss_<name>"`` parts (logged beside it);
* ``prepare(batches)`` — once per start, after a resume and before the first step: e.g. statistics a target
  estimates from the first batches (``batches``: the training loader);
* ``evaluate()`` — a dict of metrics (``top1`` ..., or ``knn_top1`` ... for distillation) when
  ``can_evaluate``, every ``eval_every`` epochs and at the last step;
* ``state_dict()`` / ``load_state_dict()`` — the task's own bookkeeping (e.g. which pretrained file
  it started from), saved beside the model.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Union

import torch
import torch.nn as nn

from .evaluation import StopCheck


class Task:
    model: nn.Module
    train_model: nn.Module
    groups: list[dict]
    eval_every: int = 1

    def loss(self, images: torch.Tensor, labels: torch.Tensor) -> Union[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def prepare(self, batches: Iterable[tuple[torch.Tensor, Any]]) -> None:
        """Before the first step of every start (fresh or resumed); nothing by default."""

    @property
    def can_evaluate(self) -> bool:
        return False

    def evaluate(self, should_stop: Optional[StopCheck] = None) -> dict:
        """Metrics on data.val; ``should_stop`` may abandon the pass (see ``count_hits``)."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluation")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
