"""``data.eval_resize``: unset = the official ``int(256 / 224 * img_size)`` (``data_finetune.py``), which the
loaders, the exported ``crop_pct`` and fdfast-eval all follow; below the crop it is refused on every backend."""
from __future__ import annotations

import math
from argparse import Namespace

import pytest
import torch
import torch.nn as nn

import pipelines
from conftest import tiny_dict
from fdfast.cli import eval as eval_cli
from fdfast.config import ConfigError, DataConfig, config_from_dict
from fdfast.distributed import DistInfo
from fdfast.interop.export import eval_preprocessing
from fdfast.interop.sources import Subject
from pipelines.torchvision import build_transform

OFFICIAL = {192: 219, 224: 256, 384: 438, 32: 36}


def _cfg(tmp_path, img_size, **data):
    return config_from_dict(tiny_dict(tmp_path, model={"student": {"img_size": img_size}}, data=data))


@pytest.mark.parametrize("img_size", sorted(OFFICIAL))
def test_unset_eval_resize_is_the_official_ratio_and_the_export_follows(tmp_path, img_size):
    cfg = _cfg(tmp_path, img_size)
    assert cfg.data.eval_resize == OFFICIAL[img_size]
    # timm resizes to floor(img_size / crop_pct): the exported crop_pct must land on the same size
    crop_pct = eval_preprocessing(cfg)["crop_pct"]
    assert math.floor(img_size / crop_pct) == OFFICIAL[img_size]


def test_a_set_eval_resize_is_kept_and_a_bare_data_section_resolves_per_size(tmp_path):
    assert _cfg(tmp_path, 192, eval_resize=256).data.eval_resize == 256
    resize = build_transform(DataConfig(), train=False, img_size=384).transforms[0]
    assert resize.size == 438


@pytest.mark.parametrize("backend", ["synthetic", "torchvision", "nvjpeg", "dali", "ffcv"])
def test_an_eval_resize_below_the_crop_is_refused_on_every_backend(tmp_path, backend):
    train = "x.beton" if backend == "ffcv" else "x"
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, 64, backend=backend, train=train, eval_resize=60)
    msg = str(e.value)
    assert "data.eval_resize=60" in msg and "model.student.img_size=64" in msg and "\n" not in msg
    assert "73" in msg  # the official value it could use instead


def test_fdfast_eval_uses_the_official_ratio_for_files_without_one(monkeypatch):
    """An official FD file carries no eval preprocessing: fdfast-eval resizes to int(256 / 224 * size) (438 at
    384, where rounding would give 439)."""
    seen = {}

    class Stop(Exception):
        pass

    def fake_loader(data, *, train, img_size, **kw):
        seen["transform"] = build_transform(data, train=train, img_size=img_size)
        raise Stop

    monkeypatch.setattr(pipelines, "build_loader", fake_loader)
    subject = Subject(name="m", role="classifier", source="m.pth", network=nn.Identity(), img_size=384,
                      num_classes=10)
    args = Namespace(backend="torchvision", data="val", workers=0, batch_size=4)
    with pytest.raises(Stop):
        eval_cli.evaluate(subject, args, DistInfo(device=torch.device("cpu")))
    assert seen["transform"].transforms[0].size == 438
