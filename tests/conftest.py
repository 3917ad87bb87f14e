"""Shared fixtures: tiny configs (32 px, 2-block students, 1-block teachers) and generated images."""
from __future__ import annotations

import os

import pytest
import torch

from fdfast.config import config_from_dict
from pipelines.generate import make_image_folder

# Reproducible CPU numerics independent of the machine's core count.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _test_cache_dir(tmp_path_factory):
    """Files fdfast caches (teacher file hashes) go to the session's temporary folder, not the user's cache,
    from before the first module-scoped fixture builds a teacher; subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "xdg_cache"))
        yield


def tiny_dict(tmp_path, **sections) -> dict:
    """A distillation config small enough for CPU tests: 17 tokens on both sides."""
    d = {
        "model": {
            "student": {"arch": "beit", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                        "num_heads": 2, "drop_path": 0.1},
            "teacher": {"kind": "clip", "model": "vit_base_patch16_clip_quickgelu_224",
                        "model_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 2},
                        "weights": "random"},
        },
        "data": {"backend": "synthetic", "synthetic_size": 64, "num_classes": 4, "num_workers": 0},
        "optim": {"base_lr": 1e-3, "warmup_epochs": 1},
        "train": {"epochs": 2, "batch_size": 8, "output_dir": str(tmp_path / "run")},
        "checkpoint": {"every": 4},
        "log": {"every": 1, "progress": "none"},
    }
    for section, values in sections.items():
        for k, v in values.items():
            node = d.setdefault(section, {})
            if isinstance(v, dict) and isinstance(node.get(k), dict):
                node[k] = {**node[k], **v}
            else:
                node[k] = v
    return d


@pytest.fixture
def tiny_cfg(tmp_path):
    def make(**sections):
        return config_from_dict(tiny_dict(tmp_path, **sections))
    return make


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """4 classes x 12 JPEGs of mixed sizes (some smaller than the crop)."""
    return make_image_folder(tmp_path_factory.mktemp("images") / "train", num_classes=4, per_class=12,
                             sizes=((40, 56), (64, 48), (96, 80), (24, 30)))
