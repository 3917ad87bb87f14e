"""Classification evaluation: exact top-1 / top-5 over the whole validation set, on every rank.

Resize 256 (bicubic) + center crop (the loader's eval mode), fp32 without autocast as the official
``validate``; each rank counts hits on its shard and the counts are summed, so nothing is averaged per
batch or per rank (the official code averages per-batch accuracies, spec pitfall 12). Padding entries
(label -1, which eval loaders add so every rank has equal batches) count nowhere.

Evaluation normalisation: training uses ImageNet mean/std, but the official validation transform
normalises with CLIP's mean/std (spec pitfall 1; inputs scaled by ~0.85). ``train.eval_norm`` picks:
``imagenet`` (default, consistent with training) or ``clip`` (the official numbers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import pipelines
from pipelines.base import pad_eval_batch

from ..config import ConfigError, FDConfig
from ..constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from ..distributed import DistInfo, all_reduce_sum
from ..objective import normalize
from ..parallelize import apply_compile


def eval_counts(logits: torch.Tensor, labels: torch.Tensor, topk: int = 5) -> torch.Tensor:
    """float64 ``[top-1 hits, top-k hits, summed CE loss, valid images]`` of one batch; label -1 counts nowhere."""
    logits = logits.float()
    valid = labels >= 0
    target = labels.clamp(min=0)
    k = min(topk, logits.shape[1])
    hits = logits.topk(k, dim=1).indices.eq(target[:, None]) & valid[:, None]
    loss = F.cross_entropy(logits, target, reduction="none") * valid
    return torch.stack([hits[:, 0].sum().double(), hits.any(dim=1).sum().double(), loss.sum().double(),
                        valid.sum().double()])


@dataclass
class EvalResult:
    top1: float
    top5: float
    loss: float
    count: int

    def as_dict(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss, "count": self.count}


def summarize_counts(sums: torch.Tensor) -> EvalResult:
    c1, c5, loss, n = (float(v) for v in sums.cpu())
    if n <= 0:
        raise RuntimeError("evaluation saw no labelled image: is data.val empty?")
    return EvalResult(top1=100.0 * c1 / n, top5=100.0 * c5 / n, loss=loss / n, count=int(round(n)))


class EvaluationStopped(Exception):
    """A stop signal arrived during an evaluation pass; its partial result is dropped."""


# batch index -> whether to abandon the pass now (every rank must answer alike for the same index)
StopCheck = Callable[[int], bool]


@torch.no_grad()
def count_hits(forward: Callable[[torch.Tensor], torch.Tensor], batches, mean, std,
               device: torch.device, should_stop: Optional[StopCheck] = None) -> torch.Tensor:
    """Summed :func:`eval_counts` of ``forward`` over uint8 ``batches``, normalised with ``mean``/``std``,
    in fp32 without autocast (the official ``validate()`` runs without AMP); this rank's part only.
    ``should_stop(i)`` is asked before batch ``i``; True raises :class:`EvaluationStopped`."""
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.autocast(device.type, enabled=False):
        for i, (images, labels) in enumerate(batches):
            if should_stop is not None and should_stop(i):
                raise EvaluationStopped(f"stopped before evaluation batch {i}")
            sums += eval_counts(forward(normalize(images, mean, std)), labels)
    return sums


def eval_mean_std(cfg: FDConfig) -> tuple:
    """The evaluation normalisation of ``train.eval_norm``: ImageNet's, or CLIP's (the official eval transform,
    spec pitfall 1)."""
    return (CLIP_MEAN, CLIP_STD) if cfg.train.eval_norm == "clip" else (IMAGENET_MEAN, IMAGENET_STD)


def rng_untouched(device: torch.device):
    """A context that gives the global RNG streams (CPU, and ``device``'s on CUDA) back as they were: an eval
    pass must not move them (DataLoader iterators draw a seed from the global torch generator), or a run
    resumed after an evaluation would diverge from one without."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    return torch.random.fork_rng(devices=devices)


class Evaluator:
    """Builds the eval loader once (failing at build time, not after the first epoch, when data.val is
    wrong); ``__call__`` evaluates ``model`` and calls ``restore_mode`` afterwards."""

    def __init__(self, model: nn.Module, cfg: FDConfig, info: DistInfo, restore_mode: Callable[[], None]):
        self.model, self.info, self.restore_mode = model, info, restore_mode
        self.batch_size = cfg.train.batch_size
        num_classes = cfg.model.student.num_classes
        self.loader = pipelines.build_loader(
            cfg.data, train=False, batch_size=self.batch_size, img_size=cfg.model.student.img_size,
            device=info.device, rank=info.rank, world_size=info.world_size, seed=cfg.train.seed)
        classes = getattr(self.loader, "classes", None)
        if classes is not None and len(classes) > num_classes:
            raise ConfigError(f"data.val={cfg.data.val!r} has {len(classes)} classes but "
                              f"model.student.num_classes={num_classes}")
        self.mean, self.std = eval_mean_std(cfg)
        # The eager module by default. With compile.enabled: scope 'blocks' compiled the blocks in place, so
        # the plain module already runs them compiled; 'whole' gets a separately compiled view of the same
        # weights (the training one sits inside DDP). Either way batches keep one fixed size (the short
        # last batch is padded with label -1), so the eval graph compiles once (dynamic=False).
        self.forward = model
        if cfg.compile.enabled and cfg.compile.scope == "whole":
            self.forward = apply_compile(model, cfg.compile)
        self.pad = cfg.compile.enabled

    def _batches(self):
        for images, labels in self.loader:
            if self.pad:
                images, labels = pad_eval_batch(images, labels, self.batch_size)
            yield images, labels

    def __call__(self, should_stop: Optional[StopCheck] = None) -> dict:
        dev = self.info.device
        self.model.eval()
        try:
            with rng_untouched(dev):
                self.loader.set_epoch(0)
                sums = count_hits(self.forward, self._batches(), self.mean, self.std, dev, should_stop)
        finally:
            self.restore_mode()
        all_reduce_sum(sums)  # exact totals over every rank; nothing averaged per batch or per rank
        return summarize_counts(sums).as_dict()
