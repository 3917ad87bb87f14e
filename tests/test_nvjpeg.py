"""pipelines.nvjpeg: loader contract, agreement with the torchvision reference (train crops are the
same boxes; eval is resize-bicubic + center crop), crop/flip ranges, sharding, fallbacks. On CPU the
same code decodes with torchvision's CPU JPEG decoder; the GPU test runs nvJPEG."""
from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from _loader_helpers import CPU, crop_geometry, make_coordinate_folder, make_loader, make_mixed_folder
from pipelines.base import CROP_RATIO, check_batch
from pipelines.nvjpeg import _read, eval_geometry, jpeg_header, rrc_params, train_params

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")


def loader(backend, path, *, train=True, bs=8, size=48, rank=0, world=1, device=CPU, **data):
    return make_loader(backend, path, train=train, batch_size=bs, img_size=size, device=device, rank=rank,
                       world_size=world, **{"num_workers": 2, "eval_resize": 56, **data})


def nvjpeg(path, **kw):
    return loader("nvjpeg", path, **kw)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = make_mixed_folder(tmp_path_factory.mktemp("nv") / "mixed")
    # one CMYK JPEG: nvJPEG's colour conversion is not PIL's, so it must take the PIL path
    Image.new("CMYK", (70, 50), (10, 200, 30, 40)).save(root / "class_001" / "cmyk.jpg", quality=90)
    return root


def _pairs(a, b):
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        yield xa, ya, xb, yb


@pytest.mark.parametrize("train", [True, False])
def test_matches_torchvision_reference(mixed, train):
    """Train: the crop boxes and flips are drawn exactly as the reference draws them, so the pixels
    differ only by resampling (PIL vs torch antialias) rounding. Eval: same geometry, bicubic both."""
    nv, tv = nvjpeg(mixed, train=train), loader("torchvision", mixed, train=train)
    assert len(nv) == len(tv) and nv.num_samples == tv.num_samples
    nv.set_epoch(1)
    tv.set_epoch(1)
    n = 0
    for xa, ya, xb, yb in _pairs(nv, tv):
        check_batch(xa, ya)
        assert torch.equal(ya, yb)
        diff = (xa.float() - xb.float()).abs()
        assert diff.mean() < 0.5, diff.mean()
        assert diff.max() <= 4, diff.max()
        n += len(ya)
    assert n == (len(nv) * 8 if train else nv.num_samples)
    assert nv.stats["pil_fallback"] >= 1 and nv.stats["decode_jpeg"] > 0  # PNGs + CMYK went to PIL


def test_rrc_params_equal_torchvision_get_params():
    for seed in range(200):
        h, w = 40 + seed % 170, 300 - seed
        torch.manual_seed(seed)
        ref = T.RandomResizedCrop.get_params(torch.empty(1, h, w), [0.08, 1.0], list(CROP_RATIO))
        ref_flip = bool(torch.rand(1) < 0.5)
        g = torch.Generator().manual_seed(seed)
        assert rrc_params(h, w, (0.08, 1.0), CROP_RATIO, g) == ref
        assert bool(torch.rand(1, generator=g) < 0.5) == ref_flip


def test_crop_and_flip_ranges(tmp_path):
    """Crops of the coordinate folder: area within [min_scale, 1], aspect within [3/4, 4/3], about half flipped."""
    root = make_coordinate_folder(tmp_path / "coords")
    areas, ratios, flips = [], [], []
    for x, _ in nvjpeg(root, bs=16, size=64, min_scale=0.25):
        for img in x:
            g = crop_geometry(img)
            areas.append(g["area"])
            ratios.append(g["ratio"])
            flips.append(g["flipped"])
    assert min(areas) > 0.25 * 0.85 and max(areas) < 1.05
    assert min(ratios) > 0.75 * 0.9 and max(ratios) < 4 / 3 * 1.1
    assert 0.2 < sum(flips) / len(flips) < 0.8
    # the parameters themselves, without resampling noise
    for seed in range(300):
        i, j, h, w, _ = train_params(240, 320, seed, (0.25, 1.0))
        assert 0 <= i and i + h <= 240 and 0 <= j and j + w <= 320
        assert 0.25 * 240 * 320 * 0.97 <= h * w <= 240 * 320
        assert 0.75 * 0.95 <= w / h <= 4 / 3 * 1.05


@pytest.mark.parametrize("train", [True, False])
def test_sharding_disjoint_and_complete(mixed, train):
    world = 3
    loaders = [nvjpeg(mixed, train=train, bs=4, rank=r, world=world) for r in range(world)]
    assert len({len(ld) for ld in loaders}) == 1  # equal length on every rank
    shards = [[i for i, _ in ld.sampler] for ld in loaders]
    real = [i for sh in shards for i in sh if i >= 0]
    assert len(real) == len(set(real))  # disjoint
    n = loaders[0].num_samples
    if train:
        assert all(len(sh) % 4 == 0 for sh in shards) and len(real) >= n - world * 4
    else:
        assert sorted(real) == list(range(n))  # complete
        labels = torch.cat([y for ld in loaders for _, y in ld])
        assert (labels >= 0).sum() == n and (labels == -1).sum() == sum(len(sh) for sh in shards) - n


def test_set_epoch_is_deterministic_and_resumable(mixed):
    ld = nvjpeg(mixed, bs=4)
    ld.set_epoch(2)
    full = [x.clone() for x, _ in ld]
    ld.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip(full, (x for x, _ in ld), strict=True))
    ld.set_epoch(2, start_batch=3)
    rest = [x for x, _ in ld]
    assert len(rest) == len(full) - 3 and torch.equal(rest[0], full[3])
    ld.set_epoch(3)
    assert not torch.equal(next(iter(ld))[0], full[0])


def test_eval_geometry_is_torchvision_resize_centercrop():
    for h, w in [(375, 500), (500, 375), (256, 256), (300, 230), (64, 64)]:
        img = torch.zeros(1, h, w)
        nh, nw, top, left = eval_geometry(h, w, 256, 224)
        assert list(T.Resize(256, antialias=True)(img).shape[-2:]) == [nh, nw]
        assert top == int(round((nh - 224) / 2.0)) and left == int(round((nw - 224) / 2.0))


def test_jpeg_header(mixed, tmp_path):
    files = sorted(mixed.rglob("*"))
    comps = {}
    for f in files:
        if f.is_file():
            comps[f.name] = jpeg_header(_read(str(f)))
    assert comps["cmyk.jpg"][3] == 4
    assert any(v is not None and v[3] == 1 for v in comps.values())  # grayscale JPEGs
    assert any(v is not None and v[3] == 3 for v in comps.values())
    assert all(v is None for k, v in comps.items() if k.endswith(".png"))
    assert jpeg_header(bytearray(b"\xff\xd8\xff\xe0\x00")) == (0, 0, 0, 0)  # truncated


def test_grayscale_jpeg_becomes_three_channels(tmp_path):
    d = tmp_path / "g" / "c0"
    d.mkdir(parents=True)
    arr = (np.arange(60 * 80).reshape(60, 80) % 251).astype(np.uint8)
    Image.fromarray(arr, "L").save(d / "g.jpg", quality=95)
    ld = nvjpeg(tmp_path / "g", train=False, bs=1, size=48)
    x, _ = next(iter(ld))
    assert x.shape == (1, 3, 48, 48)
    assert torch.equal(x[0, 0], x[0, 1]) and torch.equal(x[0, 1], x[0, 2])


def test_early_break_stops_the_producer(mixed):
    ld = nvjpeg(mixed, bs=2)
    before = {t.name for t in threading.enumerate()}
    it = iter(ld)
    next(it)
    it.close()
    assert not any(t.name == "nvjpeg-producer" for t in threading.enumerate() if t.name not in before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("train", [True, False])
def test_cuda_nvjpeg_matches_cpu_decode(mixed, train):
    """nvJPEG (hardware / CUDA decode) vs libjpeg-turbo on the CPU: same crops, IDCT/upsampling
    differences of a level or two."""
    dev = torch.device("cuda")
    gpu = nvjpeg(mixed, train=train, device=dev)
    cpu = nvjpeg(mixed, train=train)
    for xa, ya, xb, yb in _pairs(gpu, cpu):
        check_batch(xa, ya)
        assert xa.device.type == "cuda"
        assert torch.equal(ya.cpu(), yb)
        diff = (xa.cpu().float() - xb.float()).abs()
        assert diff.mean() < 2.0, diff.mean()
    assert gpu.stats["decode_jpeg"] > 0
    assert math.isfinite(float(diff.mean()))
