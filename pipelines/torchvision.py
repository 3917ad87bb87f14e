"""Reference backend: torchvision ImageFolder + PIL transforms in DataLoader workers (CPU decode).

Semantics every faster backend must match:

* train: RandomResizedCrop(S, scale=(min,max), ratio=(3/4,4/3), bilinear by default) + flip 0.5
  (+ timm RandAugment for fine-tuning);
* eval: Resize(shorter side -> eval_resize, bicubic) + CenterCrop(S).

Determinism: the sampler permutes indices from ``(seed, epoch)`` and hands each sample its own
seed, so augmentations do not depend on worker count or scheduling, and ``set_epoch(e, k)`` resumes
exactly at batch k. Sharding: rank r takes every world-th index; training drops the remainder so all
ranks have equal length; evaluation pads with ``label = -1`` entries that metrics must ignore, so
nothing is counted twice.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .base import CROP_RATIO, LoaderSpec

_INTERP = {"bilinear": "BILINEAR", "bicubic": "BICUBIC"}


def _pil_loader(path: str):
    from PIL import Image  # noqa: PLC0415

    with open(path, "rb") as f:
        return Image.open(f).convert("RGB")


def _posterize(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits giving a black image again.

    RandAugment 'inc1' maps magnitude 10 to 0 bits; with m9 and mstd 0.5 the magnitude reaches 10 in
    ~2 % of posterize draws. Older Pillow returned a black image for 0 bits (what the official
    fine-tuning saw); current Pillow raises ValueError, which kills the DataLoader worker.
    """
    from PIL import Image  # noqa: PLC0415
    from timm.data.auto_augment import posterize  # noqa: PLC0415

    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def build_rand_augment(spec: LoaderSpec):
    """timm RandAugment with the hyper-parameters of timm's ``transforms_imagenet_train`` (the official
    fine-tune transform): translate 45 % of the crop, fill with the ImageNet mean, and the configured
    interpolation for the geometric ops (bicubic in the fine-tune configs; timm picks at random
    when none is given)."""
    from timm.data import auto_augment as aa  # noqa: PLC0415
    from timm.data.transforms import str_to_pil_interp  # noqa: PLC0415

    hparams = dict(translate_const=int(spec.img_size * 0.45), img_mean=(124, 116, 104),
                   interpolation=str_to_pil_interp(spec.interpolation))
    ra = aa.rand_augment_transform(spec.auto_augment, hparams)
    for op in ra.ops:
        if op.aug_fn is aa.posterize:
            op.aug_fn = _posterize
    return ra


def build_transform(spec: LoaderSpec):
    """PIL -> uint8 CHW tensor, with the contract's augmentation semantics."""
    from torchvision import transforms as T  # noqa: PLC0415

    interp = getattr(T.InterpolationMode, _INTERP[spec.interpolation])
    if spec.train:
        ops = [T.RandomResizedCrop(spec.img_size, scale=(spec.min_scale, spec.max_scale), ratio=CROP_RATIO,
                                   interpolation=interp),
               T.RandomHorizontalFlip(0.5)]
        if spec.auto_augment:
            ops.append(build_rand_augment(spec))
    else:
        ops = [T.Resize(spec.eval_resize, interpolation=T.InterpolationMode.BICUBIC),
               T.CenterCrop(spec.img_size)]
    return T.Compose(ops + [T.PILToTensor()])


class _Folder(Dataset):
    def __init__(self, root: str, transform):
        from torchvision.datasets import ImageFolder  # noqa: PLC0415

        if not Path(root).is_dir():
            raise FileNotFoundError(f"image folder {root!r} does not exist (data.train / data.val)")
        self.folder = ImageFolder(root, loader=_pil_loader)
        if len(self.folder) == 0:
            raise ValueError(f"image folder {root!r} holds no images")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item: tuple[int, int]):
        index, sample_seed = item
        path, label = self.folder.samples[max(index, 0)]
        try:
            img = _pil_loader(path)
        except Exception as e:  # name the file: a bare PIL error says nothing about which image
            raise RuntimeError(f"cannot decode image {path}: {e}; remove or replace the file "
                               "(`fdfast-convert` lists every unreadable file of a folder)") from e
        # per-sample RNG: augmentation depends on (seed, epoch, index) only
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            py_state = random.getstate()
            random.seed(sample_seed)
            try:
                x = self.transform(img)
            finally:
                random.setstate(py_state)
        return x, (label if index >= 0 else -1)


class _ShardSampler(Sampler):
    def __init__(self, n: int, spec: LoaderSpec):
        self.n, self.spec = n, spec
        self.epoch, self.start = 0, 0
        w, bs = spec.world_size, spec.batch_size
        if spec.train:
            self.per_rank = (n // w) // bs * bs
        else:
            self.per_rank = math.ceil(n / w)

    def indices(self) -> list[int]:
        s = self.spec
        if s.train:
            g = torch.Generator().manual_seed(s.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
            order += [-1] * (self.per_rank * s.world_size - self.n)
        return order[s.rank::s.world_size][: self.per_rank]

    def __iter__(self):
        base = (self.spec.seed * 1_000_003 + self.epoch) * 10_000_019
        idx = self.indices()[self.start * self.spec.batch_size:]
        return iter([(i, base + i) for i in idx])

    def __len__(self) -> int:
        return self.per_rank - self.start * self.spec.batch_size


class _ShardedFolderLoader:
    """The contract's bookkeeping shared by the ImageFolder backends (this one and ``pipelines.nvjpeg``):
    the folder, its :class:`_ShardSampler` (order, shards, per-sample seeds, eval padding), and ``len``,
    ``set_epoch``, ``num_samples`` and ``classes`` derived from them."""

    def __init__(self, spec: LoaderSpec, transform):
        self.spec = spec
        self.dataset = _Folder(spec.path, transform)
        self.sampler = _ShardSampler(len(self.dataset), spec)
        if spec.train and self.sampler.per_rank == 0:
            raise ValueError(f"{spec.path}: {len(self.dataset)} images give no full batch of {spec.batch_size} "
                             f"on each of {spec.world_size} ranks; lower train.batch_size")

    @property
    def num_samples(self) -> int:
        return len(self.dataset)

    @property
    def classes(self) -> list[str]:
        return self.dataset.folder.classes

    def __len__(self) -> int:
        per = self.sampler.per_rank
        return per // self.spec.batch_size if self.spec.train else math.ceil(per / self.spec.batch_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.epoch, self.sampler.start = epoch, start_batch


class TorchvisionLoader(_ShardedFolderLoader):
    def __init__(self, spec: LoaderSpec):
        super().__init__(spec, build_transform(spec))
        workers = max(0, spec.num_workers)
        self.loader = DataLoader(
            self.dataset, batch_size=spec.batch_size, sampler=self.sampler, num_workers=workers,
            pin_memory=spec.device.type == "cuda", drop_last=spec.train,
            persistent_workers=workers > 0, prefetch_factor=spec.prefetch if workers > 0 else None,
            # DataLoader draws a worker base seed per iterator; from the global RNG that would shift
            # the training RNG stream (drop path) depending on where an epoch was resumed.
            generator=torch.Generator().manual_seed(spec.seed))

    def __iter__(self):
        dev = self.spec.device
        try:
            for images, labels in self.loader:
                images = images.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
                yield images, labels.to(dev, non_blocking=True).long()
        finally:
            self.sampler.start = 0
