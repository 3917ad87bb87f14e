"""The loader contract every backend implements.

Every backend yields ``(images, labels)``:

* ``images``: ``torch.uint8``, shape ``(B, 3, H, W)``, channels-last memory
  (``images.is_contiguous(memory_format=torch.channels_last)``), on the training device;
* ``labels``: ``torch.int64``, shape ``(B,)``, on the same device.

Normalisation, dtype casts and the teacher's own mean/std happen on the device inside the FD step,
so every backend hands over the same raw pixels. ``len(loader)`` is the number of batches per epoch
and is equal on every rank. Training drops the remainder; evaluation instead pads a rank's last batch
with images labelled ``-1`` (``pad_eval_batch``), which metrics must ignore, so that every image is
counted exactly once across ranks. ``set_epoch(epoch, start_batch)`` fixes the order of the next pass from
``(seed, epoch)`` alone and skips its first ``start_batch`` batches (exact mid-epoch resume).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol, runtime_checkable

import torch

from fdfast.errors import MissingDependency  # noqa: F401 - re-exported: the backends raise it

# Distillation / fine-tune RandomResizedCrop ranges (torchvision defaults, used by FD).
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class LoaderSpec:
    """What the trainer asks of a backend; built from DataConfig by ``pipelines.build_loader``."""

    path: str                 # ImageFolder dir or .beton (empty for synthetic)
    train: bool               # True: random-resized-crop + flip, shuffled, drop_last; False: resize + center crop
    batch_size: int           # per rank
    img_size: int             # output H = W
    device: torch.device
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    num_workers: int = 4
    prefetch: int = 2
    min_scale: float = 0.08
    max_scale: float = 1.0
    interpolation: str = "bilinear"
    eval_resize: int = 256
    num_classes: int = 1000
    synthetic_size: int = 4096
    auto_augment: str | None = None   # timm RandAugment spec, or None
    ffcv_order: str = "random"
    ffcv_os_cache: bool = True
    dali_hw_decoder_load: float = 0.65


@runtime_checkable
class Loader(Protocol):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None: ...

    @property
    def num_samples(self) -> int:
        """Images in the whole dataset (all ranks)."""
        ...


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


def empty_batch(spec: LoaderSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of no images, in the contract's layout on ``spec.device``; ``pad_eval_batch`` fills it
    with padding for a rank whose shard ran out before its last eval batches."""
    images = torch.empty((0, 3, spec.img_size, spec.img_size), dtype=torch.uint8, device=spec.device)
    return (images.contiguous(memory_format=torch.channels_last),
            torch.empty((0,), dtype=torch.int64, device=spec.device))


def check_center_crop_backend(spec: LoaderSpec, backend: str) -> None:
    """Reject what a backend with a fixed decode pipeline (no RandAugment, eval = centre crop of the
    resized image) cannot do: ``auto_augment``, and an eval resize smaller than the crop."""
    if spec.auto_augment:
        raise ValueError(f"data.auto_augment={spec.auto_augment!r} is not available with data.backend='{backend}'; "
                         "use data.backend='torchvision' for RandAugment, or set data.auto_augment=null")
    if not spec.train and spec.eval_resize < spec.img_size:
        raise ValueError(f"data.eval_resize={spec.eval_resize} is smaller than the image size {spec.img_size}; "
                         "the center crop must fit inside the resized image (e.g. 256 for 224)")


class CountedLoader:
    """Pass bookkeeping of the backends that count their own batches (FFCV, DALI).

    A subclass sets ``spec`` and ``_len`` (training: full batches per rank) or calls
    :meth:`_count_eval_batches` (evaluation), and in ``__iter__`` starts with :meth:`_begin_pass`, hands
    each batch through :meth:`_finish_batch` and ends with :meth:`_padding_batches`: evaluation pads the
    pass's last batch and adds padding-only batches where the rank's shard ran out early, so every rank
    yields ``ceil(ceil(N / world) / batch)`` batches of equal shapes.
    """

    spec: LoaderSpec
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
        self._per_rank = math.ceil(num_samples / self.spec.world_size)
        self._len = math.ceil(self._per_rank / self.spec.batch_size)

    def _last_batch_size(self) -> int:
        return self._per_rank - (self._len - 1) * self.spec.batch_size

    def _finish_batch(self, images: torch.Tensor, labels: torch.Tensor,
                      emitted: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``emitted`` (1-based) as it is handed out: the last eval batch padded."""
        if not self.spec.train and emitted == self._len:
            return pad_eval_batch(images, labels, self._last_batch_size())
        return images, labels

    def _padding_batches(self, emitted: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Eval: the batches after the ``emitted`` ones, where this rank's shard is empty."""
        while emitted < self._len:
            emitted += 1
            yield pad_eval_batch(*empty_batch(self.spec), self._last_batch_size())
