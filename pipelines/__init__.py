"""Data loaders behind one contract (see ``pipelines.base``).

``build_loader(data_cfg, ...)`` picks the backend named by ``data.backend``; heavy optional
libraries (FFCV, DALI) are imported only when their backend is chosen.
"""
from __future__ import annotations

import importlib

import torch

from .base import Loader, LoaderSpec, MissingDependency, check_batch

# backend name -> (module, factory function taking a LoaderSpec)
BACKENDS = {
    "synthetic": ("pipelines.synthetic", "SyntheticLoader"),
    "torchvision": ("pipelines.torchvision", "TorchvisionLoader"),
    "ffcv": ("pipelines.ffcv", "FFCVLoader"),
    "dali": ("pipelines.dali", "DALILoader"),
    "nvjpeg": ("pipelines.nvjpeg", "NvJPEGLoader"),
}


def make_spec(data_cfg, *, train: bool, batch_size: int, img_size: int, device: torch.device,
              rank: int = 0, world_size: int = 1, seed: int = 0) -> LoaderSpec:
    """Translate a ``DataConfig`` into the backend-neutral ``LoaderSpec``."""
    return LoaderSpec(
        path=data_cfg.train if train else data_cfg.val,
        train=train, batch_size=batch_size, img_size=img_size, device=device,
        rank=rank, world_size=world_size, seed=seed,
        num_workers=data_cfg.num_workers, prefetch=data_cfg.prefetch,
        min_scale=data_cfg.min_scale, max_scale=data_cfg.max_scale,
        interpolation=data_cfg.interpolation, eval_resize=data_cfg.eval_resize,
        num_classes=data_cfg.num_classes, synthetic_size=data_cfg.synthetic_size,
        auto_augment=data_cfg.auto_augment if train else None,
        ffcv_order=data_cfg.ffcv_order, ffcv_os_cache=data_cfg.ffcv_os_cache,
        dali_hw_decoder_load=data_cfg.dali_hw_decoder_load,
    )


def build_loader_from_spec(backend: str, spec: LoaderSpec) -> Loader:
    if backend not in BACKENDS:
        raise ValueError(f"unknown data.backend {backend!r}; choose one of {sorted(BACKENDS)}")
    module, cls = BACKENDS[backend]
    return getattr(importlib.import_module(module), cls)(spec)


def build_loader(data_cfg, **kwargs) -> Loader:
    """Build the loader of ``data_cfg.backend``; kwargs as in :func:`make_spec`."""
    return build_loader_from_spec(data_cfg.backend, make_spec(data_cfg, **kwargs))


__all__ = ["BACKENDS", "Loader", "LoaderSpec", "MissingDependency", "build_loader",
           "build_loader_from_spec", "check_batch", "make_spec"]
