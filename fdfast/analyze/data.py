"""The analysed images: an ImageFolder subset through the torchvision backend's evaluation transform
(resize the shorter side to ``img_size * 256 / 224``, bicubic, then center-crop), or generated images
(``--synthetic``: :mod:`pipelines.generate`'s class patterns written to a temporary folder and read the
same way). Images stay uint8 on the CPU; each model gets them resized to its own input size and
normalised with its own mean/std on the device."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from pipelines.base import DataError
from pipelines.generate import make_image_folder
from pipelines.torchvision import build_transform

from ..config import DataConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # uint8 (B, 3, S, S) pixels, int64 (B,) labels
SYNTHETIC_CLASSES = 4


def eval_resize(img_size: int) -> int:
    """The standard evaluation ratio (256 for 224) at any input size."""
    return round(img_size * 256 / 224)


def resize_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or float pixels (B, 3, H, W) -> float pixels in [0, 255] at ``size`` x ``size`` (bilinear, no
    antialias: what the FD step does when the teacher's input size differs from the student's)."""
    x = images.float()
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return x


def load_images(folder: Optional[str], *, num_images: int, img_size: int, batch_size: int, seed: int = 0,
                num_workers: int = 2) -> list[Batch]:
    """``num_images`` images (a seeded random subset when the folder holds more) as uint8 batches.
    ``folder=None`` generates them."""
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            per_class = math.ceil(num_images / SYNTHETIC_CLASSES)
            root = make_image_folder(Path(tmp) / "images", num_classes=SYNTHETIC_CLASSES, per_class=per_class,
                                     sizes=((eval_resize(img_size), eval_resize(img_size)),), seed=seed)
            return _read(str(root), num_images, img_size, batch_size, seed, num_workers)
    check_image_folder(folder)
    return _read(folder, num_images, img_size, batch_size, seed, num_workers)


def check_image_folder(folder: Optional[str]) -> None:
    """Fail before any model is loaded when ``--data`` does not exist (None: generated images)."""
    if folder is not None and not Path(folder).is_dir():
        raise DataError(f"--data {folder}: no such folder; pass an ImageFolder root (one sub-folder of images "
                        "per class), or --synthetic")


def _read(folder: str, num_images: int, img_size: int, batch_size: int, seed: int, num_workers: int) -> list[Batch]:
    transform = build_transform(DataConfig(eval_resize=eval_resize(img_size)), train=False, img_size=img_size)
    try:
        dataset = ImageFolder(folder, transform=transform)
    except (FileNotFoundError, RuntimeError) as e:  # no class folders / no images with a known extension
        raise DataError(f"--data {folder}: not a usable ImageFolder ({e})") from None
    n = len(dataset)
    if n < num_images:
        raise DataError(f"--data {folder} holds {n} images, fewer than --num-images {num_images}; "
                        f"lower --num-images to {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:num_images].sort().values
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, num_workers=num_workers)
    try:
        return [(images.contiguous(), labels.long()) for images, labels in loader]
    except (OSError, RuntimeError) as e:  # PIL errors, re-raised by the DataLoader workers
        raise DataError(f"--data {folder}: cannot decode an image ({str(e).splitlines()[-1]}); "
                        f"`fdfast-convert {folder} --check-only` lists every unreadable file") from None
