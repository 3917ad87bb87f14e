"""Device-resident synthetic batches: no decoding, no host work (benchmarks, tests, smoke runs).

Batch ``i`` of epoch ``e`` is drawn from a generator seeded by ``(seed, e, i, rank)``, so the stream
is reproducible and resumable at any batch, and ranks see different data. ``data.synthetic_size`` images
make an epoch; labels are drawn from ``data.num_classes`` (1000 when unset).
"""
from __future__ import annotations

import math

import torch

from fdfast.config.data import SYNTHETIC_CLASSES, DataConfig

from .base import DataError, LoaderRequest


class SyntheticLoader:
    skipped_images = 0

    def __init__(self, data: DataConfig, request: LoaderRequest):
        self.data, self.request = data, request
        self.epoch = 0
        self.start = 0
        n, w, bs = data.synthetic_size, request.world_size, request.batch_size
        self._len = (n // w) // bs if request.train else math.ceil(math.ceil(n / w) / bs)
        if self._len == 0:
            raise DataError(f"data.synthetic_size={n} gives no full batch of {bs} on each of {w} rank(s); "
                            "raise it or lower train.batch_size")
        self._gen = torch.Generator(device=request.device)

    @property
    def num_samples(self) -> int:
        return self.data.synthetic_size

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def _batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.request
        self._gen.manual_seed(((r.seed * 1_000_003 + self.epoch) * 1_000_003 + i) * 1024 + r.rank)
        images = torch.randint(0, 256, (r.batch_size, r.img_size, r.img_size, 3), dtype=torch.uint8,
                               device=r.device, generator=self._gen).permute(0, 3, 1, 2)
        classes = self.data.num_classes or SYNTHETIC_CLASSES
        labels = torch.randint(0, classes, (r.batch_size,), device=r.device, generator=self._gen)
        return images, labels

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, self._len):
            yield self._batch(i)
