"""``data.on_bad_image`` in the backends that decode image files while loading (torchvision, nvjpeg, dali):
``error`` stops with one line naming every bad file found, ``skip`` fills their slots deterministically,
counts and logs them; through the loaders and through ``fdfast-train``. Also the eval-resize check that
moved from the loaders into the config."""
from __future__ import annotations

import gc
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import pipelines.folder as F
from _loader_helpers import BAD_NAMES, hang_guard, make_damaged_folder, make_loader
from conftest import tiny_dict
from fdfast.cli import train as train_cli
from fdfast.config import ConfigError, config_from_dict
from pipelines import DataError, check_batch
from pipelines.generate import make_image_folder

BACKENDS = ("torchvision", "nvjpeg", "dali")
N_GOOD, N_FILES = 12, 15      # 2 classes x 6 generated images, + BAD_NAMES
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # torchvision.io's deprecation notice


@pytest.fixture(autouse=True)
def _free_dali_pipelines():
    """``pytest.raises`` keeps a failed DALI iteration's frames (its iterator, its pipeline) in a reference cycle;
    a DataLoader worker forked later (torchvision) would run that pipeline's destructor in its own garbage
    collection and wait forever for DALI's threads, which a fork does not copy. Collect it here first."""
    yield
    gc.collect()


@pytest.fixture(scope="module")
def damaged(tmp_path_factory) -> Path:
    return make_damaged_folder(tmp_path_factory.mktemp("damaged") / "images")


def loader(backend, root, **kw):
    return make_loader(backend, root, **{"num_workers": 1, **kw})


def bad_paths(root: Path) -> list[str]:
    return [str(root / name) for name in BAD_NAMES]


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_error_names_every_bad_file_in_one_line(backend, train, damaged):
    ld = loader(backend, damaged, train=train, batch_size=N_FILES)     # one batch: all three files in it
    with pytest.raises(DataError) as err:
        list(ld)
    msg = str(err.value)
    assert "\n" not in msg and f"data.{'train' if train else 'val'}='{damaged}'" in msg
    assert all(f"'{p}'" in msg for p in bad_paths(damaged)), msg
    assert "data.on_bad_image=skip" in msg and "fdfast-convert --check-only" in msg


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_in_training_fills_the_slots_deterministically(backend, damaged, capsys):
    ranks = [loader(backend, damaged, batch_size=3, rank=r, world_size=2, seed=1, on_bad_image="skip")
             for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == (N_FILES // 2) // 3
    passes = []
    for _ in range(2):
        labels = []
        for r in ranks:
            r.set_epoch(4)
            for images, y in r:
                check_batch(images, y)
                assert images.shape[0] == 3 and bool((y >= 0).all())
                labels.append(y)
        passes.append(torch.cat(labels))
    assert torch.equal(passes[0], passes[1]), "the same epoch gives the same batches again"
    found = set().union(*(r.bad_images.found for r in ranks))
    assert found <= set(bad_paths(damaged)) and sum(r.skipped_images for r in ranks) >= len(found) > 0
    out = capsys.readouterr().out
    assert all(out.count(f"skipped undecodable image '{p}'") == 1 for p in found), "each file is logged once"


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_in_evaluation_counts_every_good_image_once(backend, damaged):
    ld = loader(backend, damaged, train=False, batch_size=4, on_bad_image="skip")
    images, labels = zip(*[(x.clone(), y.clone()) for x, y in ld])
    images, labels = torch.cat(images), torch.cat(labels)
    assert len(labels) == N_FILES
    assert int((labels >= 0).sum()) == N_GOOD and torch.all(images[labels < 0] == 0)
    assert ld.skipped_images == 3 and set(ld.bad_images.found) == set(bad_paths(damaged))


def test_torchvision_and_nvjpeg_fill_the_same_slots(damaged):
    """Same sampler, same rule (the next readable file in folder order): the same labels in every batch."""
    tv, nv = (loader(b, damaged, batch_size=5, on_bad_image="skip", seed=3) for b in ("torchvision", "nvjpeg"))
    for ld in (tv, nv):
        ld.set_epoch(2)
    assert [y.tolist() for _, y in tv] == [y.tolist() for _, y in nv]
    assert tv.skipped_images == nv.skipped_images == 3


def _config(tmp_path, backend: str, policy: str, root: Path) -> Path:
    d = tiny_dict(tmp_path, data={"backend": backend, "train": str(root), "on_bad_image": policy},
                  train={"epochs": 2, "batch_size": N_FILES, "output_dir": str(tmp_path / f"run-{policy}")},
                  checkpoint={"every": 100})
    path = tmp_path / f"{backend}-{policy}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.mark.parametrize("backend", BACKENDS)
def test_fdfast_train_stops_with_exit_2_or_finishes(backend, damaged, tmp_path, capsys):
    assert train_cli.main(["-c", str(_config(tmp_path, backend, "error", damaged))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fdfast-train: DataError: undecodable image(s)"), err
    assert all(p in err[0] for p in bad_paths(damaged))
    assert train_cli.main(["-c", str(_config(tmp_path, backend, "skip", damaged))]) == 0
    out = capsys.readouterr().out
    assert "done: step 2" in out and out.count("skipped undecodable image") == 3


def test_the_console_script_prints_one_line_without_traceback(damaged, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fdfast.cli.train", "-c", str(_config(tmp_path, "dali", "error",
                                                                                       damaged))],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fdfast-train:")]
    assert len(lines) == 1 and all(p in lines[0] for p in bad_paths(damaged)), proc.stderr


@pytest.mark.parametrize("backend", ["dali", "ffcv", "torchvision"])
def test_an_eval_resize_below_the_crop_is_a_config_error(backend, tmp_path):
    train = "x.beton" if backend == "ffcv" else "x"
    with pytest.raises(ConfigError, match="data.eval_resize=24 is smaller than model.student.img_size=32"):
        config_from_dict(tiny_dict(tmp_path, data={"backend": backend, "train": train, "eval_resize": 24}))


# ----------------------------------------------------------------------------------------------
# Files that are no images: FIFOs, broken links, decompression bombs, link loops
# ----------------------------------------------------------------------------------------------
def write_jpeg_claiming(path: Path, width: int, height: int) -> Path:
    """A small valid JPEG whose frame header (SOF0) says ``width`` x ``height``: a decompression bomb's header."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (120, 60, 30)).save(buf, "JPEG", quality=90)
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="module")
def odd(tmp_path_factory) -> Path:
    """2 classes x 4 images, plus a FIFO and a broken link named like JPEGs, a 20000 x 20000 bomb and a link
    from inside a class folder back to the root (a loop)."""
    root = make_image_folder(tmp_path_factory.mktemp("odd") / "images", num_classes=2, per_class=4,
                             sizes=((48, 40), (40, 56)))
    os.mkfifo(root / "class_000" / "fifo.jpg")
    os.symlink(root / "nowhere.jpg", root / "class_000" / "gone.jpg")
    write_jpeg_claiming(root / "class_001" / "bomb.jpg", 20000, 20000)
    os.symlink("..", root / "class_001" / "loop")
    return root


ODD_BAD = {"class_000/fifo.jpg": "not a regular file: a FIFO",
           "class_000/gone.jpg": "not a regular file: a broken link"}


def test_the_listing_keeps_regular_files_and_each_folder_once(odd, capsys):
    listing = F.list_image_folder(odd, "data.train")
    assert len(listing.samples) == 9 and not any("loop" in p for p, _ in listing.samples)  # 8 + the bomb
    assert {os.path.relpath(p, odd): why for p, why in listing.bad} == ODD_BAD
    assert "a folder already listed" in capsys.readouterr().out
    checked = F.list_image_folder(odd, "data.train", check_pixels=True)
    assert len(checked.samples) == 8 and str(odd / "class_001" / "bomb.jpg") in dict(checked.bad)
    assert "over the limit of 89,478,485 pixels" in dict(checked.bad)[str(odd / "class_001" / "bomb.jpg")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_backend_opens_a_fifo_or_decodes_a_bomb(backend, odd):
    with hang_guard(f"{backend} hung on a FIFO among the images", seconds=120):
        with pytest.raises(DataError) as err:
            list(loader(backend, odd, train=False, batch_size=4))
        msg = str(err.value)
        assert "\n" not in msg and all(f"'{odd / name}' ({why}" in msg for name, why in ODD_BAD.items()), msg
        ld = loader(backend, odd, train=False, batch_size=4, on_bad_image="skip")
        labels = torch.cat([y for _, y in ld])
    assert int((labels >= 0).sum()) == 8 and set(ld.bad_images.found) == {str(odd / n) for n in ODD_BAD} | {
        str(odd / "class_001" / "bomb.jpg")}
    assert "over the limit of 89,478,485 pixels" in ld.bad_images.found[str(odd / "class_001" / "bomb.jpg")]


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_pixel_limit_and_one_message_in_every_backend(backend, tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "images", num_classes=2, per_class=2, sizes=((48, 40), (24, 30)))
    monkeypatch.setattr(F, "PIXEL_LIMIT", 1500, raising=False)  # 48 x 40 = 1920 pixels are too many, 24 x 30 not
    with pytest.raises(DataError) as err:
        list(loader(backend, root, train=False, batch_size=4))
    sizes = {p: Image.open(p).size for p, _ in F.list_image_folder(root, "x").samples}
    big = [p for p, (w, h) in sizes.items() if w * h > 1500]
    assert len(big) == 2 and all(f"'{p}' (" in str(err.value) for p in big), str(err.value)
    w, h = sizes[big[0]]
    assert f"{w} x {h} = 1,920 pixels is over the limit of 1,500 pixels (a decompression bomb?)" in str(err.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_names_the_bad_files_of_the_batches_in_flight(backend, damaged):
    """Small batches: the three bad files (sample 3, 9 and 12 in folder order) sit in batches 0, 2 and 3."""
    with pytest.raises(DataError) as err:
        list(loader(backend, damaged, train=False, batch_size=4))
    assert all(f"'{p}'" in str(err.value) for p in bad_paths(damaged)), str(err.value)
