"""DALI backend in CPU-only mode: the loader contract, torchvision-equivalent eval crops, training
crop geometry, order from (seed, epoch), shard math, and errors that name the file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nvidia.dali  # noqa: F401 - a missing DALI must fail this file, not skip it

from _loader_helpers import (COORD_CLASSES, COORD_PER_CLASS, collect, crop_geometry, hide_package, image_ids,
                             make_coordinate_folder, make_loader, make_mixed_folder, make_photo_folder,
                             match_to_reference, reference_eval_crops)
from pipelines import DataError, MissingDependency, check_batch
from pipelines.folder import list_image_folder
from pipelines.generate import make_image_folder

N_COORD = COORD_CLASSES * COORD_PER_CLASS


def dali(path, **kw):
    return make_loader("dali", path, **{"train": False, "batch_size": 7, "img_size": 224, "num_workers": 2, **kw})


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    folder = make_mixed_folder(tmp_path_factory.mktemp("dali-mixed") / "images")
    return folder, list_image_folder(folder, "data.val").samples


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    return make_coordinate_folder(tmp_path_factory.mktemp("dali-coord") / "images")


@pytest.fixture(scope="module")
def eval_loader(mixed):
    return dali(mixed[0])


def test_eval_matches_torchvision_and_sees_every_image_once(eval_loader, mixed):
    folder, samples = mixed
    assert eval_loader.num_samples == 40 and len(eval_loader) == 6
    kept = []
    for images, labels in eval_loader:
        check_batch(images, labels)
        kept.append((images, labels))          # not cloned: DALI must not recycle these buffers
    images, labels, sizes = collect(eval_loader)
    assert sizes == [7, 7, 7, 7, 7, 5] and images.shape[1:] == (3, 224, 224)
    assert torch.equal(torch.cat([x for x, _ in kept]), images)
    # torchvision backend's eval: Resize(256, bicubic) + CenterCrop(224), grayscale and RGBA -> RGB
    reference = reference_eval_crops([p for p, _ in samples], interpolation="bicubic")
    best, mad = match_to_reference(images, reference)
    assert sorted(best) == list(range(40)), "every image exactly once"
    assert labels.tolist() == [samples[i][1] for i in best]
    assert np.mean(mad) < 0.5 and max(mad) < 1.0, mad       # the same geometry: decoder rounding only


def test_training_crops_follow_scale_ratio_and_flip(coord):
    loader = dali(coord, train=True, batch_size=8, img_size=64, min_scale=0.25, max_scale=0.5, seed=11)
    geometry, epochs = [], []
    for _ in range(2):
        ids = []
        for images, labels in loader:
            check_batch(images, labels)
            assert images.shape == (8, 3, 64, 64)
            batch_ids = image_ids(images)
            assert labels.tolist() == [i // COORD_PER_CLASS for i in batch_ids]
            ids += batch_ids
            geometry += [crop_geometry(im) for im in images]
        epochs.append(ids)
    for ids in epochs:
        assert sorted(ids) == list(range(N_COORD))
    assert epochs[0] != epochs[1], "epochs must be reshuffled"
    area = [g["area"] for g in geometry]
    ratio = [g["ratio"] for g in geometry]
    assert 0.25 * 0.95 <= min(area) and max(area) <= 0.5 * 1.05, (min(area), max(area))
    assert 0.75 * 0.97 <= min(ratio) and max(ratio) <= 4 / 3 * 1.03, (min(ratio), max(ratio))
    assert min(ratio) < 0.9 and max(ratio) > 1.1, "the aspect-ratio range is used"
    flips = sum(g["flipped"] for g in geometry)
    assert 40 <= flips <= 88, f"{flips} of {len(geometry)} crops flipped"


def test_order_and_augmentation_are_functions_of_seed_and_epoch(coord):
    loader = dali(coord, train=True, batch_size=8, img_size=32, seed=5)

    def run(epoch, start_batch=0):
        loader.set_epoch(epoch, start_batch)
        return collect(loader)

    images, _, _ = run(3)
    ids = image_ids(images)
    assert ids == loader.epoch_order(3)[: len(loader) * 8].tolist()
    again, _, _ = run(3)
    assert torch.equal(again, images), "same (seed, epoch): same order and same crops"
    other, _, _ = run(4)
    assert image_ids(other) != ids
    tail, _, sizes = run(3, start_batch=5)
    assert image_ids(tail) == ids[5 * 8:] and len(sizes) == len(loader) - 5
    loader.set_epoch(3, start_batch=len(loader))
    assert list(loader) == []


def test_training_shards_are_disjoint_and_equal(coord):
    ranks = [dali(coord, train=True, batch_size=8, img_size=32, rank=r, world_size=3, seed=2) for r in range(3)]
    assert {len(r) for r in ranks} == {(N_COORD // 3) // 8}                # 21 per rank -> 2 batches
    for epoch in (0, 1):
        seen = []
        for r in ranks:
            r.set_epoch(epoch)
            x, _, sizes = collect(r)
            assert sizes == [8, 8]
            seen.append(image_ids(x))
        flat = [i for s in seen for i in s]
        assert len(set(flat)) == len(flat) == 48, "ranks read disjoint samples"
    # resuming mid-epoch trims every shard by the same amount and keeps them aligned
    r1 = ranks[1]
    r1.set_epoch(7)
    full = image_ids(collect(r1)[0])
    r1.set_epoch(7, start_batch=1)
    assert image_ids(collect(r1)[0]) == full[8:]


def test_eval_shards_count_every_image_once(mixed, eval_loader):
    reference, ref_labels, _ = collect(eval_loader)
    outputs = [collect(dali(mixed[0], rank=r, world_size=3, batch_size=4))
               for r in range(3)]
    assert [sizes for _, _, sizes in outputs] == [[4, 4, 4, 2]] * 3     # equal steps and shapes
    images = torch.cat([x for x, _, _ in outputs])
    labels = torch.cat([y for _, y, _ in outputs])
    real = labels >= 0
    assert int((~real).sum()) == 3 * 14 - 40 and torch.all(images[~real] == 0)
    best, mad = match_to_reference(images[real], reference)
    assert sorted(best) == list(range(40)) and max(mad) == 0
    assert labels[real].tolist() == ref_labels[best].tolist()
    # eval resume skips by iterating
    loader = dali(mixed[0], rank=2, world_size=3, batch_size=4)
    loader.set_epoch(0, start_batch=2)
    x, y, sizes = collect(loader)
    assert sizes == [4, 2] and torch.equal(y, outputs[2][1][8:]) and torch.equal(x, outputs[2][0][8:])


def test_eval_geometry_is_torchvision_on_photos(tmp_path):
    """Resize(256, bicubic) + CenterCrop(224) on the commonest ImageNet shapes and others: the same output
    size, anchors and filter, so only decoder and resampling rounding differ."""
    folder = make_photo_folder(tmp_path / "photos")
    samples = list_image_folder(folder, "data.val").samples
    images, _, _ = collect(dali(folder, batch_size=4))
    reference = reference_eval_crops([p for p, _ in samples], interpolation="bicubic")
    for (path, _), x, ref in zip(samples, images, reference, strict=True):
        mad = float((x.float() - ref.float()).abs().mean())
        assert mad <= 1.0, (path, mad)


def test_missing_folders_and_line_breaks_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        dali(tmp_path / "missing")
    with pytest.raises(DataError, match="no class sub-folders"):
        dali(tmp_path)
    make_image_folder(tmp_path / "odd", num_classes=1, per_class=2, sizes=((40, 40),))
    (tmp_path / "odd" / "class_000" / "line\nbreak.jpg").write_bytes(
        (tmp_path / "odd" / "class_000" / "img_0000.jpg").read_bytes())
    with pytest.raises(DataError, match="line break"):
        dali(tmp_path / "odd")


def test_missing_dali_says_how_to_install(coord, monkeypatch):
    hide_package(monkeypatch, "nvidia.dali")
    with pytest.raises(MissingDependency, match="install_optional_deps.sh"):
        dali(coord)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decoding_follows_the_contract(coord):
    loader = dali(coord, train=True, batch_size=8, img_size=64, device=torch.device("cuda"))
    seen = []
    for images, labels in loader:
        check_batch(images, labels)
        assert images.is_cuda
        seen += image_ids(images)
    assert sorted(seen) == list(range(N_COORD))
