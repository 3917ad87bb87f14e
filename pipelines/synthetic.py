"""Device-resident synthetic batches: no decoding, no host work (benchmarks, tests, smoke runs).

Batch ``i`` of epoch ``e`` is drawn from a generator seeded by ``(seed, e, i, rank)``, so the stream
is reproducible and resumable at any batch, and ranks see different data.
"""
from __future__ import annotations

import math

import torch

from .base import LoaderSpec


class SyntheticLoader:
    def __init__(self, spec: LoaderSpec):
        self.spec = spec
        self.epoch = 0
        self.start = 0
        per_rank = spec.synthetic_size // spec.world_size if spec.train else math.ceil(
            spec.synthetic_size / spec.world_size)
        self._len = per_rank // spec.batch_size if spec.train else math.ceil(per_rank / spec.batch_size)
        if self._len == 0:
            raise ValueError(f"data.synthetic_size={spec.synthetic_size} gives no full batch of "
                             f"{spec.batch_size} x {spec.world_size} ranks; raise it or lower train.batch_size")
        self._gen = torch.Generator(device=spec.device)

    @property
    def num_samples(self) -> int:
        return self.spec.synthetic_size

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start = epoch, start_batch

    def _batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec
        self._gen.manual_seed(((s.seed * 1_000_003 + self.epoch) * 1_000_003 + i) * 1024 + s.rank)
        n = s.batch_size
        images = torch.randint(0, 256, (n, s.img_size, s.img_size, 3), dtype=torch.uint8,
                               device=s.device, generator=self._gen).permute(0, 3, 1, 2)
        labels = torch.randint(0, s.num_classes, (n,), device=s.device, generator=self._gen)
        return images, labels

    def __iter__(self):
        start, self.start = self.start, 0
        for i in range(start, self._len):
            yield self._batch(i)
