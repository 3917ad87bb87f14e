"""The loader contract every backend implements.

A backend is built from the ``data`` config section and a :class:`LoaderRequest` (train or eval, batch size,
image size, device, rank, world size, seed) and yields ``(images, labels)``:

* ``images``: ``torch.uint8``, shape ``(B, 3, H, W)``, channels-last memory
  (``images.is_contiguous(memory_format=torch.channels_last)``), on the training device;
* ``labels``: ``torch.int64``, shape ``(B,)``, on the same device.

Normalisation, dtype casts and the teacher's own mean/std happen on the device inside the FD step,
so every backend hands over the same raw pixels. ``len(loader)`` is the number of batches per epoch
and is equal on every rank. Training drops the remainder; evaluation instead pads a rank's last batch
with images labelled ``-1`` (``pad_eval_batch``), which metrics must ignore, so that every image is
counted exactly once across ranks. ``set_epoch(epoch, start_batch)`` fixes the order of the next pass from
``(seed, epoch)`` alone and skips its first ``start_batch`` batches (exact mid-epoch resume).
``skipped_images`` counts the files this loader dropped under ``data.on_bad_image=skip`` (see :class:`BadImages`).

Everything a user can fix (a missing or empty folder, a file that is not an FFCV file, a batch larger than
the data set, undecodable images) raises :class:`DataError`: one line naming the file or key and the fix.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional, Protocol, runtime_checkable

import torch

from fdfast.config.data import DataConfig
from fdfast.errors import MissingDependency, UserError
from fdfast.logging import log

__all__ = ["CROP_RATIO", "BadImages", "CountedLoader", "DataError", "Loader", "LoaderRequest", "MissingDependency",
           "batches_in_flight", "check_batch", "empty_batch", "keep_per_class", "pad_eval_batch"]

# Distillation / fine-tune RandomResizedCrop ranges (torchvision defaults, used by FD).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


class DataError(UserError, ValueError):
    """A data set or loader setting that cannot be used; the message names the file or key and the fix."""


@dataclass(frozen=True)
class LoaderRequest:
    """What the trainer asks of a loader beyond the ``data`` section: which split, how big, where."""

    train: bool               # True: random-resized-crop + flip, shuffled, drop_last; False: resize + center crop
    batch_size: int           # per rank
    img_size: int             # output H = W
    device: torch.device
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    split: str = ""           # the data field read ("knn_train"); "" = data.train or data.val as `train` says
    per_class: int = 0        # at most this many images of each class (keep_per_class); 0 = all

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside world_size {self.world_size}")
        object.__setattr__(self, "device", torch.device(self.device))

    @property
    def key(self) -> str:
        """The config key naming this split's data."""
        return f"data.{self.split or ('train' if self.train else 'val')}"

    def source(self, data: DataConfig) -> str:
        """This split's ImageFolder or ``.beton`` path."""
        return getattr(data, self.key[len("data."):])

    def subset(self, labels: Sequence[int]) -> Optional[list[int]]:
        """The indices of the samples to read, given every sample's label (None: all of them)."""
        return keep_per_class(labels, self.per_class) if self.per_class else None

    def no_full_batch(self, what: str, n: int) -> DataError:
        return DataError(f"{self.key}={what!r}: {n} images give no full batch of {self.batch_size} on each of "
                         f"{self.world_size} rank(s); lower train.batch_size")


@runtime_checkable
class Loader(Protocol):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    @property
    def num_samples(self) -> int:
        """Images in the whole dataset (all ranks)."""
        ...

    @property
    def skipped_images(self) -> int:
        """Undecodable files this loader dropped so far (``data.on_bad_image=skip``)."""
        ...


def keep_per_class(labels: Sequence[int], per_class: int) -> list[int]:
    """Sorted indices of at most ``per_class`` samples of each class, evenly spread over that class's samples in
    their listed order: a choice made from the labels alone, the same on every rank, in every run and command."""
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    keep = []
    for members in by_class.values():
        n, m = len(members), min(per_class, len(members))
        keep += [members[j * n // m] for j in range(m)]
    return sorted(keep)


def batches_in_flight(data: DataConfig) -> int:
    """Batches a backend may have read ahead of the one it hands out (the prefetch queue and the batch being
    decoded): where a bad file found in one batch sends it looking for more, so one error names them all."""
    return max(1, data.prefetch) + 2


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask under SLURM / taskset, else all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pad_eval_batch(images: torch.Tensor, labels: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Extend an eval batch to ``size`` with black images labelled -1 (ignored by metrics), so that every
    rank's batches have the same shapes without counting any image twice."""
    missing = size - images.shape[0]
    if missing <= 0:
        return images, labels
    pad = torch.zeros((missing, *images.shape[1:]), dtype=images.dtype, device=images.device)
    images = torch.cat([images, pad.contiguous(memory_format=torch.channels_last)])
    labels = torch.cat([labels, torch.full((missing,), -1, dtype=labels.dtype, device=labels.device)])
    return images.contiguous(memory_format=torch.channels_last), labels


def check_batch(images: torch.Tensor, labels: torch.Tensor) -> None:
    """Assert the contract on one batch (used by tests and the benchmark)."""
    assert images.dtype == torch.uint8, images.dtype
    assert images.dim() == 4 and images.shape[1] == 3, tuple(images.shape)
    assert images.is_contiguous(memory_format=torch.channels_last), "images must be channels-last"
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],), (labels.dtype, labels.shape)
    assert labels.device == images.device


def empty_batch(request: LoaderRequest) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of no images, in the contract's layout on the request's device; ``pad_eval_batch`` fills it
    with padding for a rank whose shard ran out before its last eval batches."""
    images = torch.empty((0, 3, request.img_size, request.img_size), dtype=torch.uint8, device=request.device)
    return (images.contiguous(memory_format=torch.channels_last),
            torch.empty((0,), dtype=torch.int64, device=request.device))


class BadImages:
    """What ``data.on_bad_image`` says about files a backend could not decode while loading.

    ``error``: :meth:`handle` raises a :class:`DataError` naming every bad file found (the files of the
    batches in flight; ``fdfast-convert --check-only`` lists all of a folder). ``skip``: it records them
    (``count``), logs each file once and returns, and the backend fills the file's slot in the batch: in
    training with the next readable file in folder order (its label too), in evaluation with a black
    image labelled -1 (padding, ignored by metrics). Replacing instead of dropping keeps every batch full,
    ``len(loader)`` equal on every rank and the order of every other sample what it would have been.
    """

    def __init__(self, policy: str, root: str, key: str):
        self.policy, self.root, self.key = policy, root, key
        self.found: dict[str, str] = {}   # path -> reason, skipped so far

    @property
    def skip(self) -> bool:
        return self.policy == "skip"

    @property
    def count(self) -> int:
        return len(self.found)

    def handle(self, bad: list[tuple[str, str]]) -> None:
        if not bad:
            return
        if not self.skip:
            listing = "; ".join(f"'{p}' ({_one_line(why)})" for p, why in sorted(set(bad)))
            raise DataError(f"undecodable image(s) in {self.key}='{self.root}': {listing}. Remove or replace them, "
                            "or set data.on_bad_image=skip to leave them out; `fdfast-convert --check-only "
                            f"{self.root}` lists every undecodable file of the folder")
        for path, why in bad:
            if path not in self.found:
                self.found[path] = why
                log(f"skipped undecodable image '{path}' ({_one_line(why)}); {self.count} skipped in {self.key} "
                    "(data.on_bad_image=skip)")


def _one_line(text: str) -> str:
    lines = [s.strip() for s in str(text).strip().splitlines() if s.strip()]
    return lines[-1] if lines else "unknown error"


class CountedLoader:
    """Pass bookkeeping of the backends that count their own batches (FFCV, DALI).

    A subclass sets ``request`` and ``_len`` (training: full batches per rank) or calls
    :meth:`_count_eval_batches` (evaluation), and in ``__iter__`` starts with :meth:`_begin_pass`, hands
    each batch through :meth:`_finish_batch` and ends with :meth:`_padding_batches`: evaluation pads the
    pass's last batch and adds padding-only batches where the rank's shard ran out early, so every rank
    yields ``ceil(ceil(N / world) / batch)`` batches of equal shapes.
    """

    request: LoaderRequest
    _len: int
    _per_rank: int
    _epoch: int = 0
    _start_batch: int = 0

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        if not 0 <= start_batch <= self._len:
            raise ValueError(f"start_batch={start_batch} is outside [0, {self._len}]")
        self._epoch, self._start_batch = epoch, start_batch

    def _begin_pass(self) -> tuple[int, int]:
        """(epoch, start batch) of the pass that begins now; the next pass without set_epoch is the next epoch."""
        epoch, start = self._epoch, self._start_batch
        self._epoch, self._start_batch = epoch + 1, 0
        return epoch, start

    def _count_eval_batches(self, num_samples: int) -> None:
        self._per_rank = math.ceil(num_samples / self.request.world_size)
        self._len = math.ceil(self._per_rank / self.request.batch_size)

    def _last_batch_size(self) -> int:
        return self._per_rank - (self._len - 1) * self.request.batch_size

    def _finish_batch(self, images: torch.Tensor, labels: torch.Tensor,
                      emitted: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``emitted`` (1-based) as it is handed out: the last eval batch padded."""
        if not self.request.train and emitted == self._len:
            return pad_eval_batch(images, labels, self._last_batch_size())
        return images, labels

    def _padding_batches(self, emitted: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Eval: the batches after the ``emitted`` ones, where this rank's shard is empty."""
        while emitted < self._len:
            emitted += 1
            yield pad_eval_batch(*empty_batch(self.request), self._last_batch_size())
