"""Data loaders behind one contract (see ``pipelines.base``).

``build_loader(data_cfg, train=..., batch_size=..., ...)`` builds the backend named by ``data.backend``
from the ``data`` config section; heavy optional libraries (FFCV, DALI) are imported only when their
backend is built.
"""
from __future__ import annotations

import dataclasses

import torch

from fdfast.config.data import DataConfig

from .base import BadImages, DataError, Loader, LoaderRequest, MissingDependency, check_batch, usable_cores
from .dali import DALILoader
from .ffcv import FFCVLoader
from .nvjpeg import NvJPEGLoader
from .synthetic import SyntheticLoader
from .torchvision import TorchvisionLoader

BACKENDS = {
    "synthetic": SyntheticLoader,
    "torchvision": TorchvisionLoader,
    "ffcv": FFCVLoader,
    "dali": DALILoader,
    "nvjpeg": NvJPEGLoader,
}


def build_loader(data_cfg: DataConfig, *, train: bool, batch_size: int, img_size: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, seed: int = 0, split: str = "", per_class: int = 0) -> Loader:
    """The loader of ``data_cfg.backend`` for one split (``train``) on this rank; ``split`` names another data
    field to read (e.g. ``knn_train``, in eval mode) and ``per_class`` caps its images per class."""
    if data_cfg.eval_resize is None:  # a bare DataConfig (a config's is resolved): the official ratio
        data_cfg = dataclasses.replace(data_cfg, eval_resize=data_cfg.eval_resize_at(img_size))
    request = LoaderRequest(train=train, batch_size=batch_size, img_size=img_size, device=device, rank=rank,
                            world_size=world_size, seed=seed, split=split, per_class=per_class)
    return BACKENDS[data_cfg.backend](data_cfg, request)


__all__ = ["BACKENDS", "BadImages", "DataError", "Loader", "LoaderRequest", "MissingDependency", "build_loader",
           "check_batch", "usable_cores"]
