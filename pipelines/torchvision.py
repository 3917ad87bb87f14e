"""Reference backend: PIL decode + torchvision transforms in DataLoader workers (CPU).

Semantics every faster backend must match:

* train: RandomResizedCrop(S, scale=(min,max), ratio=(3/4,4/3), bilinear by default) + flip 0.5
  (+ timm RandAugment for fine-tuning);
* eval: Resize(shorter side -> eval_resize, bicubic) + CenterCrop(S).

Determinism: the sampler permutes indices from ``(seed, epoch)`` and hands each sample its own
seed, so augmentations do not depend on worker count or scheduling, and ``set_epoch(e, k)`` resumes
exactly at batch k. Sharding: rank r takes every world-th index; training drops the remainder so all
ranks have equal length; evaluation pads with black images labelled -1 that metrics must ignore, so
nothing is counted twice. A file PIL cannot decode (or one over the pixel limit of
:func:`pipelines.folder.open_image`) is handled as ``data.on_bad_image`` says (:class:`pipelines.base.BadImages`):
the worker reports it with the batch, the loader raises or logs it; ``error`` first decodes the batches in
flight too, as the DALI backend does, so the message names every bad file found there. Files the listing
found to be no regular files (a FIFO) are handled the same way before the first batch, and never opened.
"""
from __future__ import annotations

import math
import random

import torch
from PIL import Image
from timm.data import auto_augment as aa
from timm.data.transforms import str_to_pil_interp
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms as T

from fdfast.config.data import DataConfig
from fdfast.guard import leave_stop_signals_to_the_parent

from .base import CROP_RATIO, BadImages, LoaderRequest, batches_in_flight
from .folder import find_undecodable, list_image_folder, load_rgb, next_readable, why_undecodable

_INTERP = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits giving a black image again.

    RandAugment 'inc1' maps magnitude 10 to 0 bits; with m9 and mstd 0.5 the magnitude reaches 10 in
    ~2 % of posterize draws. Older Pillow returned a black image for 0 bits (what the official
    fine-tuning saw); current Pillow raises ValueError, which kills the DataLoader worker.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return aa.posterize(img, bits_to_keep, **kwargs)


def build_rand_augment(spec: str, img_size: int, interpolation: str):
    """timm RandAugment with the hyper-parameters of timm's ``transforms_imagenet_train`` (the official
    fine-tune transform): translate 45 % of the crop, fill with the ImageNet mean, and the configured
    interpolation for the geometric ops (bicubic in the fine-tune configs; timm picks at random
    when none is given)."""
    hparams = dict(translate_const=int(img_size * 0.45), img_mean=(124, 116, 104),
                   interpolation=str_to_pil_interp(interpolation))
    ra = aa.rand_augment_transform(spec, hparams)
    for op in ra.ops:
        if op.aug_fn is aa.posterize:
            op.aug_fn = _posterize
    return ra


def build_transform(data: DataConfig, *, train: bool, img_size: int):
    """PIL -> uint8 CHW tensor, with the contract's augmentation semantics."""
    if train:
        ops = [T.RandomResizedCrop(img_size, scale=(data.min_scale, data.max_scale), ratio=CROP_RATIO,
                                   interpolation=_INTERP[data.interpolation]),
               T.RandomHorizontalFlip(0.5)]
        if data.auto_augment:
            ops.append(build_rand_augment(data.auto_augment, img_size, data.interpolation))
    else:
        ops = [T.Resize(data.eval_resize_at(img_size), interpolation=T.InterpolationMode.BICUBIC),
               T.CenterCrop(img_size)]
    return T.Compose(ops + [T.PILToTensor()])


class _Folder(Dataset):
    """``(image, label, bad files met)`` per ``(index, sample seed)``; index -1 is eval padding."""

    def __init__(self, samples: list[tuple[str, int]], transform, request: LoaderRequest, skip: bool):
        self.samples, self.transform = samples, transform
        self.train, self.skip, self.size = request.train, skip, request.img_size

    def __len__(self) -> int:
        return len(self.samples)

    def blank(self) -> torch.Tensor:
        return torch.zeros((3, self.size, self.size), dtype=torch.uint8)

    def __getitem__(self, item: tuple[int, int]):
        index, sample_seed = item
        bad: list[tuple[str, str]] = []
        if index < 0:
            return self.blank(), -1, bad
        try:
            img = load_rgb(self.samples[index][0])
        except Exception as e:  # noqa: BLE001 - reported to the loader, which applies data.on_bad_image
            bad.append((self.samples[index][0], why_undecodable(self.samples[index][0], e)))
            if not (self.skip and self.train):
                return self.blank(), -1, bad
            index, img = next_readable(self.samples, index + 1, load_rgb, bad)
        # per-sample RNG: augmentation depends on (seed, epoch, index) only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            py_state = random.getstate()
            random.seed(sample_seed)
            try:
                x = self.transform(img)
            finally:
                random.setstate(py_state)
        return x, self.samples[index][1], bad


def _collate(batch):
    images, labels, bad = zip(*batch)
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64), [b for found in bad for b in found]


class _ShardSampler(Sampler):
    def __init__(self, n: int, request: LoaderRequest):
        self.n, self.request = n, request
        self.epoch, self.start = 0, 0
        w, bs = request.world_size, request.batch_size
        self.per_rank = (n // w) // bs * bs if request.train else math.ceil(n / w)

    def indices(self) -> list[int]:
        r = self.request
        if r.train:
            g = torch.Generator().manual_seed(r.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n)) + [-1] * (self.per_rank * r.world_size - self.n)
        return order[r.rank::r.world_size][: self.per_rank]

    def __iter__(self):
        base = (self.request.seed * 1_000_003 + self.epoch) * 10_000_019
        idx = self.indices()[self.start * self.request.batch_size:]
        return iter([(i, base + i) for i in idx])

    def __len__(self) -> int:
        return self.per_rank - self.start * self.request.batch_size


class _ShardedFolderLoader:
    """The contract's bookkeeping shared by the ImageFolder backends (this one and ``pipelines.nvjpeg``):
    the folder listing, its :class:`_ShardSampler` (order, shards, per-sample seeds, eval padding), the
    bad-image policy, and ``len``, ``set_epoch``, ``num_samples`` and ``classes`` derived from them.
    ``check_pixels``: the listing reads every header for the pixel limit (decoders that do not apply it)."""

    check_pixels = False

    def __init__(self, data: DataConfig, request: LoaderRequest):
        self.data, self.request = data, request
        path = request.source(data)
        self.listing = list_image_folder(path, request.key, check_pixels=self.check_pixels)
        self.samples = self.listing.samples
        keep = request.subset([y for _, y in self.samples])
        if keep is not None:
            self.samples = [self.samples[i] for i in keep]
        self.bad_images = BadImages(data.on_bad_image, path, request.key)
        self.bad_images.handle(self.listing.bad)   # left out of the samples: nothing opens them
        self.sampler = _ShardSampler(len(self.samples), request)
        if request.train and self.sampler.per_rank == 0:
            raise request.no_full_batch(path, len(self.samples))

    @property
    def num_samples(self) -> int:
        return len(self.samples)

    @property
    def classes(self) -> list[str]:
        return self.listing.classes

    @property
    def skipped_images(self) -> int:
        return self.bad_images.count

    def __len__(self) -> int:
        per, bs = self.sampler.per_rank, self.request.batch_size
        return per // bs if self.request.train else math.ceil(per / bs)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch, self.sampler.start = epoch, start_batch

    def with_files_ahead(self, bad: list[tuple[str, str]], ahead: list[int]) -> list[tuple[str, str]]:
        """``bad`` (found in one batch), and under ``data.on_bad_image=error`` the bad files among the samples
        ``ahead`` (the batches in flight after it), decoded here with PIL: the error then names all of them."""
        if not bad or self.bad_images.skip:
            return bad
        return bad + find_undecodable([self.samples[i][0] for i in ahead if i >= 0])

    def with_batches_in_flight(self, bad: list[tuple[str, str]], batch: int) -> list[tuple[str, str]]:
        """:meth:`with_files_ahead` for batch ``batch`` of the sampler's pass (while the pass runs)."""
        if not bad or self.bad_images.skip:
            return bad
        bs = self.request.batch_size
        order = self.sampler.indices()[(self.sampler.start + batch + 1) * bs:]
        return self.with_files_ahead(bad, order[:batches_in_flight(self.data) * bs])


class TorchvisionLoader(_ShardedFolderLoader):
    def __init__(self, data: DataConfig, request: LoaderRequest):
        super().__init__(data, request)
        dataset = _Folder(self.samples, build_transform(data, train=request.train, img_size=request.img_size),
                          request, self.bad_images.skip)
        workers = data.num_workers
        self.loader = DataLoader(
            dataset, batch_size=request.batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=_collate, pin_memory=request.device.type == "cuda", drop_last=request.train,
            persistent_workers=workers > 0, prefetch_factor=data.prefetch if workers > 0 else None,
            # DataLoader draws a worker base seed per iterator; from the global RNG that would shift
            # the training RNG stream (drop path) depending on where an epoch was resumed.
            generator=torch.Generator().manual_seed(request.seed),
            worker_init_fn=leave_stop_signals_to_the_parent)

    def __iter__(self):
        dev = self.request.device
        try:
            for batch, (images, labels, bad) in enumerate(self.loader):
                self.bad_images.handle(self.with_batches_in_flight(bad, batch))
                images = images.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                yield images, labels.to(dev, non_blocking=True)
        finally:
            self.sampler.start = 0
