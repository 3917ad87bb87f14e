"""Weighted k-NN accuracy of frozen features: whether a distillation is any good, long before fine-tuning it.

DINO's monitor (Caron et al. 2021, ``eval_knn.py``): every image of a labelled memory bank (``data.knn_train``)
and of the validation set (``data.val``) becomes one L2-normalised feature; the k bank images most similar to a
validation image (cosine similarity) vote for their classes with weight exp(similarity / T), and the vote sums
rank the classes (k = 20, T = 0.07 by default). Top-1 / top-5: the true class ranks first / in the first five.

Features (:func:`image_features`): timm's ``forward_features`` (the final-norm tokens) of the network in eval
mode, in fp32 without autocast, on the evaluation transform (resize + centre crop) of whatever backend loads the
images. ``cls`` takes token 0; ``mean`` the mean of the patch tokens (prefix tokens, i.e. CLS and registers,
left out; a Swin's (B, H, W, C) map averaged over H, W). A Swin has no CLS token.

Exact for any number of processes: the eval loaders pad a rank's last batch with label -1 entries, dropped
before anything is counted; the bank is gathered from every rank and sorted into one canonical order (by label,
then by feature values), so every rank of every process count searches the same bank; each rank classifies its
share of the validation images and the hit counts are summed. Ties count against the model: a class whose vote
sum equals the true class's is ranked ahead of it, and a class no neighbour voted for is never predicted (DINO's
sort leaves the place of equal sums to chance).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import pipelines
from pipelines.base import DataError

from ..config import DataConfig, FDConfig
from ..distributed import DistInfo, all_gather_rows, all_reduce_sum
from ..objective import normalize
from .evaluation import EvaluationStopped, StopCheck, eval_mean_std, rng_untouched

FEATURES = ("cls", "mean")
_BLOCK = 1 << 26  # entries of one similarity / vote block: bounds the memory of a large bank


@dataclass(frozen=True)
class KNNSettings:
    k: int = 20
    temperature: float = 0.07
    feature: str = "cls"


def has_cls_token(network: nn.Module) -> bool:
    return getattr(network, "cls_token", None) is not None


def image_features(network: nn.Module, x: torch.Tensor, feature: str) -> torch.Tensor:
    """(B, D) L2-normalised features of the normalised images ``x`` (see the module docstring)."""
    tokens = network.forward_features(x)
    if tokens.ndim == 4:  # Swin: (B, H, W, C), no CLS token
        if feature == "cls":
            raise ValueError(f"{type(network).__name__} has no CLS token")
        pooled = tokens.flatten(1, 2).mean(1)
    elif feature == "cls":
        pooled = tokens[:, 0]
    else:
        pooled = tokens[:, getattr(network, "num_prefix_tokens", 1):].mean(1)
    return F.normalize(pooled.float(), dim=1)


@torch.no_grad()
def extract_features(network: nn.Module, batches: Iterable, mean, std, device: torch.device, feature: str,
                     should_stop: Optional[StopCheck] = None, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (features, labels) of uint8 ``batches``; padding entries (label -1) are dropped.
    ``should_stop(first + i)`` is asked before batch ``i``; True raises :class:`EvaluationStopped`."""
    feats, labels = [], []
    with torch.autocast(device.type, enabled=False):
        for i, (images, y) in enumerate(batches):
            if should_stop is not None and should_stop(first + i):
                raise EvaluationStopped(f"stopped before k-NN batch {first + i}")
            keep = y >= 0
            feats.append(image_features(network, normalize(images, mean, std), feature)[keep])
            labels.append(y[keep])
    return torch.cat(feats), torch.cat(labels)


def canonical_order(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A permutation sorting the rows by label, then by their first feature values: the same bank in the same
    order however the rows were spread over ranks (top-k breaks ties between equal similarities by position)."""
    order = torch.arange(len(labels), device=labels.device)
    for key in [feats[:, j] for j in reversed(range(min(2, feats.shape[1])))] + [labels]:
        order = order[torch.sort(key[order], stable=True).indices]  # least significant key first
    return order


def knn_hits(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, labels: torch.Tensor, *,
             k: int, temperature: float) -> torch.Tensor:
    """float64 ``[top-1 hits, top-5 hits, queries]`` of DINO's weighted k-NN vote; features L2-normalised.
    A query whose class is absent from the bank is counted, and missed."""
    num_classes = int(bank_labels.max()) + 1
    k = min(k, len(bank))
    rows = max(1, min(_BLOCK // len(bank), _BLOCK // (k * num_classes)))
    sums = torch.zeros(3, dtype=torch.float64, device=queries.device)
    for s in range(0, len(queries), rows):
        q, y = queries[s:s + rows], labels[s:s + rows]
        sim, idx = (q @ bank.T).topk(k, dim=1)
        # exp(sim / T) up to a factor per query (the nearest one's): the same ranking, no overflow at small T
        weights = ((sim - sim[:, :1]) / temperature).exp()
        # one-hot sum rather than scatter_add: a fixed summation order, so every process gets the same sums
        votes = (F.one_hot(bank_labels[idx], num_classes) * weights[..., None]).sum(1)
        known = y < num_classes
        mine = votes.gather(1, y.clamp(max=num_classes - 1)[:, None])
        ahead = (votes >= mine).sum(1) - 1  # other classes with at least the true class's sum
        voted = known & (mine[:, 0] > 0)
        sums[0] += (voted & (ahead < 1)).sum()
        sums[1] += (voted & (ahead < 5)).sum()
        sums[2] += len(y)
    return sums


def build_knn_loaders(data: DataConfig, *, batch_size: int, img_size: int, device: torch.device, rank: int = 0,
                      world_size: int = 1, names: tuple[str, str] = ("data.knn_train", "data.val")) -> tuple:
    """(bank, validation) loaders in eval mode: ``data.knn_train`` capped at ``data.knn_train_per_class``, and
    ``data.val``. ``names`` are what the errors call them (config keys, or command-line flags)."""
    common = dict(train=False, batch_size=batch_size, img_size=img_size, device=device, rank=rank,
                  world_size=world_size)
    bank = pipelines.build_loader(data, split="knn_train", per_class=data.knn_train_per_class, **common)
    query = pipelines.build_loader(data, **common)
    a, b = getattr(bank, "classes", None), getattr(query, "classes", None)
    if a is not None and b is not None and a != b:
        raise DataError(f"{names[0]}={data.knn_train!r} and {names[1]}={data.val!r} have different class folders "
                        f"({len(a)} and {len(b)}, first difference: "
                        f"{next((x, y) for x, y in zip(a + [None], b + [None]) if x != y)}); a label is the "
                        "position of its folder in sorted order, so both need the same class folders")
    return bank, query


@torch.no_grad()
def knn_evaluate(network: nn.Module, bank_loader, query_loader, *, mean, std, device: torch.device,
                 settings: KNNSettings, should_stop: Optional[StopCheck] = None) -> dict:
    """``knn_top1`` / ``knn_top5`` (%), ``knn_count`` (validation images) and ``knn_bank`` (bank images) of
    ``network``'s features, exactly over every rank. The network runs in eval mode and gets its mode back;
    the global RNG streams are left as they were."""
    was_training = network.training
    network.eval()
    try:
        with rng_untouched(device):
            bank_loader.set_epoch(0)
            bank, bank_labels = extract_features(network, bank_loader, mean, std, device, settings.feature,
                                                 should_stop)
            bank, bank_labels = all_gather_rows(bank), all_gather_rows(bank_labels)
            order = canonical_order(bank, bank_labels)
            bank, bank_labels = bank[order], bank_labels[order]
            query_loader.set_epoch(0)
            queries, labels = extract_features(network, query_loader, mean, std, device, settings.feature,
                                               should_stop, first=len(bank_loader))
    finally:
        network.train(was_training)
    sums = all_reduce_sum(knn_hits(bank, bank_labels, queries, labels, k=settings.k,
                                   temperature=settings.temperature))
    hits1, hits5, n = (float(v) for v in sums.cpu())
    return {"knn_top1": 100.0 * hits1 / n, "knn_top5": 100.0 * hits5 / n, "knn_count": int(n),
            "knn_bank": len(bank)}


class KNNMonitor:
    """The k-NN monitor of a distillation run (``train.knn_every``). Its loaders are built by :meth:`build`, which
    the task's ``prepare`` calls before the first step, so a wrong ``data.knn_train`` fails at the start of a run,
    not after its first epoch, while a task built for its loss alone (the Python API) needs no data on disk;
    ``__call__(network)`` measures."""

    def __init__(self, cfg: FDConfig, info: DistInfo):
        self.cfg, self.info, self.device = cfg, info, info.device
        self.loaders: Optional[tuple] = None
        self.mean, self.std = eval_mean_std(cfg)
        tr = cfg.train
        self.settings = KNNSettings(k=tr.knn_k, temperature=tr.knn_temperature, feature=tr.knn_feature)

    def build(self) -> None:
        if self.loaders is None:
            cfg, info = self.cfg, self.info
            self.loaders = build_knn_loaders(cfg.data, batch_size=cfg.train.batch_size,
                                             img_size=cfg.model.student.img_size, device=info.device,
                                             rank=info.rank, world_size=info.world_size)

    def __call__(self, network: nn.Module, should_stop: Optional[StopCheck] = None) -> dict:
        self.build()
        return knn_evaluate(network, *self.loaders, mean=self.mean, std=self.std, device=self.device,
                            settings=self.settings, should_stop=should_stop)
