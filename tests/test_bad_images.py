"""``data.on_bad_image`` in the backends that decode image files while loading (torchvision, nvjpeg, dali):
``error`` stops with one line naming every bad file found, ``skip`` fills their slots deterministically,
counts and logs them; through the loaders and through ``fdfast-train``. Also the eval-resize check that
moved from the loaders into the config."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from _loader_helpers import BAD_NAMES, make_damaged_folder, make_loader
from conftest import tiny_dict
from fdfast.cli import train as train_cli
from fdfast.config import ConfigError, config_from_dict
from pipelines import DataError, check_batch

BACKENDS = ("torchvision", "nvjpeg", "dali")
N_GOOD, N_FILES = 12, 15      # 2 classes x 6 generated images, + BAD_NAMES
REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")    # torchvision.io's deprecation notice


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
