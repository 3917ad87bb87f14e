"""FFCV backend on the CPU: the loader contract, torchvision-equivalent eval crops, training crop
geometry, order from (seed, epoch), sharding, and failure behaviour.

FFCV compiles every new loader's pipeline with numba on its first batch (seconds), so the loaders are
module-scoped and built with one worker where parallelism is not the point.
"""
from __future__ import annotations

import gc
import io

import numpy as np
import pytest
import torch
import yaml
from rich.console import Console

import ffcv.loader  # noqa: F401 - a missing FFCV must fail this file, not skip it

from _loader_helpers import (COORD_CLASSES, COORD_PER_CLASS, collect, crop_geometry, ffcv_rank_worker, hang_guard,
                             hide_package, image_ids, make_coordinate_folder, make_loader, make_mixed_folder,
                             make_photo_folder, match_to_reference, reference_eval_crops)
from conftest import tiny_dict
from pipelines import DataError, MissingDependency, check_batch
from pipelines.ffcv_writer import convert_folder
from pipelines.folder import list_image_folder

# FFCV compiles the same ctypes decoder into a new numba dispatcher for every loader; numba's
# finaliser of the previous one then reports a harmless KeyError as an "unraisable" exception.
pytestmark = pytest.mark.filterwarnings(
    r"ignore:(?s)Exception ignored in. <finalize object.*numba.core.dispatcher:pytest.PytestUnraisableExceptionWarning")

@pytest.fixture(scope="module", autouse=True)
def _collect_numba_dispatchers():
    """Release this module's loaders while its warning filter still applies (set up first, torn down last)."""
    yield
    gc.collect()
N_COORD = COORD_CLASSES * COORD_PER_CLASS


def ffcv(path, **kw):
    return make_loader("ffcv", path, **{"train": False, "batch_size": 7, "img_size": 224, "num_workers": 1, **kw})


def _convert(src, out):
    return convert_folder(src, out, num_workers=1, console=Console(file=io.StringIO()))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A mixed folder (with one corrupt file, skipped by the converter) and its .beton."""
    root = tmp_path_factory.mktemp("ffcv-mixed")
    folder = make_mixed_folder(root / "images", corrupt=1)
    result = _convert(folder, root / "mixed.beton")
    assert [p for p, _ in result.skipped] == [str(folder / "class_000" / "corrupt_0.jpg")]
    good = [(p, y) for p, y in list_image_folder(folder, "SRC").samples if "corrupt" not in p]
    return root / "mixed.beton", good


@pytest.fixture(scope="module")
def coord_beton(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffcv-coord")
    _convert(make_coordinate_folder(root / "images"), root / "coord.beton")
    return root / "coord.beton"


@pytest.fixture(scope="module")
def eval_loader(mixed):
    # two workers: the parallel (prange) build of FFCV's pipeline is exercised here
    return ffcv(mixed[0], num_workers=2)


@pytest.fixture(scope="module")
def train_loader(coord_beton):
    return ffcv(coord_beton, train=True, batch_size=8, img_size=64, min_scale=0.25, max_scale=0.5, seed=11)


def test_eval_matches_torchvision_and_sees_every_image_once(eval_loader, mixed):
    _, good = mixed
    assert eval_loader.num_samples == 40 and len(eval_loader) == 6
    for images, labels in eval_loader:
        check_batch(images, labels)
    images, labels, sizes = collect(eval_loader)
    assert sizes == [7, 7, 7, 7, 7, 5] and images.shape[1:] == (3, 224, 224)
    # FFCV crops the central (224/256 * shorter side) square and resizes it (INTER_AREA): the region
    # of resize-256 + center-crop-224. Half the images were re-encoded as JPEG q90 by the converter.
    reference = reference_eval_crops([p for p, _ in good], interpolation="bilinear")
    best, mad = match_to_reference(images, reference)
    assert sorted(best) == list(range(40)), "every image exactly once"
    assert labels.tolist() == [good[i][1] for i in best]
    assert np.mean(mad) < 4.0 and max(mad) < 8.0, mad
    again, _, _ = collect(eval_loader)
    assert torch.equal(images, again)


def test_training_crops_follow_scale_ratio_and_flip(train_loader):
    threads = torch.get_num_threads()
    geometry, ids_per_epoch = [], []
    for _ in range(2):
        ids = []
        for images, labels in train_loader:
            check_batch(images, labels)
            assert images.shape == (8, 3, 64, 64)
            batch_ids = image_ids(images)
            assert labels.tolist() == [i // COORD_PER_CLASS for i in batch_ids]
            ids += batch_ids
            geometry += [crop_geometry(im) for im in images]
        ids_per_epoch.append(ids)
    assert torch.get_num_threads() == threads, "FFCV's torch.set_num_threads leaked out"
    for ids in ids_per_epoch:
        assert sorted(ids) == list(range(N_COORD))
    assert ids_per_epoch[0] != ids_per_epoch[1], "epochs must be reshuffled"
    area = [g["area"] for g in geometry]
    ratio = [g["ratio"] for g in geometry]
    assert 0.25 * 0.95 <= min(area) and max(area) <= 0.5 * 1.05, (min(area), max(area))
    assert 0.75 * 0.97 <= min(ratio) and max(ratio) <= 4 / 3 * 1.03, (min(ratio), max(ratio))
    assert min(ratio) < 0.9 and max(ratio) > 1.1, "the aspect-ratio range is used"
    flips = sum(g["flipped"] for g in geometry)
    assert 40 <= flips <= 88, f"{flips} of {len(geometry)} crops flipped"


def test_order_is_a_function_of_seed_and_epoch(train_loader, coord_beton):
    def ids_of(epoch, start_batch=0):
        train_loader.set_epoch(epoch, start_batch)
        return [image_ids(x) for x, _ in train_loader]

    full = ids_of(5)
    assert [i for b in full for i in b] == train_loader.epoch_order(5)[: 8 * len(train_loader)].tolist()
    assert ids_of(5) == full
    assert ids_of(6) != full
    assert ids_of(5, start_batch=3) == full[3:]
    assert ids_of(5, start_batch=len(train_loader)) == []
    train_loader.set_epoch(5)
    for i, _ in enumerate(train_loader):     # leaving an epoch early must not break the next one
        if i == 1:
            break
    assert ids_of(5) == full

    # QUASI_RANDOM shuffles its page tables in place; epoch_order must not depend on earlier epochs
    quasi = ffcv(coord_beton, train=True, batch_size=8, ffcv_order="quasi_random", seed=4)
    first = quasi.epoch_order(2).tolist()
    quasi.epoch_order(0), quasi.epoch_order(1)
    assert quasi.epoch_order(2).tolist() == first
    assert sorted(first) == list(range(N_COORD)) and quasi.epoch_order(3).tolist() != first


def test_eval_shards_are_disjoint_complete_and_equal(mixed, eval_loader):
    """Three eval ranks without a process group: every image once, equal batch shapes, -1 padding."""
    reference, ref_labels, _ = collect(eval_loader)
    outputs = [collect(ffcv(mixed[0], rank=r, world_size=3, batch_size=4))
               for r in range(3)]
    assert {len(sizes) for _, _, sizes in outputs} == {4}                    # ceil(ceil(40 / 3) / 4)
    assert [sizes for _, _, sizes in outputs] == [[4, 4, 4, 2]] * 3           # same shapes on every rank
    images = torch.cat([x for x, _, _ in outputs])
    labels = torch.cat([y for _, y, _ in outputs])
    real = labels >= 0
    assert int((~real).sum()) == 3 * 14 - 40
    assert torch.all(images[~real] == 0)
    best, mad = match_to_reference(images[real], reference)
    assert sorted(best) == list(range(40)) and max(mad) == 0
    assert labels[real].tolist() == ref_labels[best].tolist()


def test_two_rank_training_shards_with_a_process_group(coord_beton, tmp_path):
    torch.multiprocessing.spawn(ffcv_rank_worker, args=(2, str(tmp_path / "pg"), str(coord_beton), str(tmp_path)),
                                nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["len"] == r1["len"] == (N_COORD // 2) // 8
    for e in range(2):
        a, b = r0["epochs"][e], r1["epochs"][e]
        assert len(a) == len(b) == N_COORD // 2
        assert not set(a) & set(b) and sorted(a + b) == list(range(N_COORD))
    assert r0["epochs"][0] != r0["epochs"][1]


def test_a_failing_loader_thread_raises_instead_of_hanging(eval_loader, monkeypatch):
    original = eval_loader._EpochIterator.run_pipeline

    def fail_on_second(self, b_ix, *args):
        if b_ix == 1:
            raise ValueError("decoder exploded")
        return original(self, b_ix, *args)

    monkeypatch.setattr(eval_loader._EpochIterator, "run_pipeline", fail_on_second)
    with hang_guard("the loader hung after its thread failed", seconds=60):
        with pytest.raises(RuntimeError, match="decoder exploded"):
            for _ in eval_loader:
                pass
    monkeypatch.undo()
    assert sum(len(y) for _, y in eval_loader) == 40       # the next epoch works again


def test_unusable_files_are_one_line_naming_the_file(mixed, tmp_path):
    (tmp_path / "dir.beton").mkdir()
    (tmp_path / "junk.beton").write_bytes(b"not an FFCV file" * 8)
    whole = mixed[0].read_bytes()
    (tmp_path / "cut.beton").write_bytes(whole[:len(whole) // 2])
    cases = {"dir.beton": "is a folder", "missing.beton": "does not exist", "junk.beton": "corrupt header",
             "cut.beton": "truncated"}
    for name, expected in cases.items():
        with pytest.raises(DataError, match=expected) as err:
            ffcv(tmp_path / name)
        assert str(err.value).startswith(f"data.val='{tmp_path / name}'") and "fdfast-convert" in str(err.value)
    assert not (tmp_path / "missing.beton").exists(), "a missing .beton is reported, never generated"
    with pytest.raises(DataError, match="no full batch of 64"):
        ffcv(mixed[0], train=True, batch_size=64)
    with pytest.raises(RuntimeError, match="init_process_group"):
        ffcv(mixed[0], train=True, world_size=2)


def _corrupt(src, dst, edit) -> str:
    """A copy of the .beton ``src`` with ``edit(header, metadata region, whole file bytes)`` applied."""
    from ffcv.types import FieldDescType, HeaderType

    data = bytearray(src.read_bytes())
    header = np.frombuffer(data, dtype=HeaderType, count=1).copy()
    meta_at = HeaderType.itemsize + int(header["num_fields"][0]) * FieldDescType.itemsize
    data = edit(header, meta_at, data)
    data[:HeaderType.itemsize] = header.tobytes()
    dst.write_bytes(bytes(data))
    return str(dst)


def _meta_ff(header, meta_at, data):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.types import get_metadata_type

    size = int(header["num_samples"][0]) * get_metadata_type([RGBImageField(), IntField()]).itemsize
    data[meta_at:meta_at + size] = b"\xff" * size
    return data


def _set(**fields):
    def edit(header, meta_at, data):
        for k, v in fields.items():
            header[k] = v(int(header[k][0])) if callable(v) else v
        return data
    return edit


BETON_DAMAGE = {  # what a careless copy or a hostile file does, and the line it gets
    "more_samples": (_set(num_samples=lambda n: n * 1000), "corrupt header"),
    "one_more_sample": (_set(num_samples=lambda n: n + 1), "corrupt header"),
    "page_size_0": (_set(page_size=0), "corrupt header"),
    "metadata_ff": (_meta_ff, "corrupt sample metadata"),
    "table_past_end": (_set(alloc_table_ptr=lambda p: p + 10**9), "truncated"),
    "cut_in_the_data": (lambda h, m, data: data[:len(data) * 2 // 3], "truncated"),
    "cut_in_the_header": (lambda h, m, data: data[:20], "truncated"),
}


def test_damaged_beton_headers_are_one_line_before_ffcv_reads_them(mixed, tmp_path):
    for name, (edit, expected) in BETON_DAMAGE.items():
        path = _corrupt(mixed[0], tmp_path / f"{name}.beton", edit)
        for train in (False, True):
            with pytest.raises(DataError, match=expected) as err:
                ffcv(path, train=train, batch_size=4)
            assert str(err.value).startswith(f"data.{'train' if train else 'val'}='{path}'"), name
            assert "\n" not in str(err.value) and "fdfast-convert" in str(err.value)


def test_damaged_beton_through_the_commands_exits_2_and_leaves_no_output(mixed, tmp_path, capsys):
    from fdfast.cli import eval as eval_cli
    from fdfast.cli import train as train_cli

    path = _corrupt(mixed[0], tmp_path / "bad.beton", BETON_DAMAGE["more_samples"][0])
    assert eval_cli.main(["random:resnet10t", "--data", path, "--backend", "ffcv", "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("fdfast-eval:") == 1 and "corrupt header" in err and "Traceback" not in err, err
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_dict(tmp_path, data={"backend": "ffcv", "train": path})))
    assert train_cli.main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("fdfast-train:") == 1 and "corrupt header" in err and "Traceback" not in err, err
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # no lock, config or logs left behind


def test_eval_difference_to_torchvision_on_photos(tmp_path):
    """The number the README's backend table gives: FFCV's eval crop (the image stored at <= 500 px, half
    of them re-encoded as JPEG q90, the central 224/256 square resized with INTER_AREA) against
    torchvision's Resize(256, bicubic) + CenterCrop(224) of the original file, mean absolute difference
    in 8-bit levels per image."""
    folder = make_photo_folder(tmp_path / "photos")
    _convert(folder, tmp_path / "photos.beton")
    samples = list_image_folder(folder, "data.val").samples
    images, _, _ = collect(ffcv(tmp_path / "photos.beton", batch_size=5))
    reference = reference_eval_crops([p for p, _ in samples], interpolation="bicubic")
    mad = (images.float() - reference.float()).abs().flatten(1).mean(1)
    print(f"FFCV eval vs torchvision, mean abs per image: {mad.mean():.2f} (max {mad.max():.2f})")
    assert 0.5 < float(mad.mean()) < 4.0, mad     # a different resampler, not a different crop


def test_missing_ffcv_says_how_to_install(mixed, monkeypatch):
    hide_package(monkeypatch, "ffcv")
    with pytest.raises(MissingDependency, match="install_optional_deps.sh"):
        ffcv(mixed[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_follow_the_contract(coord_beton):
    loader = ffcv(coord_beton, train=True, batch_size=8, img_size=64, device=torch.device("cuda"))
    seen = []
    for images, labels in loader:
        check_batch(images, labels)
        assert images.is_cuda
        seen += image_ids(images)
    assert sorted(seen) == list(range(N_COORD))
