"""The k-NN monitor (fdfast.tasks.knn): DINO's weighted k-NN against an independent reference, known answers on
constructed features and generated images, the per-class cap in every backend, the distillation monitor in the
trainer (cadence, stop signal, untouched training) and fdfast-eval --knn giving the monitor's numbers."""
from __future__ import annotations

import gc
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from rich.console import Console

from _loader_helpers import COORD_CLASSES, COORD_PER_CLASS, image_ids, make_coordinate_folder
from conftest import tiny_dict
from fdfast import checkpoint as ckpt
from fdfast.cli.eval import main as eval_main
from fdfast.config import ConfigError, DataConfig, config_from_dict
from fdfast.constants import IMAGENET_MEAN, IMAGENET_STD
from fdfast.distributed import DistInfo
from fdfast.logging import Progress
from fdfast.models.student import DistillModel
from fdfast.tasks import knn as knn_mod
from fdfast.tasks.knn import (KNNSettings, build_knn_loaders, canonical_order, has_cls_token, image_features,
                              knn_evaluate, knn_hits)
from fdfast.tasks import DistillTask
from fdfast.trainer import Preempted, train
from pipelines import build_loader
from pipelines.base import DataError, keep_per_class
from pipelines.generate import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
CPU = DistInfo()


# ----------------------------------------------------------------------------------------------
# The vote, against a plain-torch reference and on constructed features
# ----------------------------------------------------------------------------------------------
def reference_knn(train_f, train_y, test_f, test_y, k, temperature, num_classes):
    """DINO's eval_knn.knn_classifier written out in float64 (one chunk), with a class that no neighbour voted
    for never counted as predicted. Returns (top-1 hits, top-5 hits)."""
    train_f, test_f = train_f.double(), test_f.double()
    sim = test_f @ train_f.T
    dist, idx = sim.topk(k, largest=True, sorted=True)
    one_hot = torch.zeros(len(test_y) * k, num_classes, dtype=torch.float64)
    one_hot.scatter_(1, train_y[idx].reshape(-1, 1), 1)
    probs = (one_hot.view(len(test_y), k, num_classes) * (dist / temperature).exp()[..., None]).sum(1)
    values, predictions = probs.sort(1, descending=True)
    correct = predictions.eq(test_y[:, None]) & (values > 0)
    return int(correct[:, :1].sum()), int(correct[:, :min(5, k)].sum())


@pytest.mark.parametrize("k", [1, 5, 20, 70])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_vote_matches_an_independent_reference(k, temperature):
    g = torch.Generator().manual_seed(k)
    num_classes, dim = 9, 16
    centres = torch.randn(num_classes, dim, generator=g)
    bank_y = torch.randint(0, num_classes, (60,), generator=g)
    query_y = torch.randint(0, num_classes, (45,), generator=g)
    bank = F.normalize(centres[bank_y] + 1.2 * torch.randn(60, dim, generator=g), dim=1)
    queries = F.normalize(centres[query_y] + 1.2 * torch.randn(45, dim, generator=g), dim=1)
    hits = knn_hits(bank, bank_y, queries, query_y, k=k, temperature=temperature)
    top1, top5 = reference_knn(bank, bank_y, queries, query_y, min(k, 60), temperature, num_classes)
    assert hits.tolist() == [top1, top5, 45]
    assert 0 < top1 < 45 and top1 <= top5  # a test that a wrong vote would fail
    # queries split over blocks (a large bank's memory bound) give the same counts
    knn_mod._BLOCK, saved = 7 * max(k * num_classes, 60), knn_mod._BLOCK
    try:
        assert knn_hits(bank, bank_y, queries, query_y, k=k, temperature=temperature).tolist() == hits.tolist()
    finally:
        knn_mod._BLOCK = saved


def test_known_answers_on_constructed_features():
    """5 classes of 8 bank features near the axes; 10 queries on the axes, 3 of them on another class's axis."""
    g = torch.Generator().manual_seed(0)
    eye = torch.eye(8)
    bank_y = torch.arange(5).repeat_interleave(8)
    bank = F.normalize(eye[bank_y] + 0.01 * torch.rand(40, 8, generator=g), dim=1)
    query_y = torch.arange(5).repeat(2)
    where = query_y.clone()
    assert knn_hits(bank, bank_y, eye[where], query_y, k=8, temperature=0.07).tolist() == [10, 10, 10]
    where[[0, 3, 7]] = torch.tensor([1, 4, 0])
    # k = 8: all neighbours from the axis' class, no other class voted for, so top-5 = top-1 = 70 %
    assert knn_hits(bank, bank_y, eye[where], query_y, k=8, temperature=0.07).tolist() == [7, 7, 10]
    # k = 40: every class gets a (tiny) vote, so each true class is in the first five
    assert knn_hits(bank, bank_y, eye[where], query_y, k=40, temperature=0.07).tolist() == [7, 10, 10]
    # a query class absent from the bank is counted and missed
    assert knn_hits(bank, bank_y, eye[:2], torch.tensor([0, 7]), k=8, temperature=0.07).tolist() == [1, 1, 2]


def test_equal_votes_count_against_the_model():
    """The same feature labelled 0 and 1: both classes get the same vote; neither query is a top-1 hit."""
    f = F.normalize(torch.ones(1, 4), dim=1)
    hits = knn_hits(torch.cat([f, f]), torch.tensor([0, 1]), torch.cat([f, f]), torch.tensor([0, 1]), k=2,
                    temperature=0.07)
    assert hits.tolist() == [0, 2, 2]


def test_canonical_order_does_not_depend_on_how_rows_arrive():
    g = torch.Generator().manual_seed(1)
    feats, labels = torch.randn(30, 5, generator=g), torch.randint(0, 4, (30,), generator=g)
    feats[7] = feats[3]  # a duplicate row, other label
    perm = torch.randperm(30, generator=g)
    a, b = canonical_order(feats, labels), canonical_order(feats[perm], labels[perm])
    assert torch.equal(feats[a], feats[perm][b]) and torch.equal(labels[a], labels[perm][b])
    assert torch.equal(labels[a], labels[a].sort().values)


def test_features_cls_token_or_mean_of_patch_tokens():
    from timm.models.beit import Beit
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    torch.manual_seed(0)
    vit = Beit(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=0, global_pool="").eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = vit.forward_features(x)
    assert has_cls_token(vit)
    assert torch.allclose(image_features(vit, x, "cls"), F.normalize(tokens[:, 0], dim=1))
    assert torch.allclose(image_features(vit, x, "mean"), F.normalize(tokens[:, 1:].mean(1), dim=1))
    assert torch.allclose(image_features(vit, x, "cls").norm(dim=1), torch.ones(3))
    swin = SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1),
                             num_classes=0).eval()
    grid = swin.forward_features(x)  # (B, H, W, C)
    assert not has_cls_token(swin)
    assert torch.allclose(image_features(swin, x, "mean"), F.normalize(grid.mean((1, 2)), dim=1), atol=1e-6)
    with pytest.raises(ValueError, match="no CLS token"):
        image_features(swin, x, "cls")


# ----------------------------------------------------------------------------------------------
# The per-class cap, in every backend
# ----------------------------------------------------------------------------------------------
def test_keep_per_class_is_evenly_spread_and_capped():
    labels = [0, 0, 0, 0, 0, 1, 1, 2, 0]
    assert keep_per_class(labels, 2) == [0, 3, 5, 6, 7]  # class 0 = positions 0,1,2,3,4,8: picks 0 and 3
    assert keep_per_class(labels, 3) == [0, 2, 4, 5, 6, 7]
    assert keep_per_class(labels, 100) == list(range(9))


@pytest.fixture(scope="module")
def coord(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn-coord")
    folder = make_coordinate_folder(root / "images")
    from pipelines.ffcv_writer import convert_folder
    convert_folder(folder, root / "coord.beton", num_workers=1, console=Console(file=io.StringIO()))
    return folder, root / "coord.beton"


@pytest.mark.filterwarnings(  # numba's finaliser of FFCV's previous loader (as in test_ffcv.py)
    r"ignore:(?s)Exception ignored in. <finalize object.*numba.core.dispatcher:pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("backend", ["torchvision", "dali", "ffcv"])
def test_the_cap_reads_the_same_images_in_every_backend_and_on_every_rank_count(coord, backend):
    folder, beton = coord
    source = str(beton if backend == "ffcv" else folder)
    data = DataConfig(backend=backend, train=source, val=source, knn_train=source, num_workers=1)
    labels = np.repeat(np.arange(COORD_CLASSES), COORD_PER_CLASS)
    expected = sorted(keep_per_class(labels, 3))
    for world in (1, 2):
        seen, seen_labels = [], []
        for rank in range(world):
            loader = build_loader(data, train=False, batch_size=5, img_size=32, device=torch.device("cpu"),
                                  rank=rank, world_size=world, split="knn_train", per_class=3)
            assert loader.num_samples == len(expected) == 3 * COORD_CLASSES
            for images, y in loader:
                keep = y >= 0
                seen += [i for i, k in zip(image_ids(images), keep) if k]
                seen_labels += y[keep].tolist()
        assert sorted(seen) == expected, (backend, world)
        assert sorted(seen_labels) == sorted(labels[expected].tolist())
    del loader
    gc.collect()  # FFCV's numba dispatchers go while the warning filter above still applies


def test_loader_errors_name_the_knn_key(tmp_path):
    data = DataConfig(backend="torchvision", train=str(tmp_path), val=str(tmp_path), knn_train=str(tmp_path / "no"))
    with pytest.raises(Exception, match=r"data.knn_train='.*no' does not exist"):
        build_loader(data, train=False, batch_size=2, img_size=32, device=torch.device("cpu"), split="knn_train")


# ----------------------------------------------------------------------------------------------
# Known answer on generated images, through the loaders
# ----------------------------------------------------------------------------------------------
COLOURS = [(230, 20, 20), (20, 230, 20), (20, 20, 230), (128, 128, 128)]


def _colour_folder(root: Path, per_class: int, wrong: dict[tuple[int, int], int]) -> Path:
    """Class c holds images of COLOURS[c] (brightness varied a little), except image i of class c, which has
    the colour of class ``wrong[(c, i)]``."""
    for c in range(len(COLOURS)):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            rgb = np.array(COLOURS[wrong.get((c, i), c)]) * (1 - 0.02 * i)
            Image.fromarray(np.full((40, 44, 3), rgb, np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


class MeanColour(nn.Module):
    """A 'network' whose CLS token is the mean colour of the normalised image: the k-NN answer is known."""

    def __init__(self):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1))

    def forward_features(self, x):
        noise = 1e-6 * torch.randn(x.shape[0], 1, 3)  # draws from the global RNG, as a drop path would
        return (x.mean((2, 3))[:, None, :] + noise).expand(-1, 2, -1)


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("knn-colours")
    bank = _colour_folder(root / "bank", 5, {})
    val = _colour_folder(root / "val", 4, {(0, 1): 2, (2, 3): 1, (3, 0): 0})
    return bank, val


@pytest.mark.parametrize("k, top5", [(3, 13), (20, 16)])
def test_known_answer_on_generated_images(colours, k, top5):
    """16 validation images, 3 with another class's colour: top-1 13/16 for any k; top-5 13/16 when only the
    colour's class votes (k = 3 of 5 per class), 16/16 when all four classes vote (k = 20)."""
    bank, val = colours
    data = DataConfig(backend="torchvision", train=str(bank), val=str(val), knn_train=str(bank), num_workers=0,
                      eval_resize=32)
    loaders = build_knn_loaders(data, batch_size=3, img_size=32, device=torch.device("cpu"))  # 16 = 5 x 3 + 1
    network, rng = MeanColour().train(), torch.get_rng_state()
    res = knn_evaluate(network, *loaders, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=torch.device("cpu"),
                       settings=KNNSettings(k=k))
    assert res == {"knn_top1": 100 * 13 / 16, "knn_top5": 100 * top5 / 16, "knn_count": 16, "knn_bank": 20}
    assert torch.equal(rng, torch.get_rng_state()) and network.training  # RNG streams and mode given back


def test_padding_entries_of_the_ranks_are_never_features(colours):
    """20 bank images over 3 ranks: 7 + 7 + 6 and one black padding image labelled -1, which is dropped."""
    bank, _ = colours
    data = DataConfig(backend="torchvision", train=str(bank), val=str(bank), num_workers=0, eval_resize=32)
    rows, labels = 0, []
    for rank in range(3):
        loader = build_loader(data, train=False, batch_size=4, img_size=32, device=torch.device("cpu"), rank=rank,
                              world_size=3)
        assert sum((y < 0).sum().item() for _, y in loader) == (1 if rank == 2 else 0)
        f, y = knn_mod.extract_features(MeanColour(), loader, IMAGENET_MEAN, IMAGENET_STD, torch.device("cpu"), "cls")
        rows += len(f)
        labels += y.tolist()
    assert rows == 20 and sorted(labels) == sorted([c for c in range(4) for _ in range(5)])


def test_bank_and_validation_classes_must_match(colours, tmp_path):
    bank, val = colours
    other = tmp_path / "other"
    for c in ("c0", "c1", "c2", "x3"):
        (other / c).mkdir(parents=True)
        (other / c / "0.png").write_bytes((bank / "c0" / "0.png").read_bytes())
    data = DataConfig(backend="torchvision", train=str(bank), val=str(val), knn_train=str(other), num_workers=0)
    with pytest.raises(Exception, match=r"different class folders .*\('x3', 'c3'\)"):
        build_knn_loaders(data, batch_size=3, img_size=32, device=torch.device("cpu"))


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
SWIN_STUDENT = {"arch": "swinv2", "img_size": 32, "patch_size": 4, "depth": [1, 1], "num_heads": [1, 2],
                "window_size": 4}


@pytest.mark.parametrize("change, message", [
    (dict(data={"val": ""}), "train.knn_every=1 needs data.val (the images classified) and data.knn_train (the "
                             "labelled images searched): set data.val"),
    (dict(data={"val": "", "knn_train": ""}), "set data.val and data.knn_train"),
    (dict(data={"backend": "synthetic"}), "data.backend='synthetic' has none"),
    (dict(train={"task": "finetune"}), "train.knn_every=1 monitors a distillation"),
    (dict(model={"student": SWIN_STUDENT, "teacher": {"kind": "esvit"}}),
     "train.knn_feature='cls': a SwinV2 student has no CLS token; set train.knn_feature=mean"),
    (dict(train={"knn_k": 0}), "train.knn_k must be >= 1"),
    (dict(train={"knn_temperature": 0.0}), "train.knn_temperature must be > 0"),
    (dict(train={"knn_every": -1}), "train.knn_every must be >= 0"),
    (dict(data={"knn_train_per_class": -1}), "data.knn_train_per_class must be >= 0"),
    (dict(data={"backend": "ffcv", "train": "t.beton", "val": "v.beton"}), "data.knn_train='k' is not one"),
])
def test_config_refusals_name_the_keys(tmp_path, change, message):
    base = dict(data={"backend": "torchvision", "train": "t", "val": "v", "knn_train": "k"}, train={"knn_every": 1})
    for section, values in change.items():
        base[section] = {**base.get(section, {}), **values}
    d = tiny_dict(tmp_path, **base)
    if d["train"].get("task") == "finetune":
        d["model"]["student"]["num_classes"] = 4
    with pytest.raises(ConfigError) as e:
        config_from_dict(d)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_monitor_is_off_by_default_and_a_swin_student_takes_the_mean(tmp_path):
    cfg = config_from_dict(tiny_dict(tmp_path))
    assert cfg.train.knn_every == 0 and cfg.data.knn_train == ""
    assert (cfg.train.knn_k, cfg.train.knn_temperature, cfg.train.knn_feature) == (20, 0.07, "cls")
    swin = tiny_dict(tmp_path, model={"student": SWIN_STUDENT, "teacher": {"kind": "esvit"}},
                     data={"backend": "torchvision", "train": "t", "val": "v", "knn_train": "k"},
                     train={"knn_every": 1, "knn_feature": "mean"})
    assert config_from_dict(swin).train.knn_feature == "mean"


# ----------------------------------------------------------------------------------------------
# The monitor in a distillation
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train: 4 classes x 6 JPEGs (3 steps of 8 per epoch); val: 19 JPEGs (no multiple of 2 or of the batch)."""
    root = tmp_path_factory.mktemp("knn-images")
    sizes = ((40, 56), (64, 48), (36, 36))
    train_dir = make_image_folder(root / "train", num_classes=4, per_class=6, sizes=sizes, seed=1)
    val = make_image_folder(root / "val", num_classes=4, per_class=5, sizes=sizes, seed=2)
    (val / "class_003" / "img_0004.jpg").unlink()
    return train_dir, val


def knn_dict(tmp_path, folders, name="fd", **train_fields):
    train_dir, val = folders
    return tiny_dict(tmp_path, data={"backend": "torchvision", "train": str(train_dir), "val": str(val),
                                     "knn_train": str(train_dir), "eval_resize": 36},
                     train={"epochs": 3, "output_dir": str(tmp_path / name), "knn_every": 2, **train_fields},
                     log={"tensorboard": False})


def records(run: Path) -> tuple[list, list]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if r.get("kind") == "eval"]


def student_knn(run: Path, cfg, feature="cls") -> dict:
    """The k-NN numbers of the run's final student, rebuilt from its checkpoint."""
    state, _ = ckpt.load_checkpoint(ckpt.find_latest(run))
    model = DistillModel(cfg.model.student, state["model"]["decoder.weight"].shape[0])
    model.load_state_dict(state["model"])
    loaders = build_knn_loaders(cfg.data, batch_size=cfg.train.batch_size, img_size=cfg.model.student.img_size,
                                device=torch.device("cpu"))
    return knn_evaluate(model.encoder, *loaders, mean=IMAGENET_MEAN, std=IMAGENET_STD, device=torch.device("cpu"),
                        settings=KNNSettings(feature=feature))


def test_distillation_logs_knn_at_its_cadence_and_leaves_training_alone(tmp_path, folders):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    d = knn_dict(tmp_path, folders, "fd")
    d["log"]["tensorboard"] = True
    with_knn = config_from_dict(d)
    summary = train(with_knn, CPU)
    steps, evals = records(tmp_path / "fd")
    # every 2nd epoch and at the last step: epochs 2 and 3 of 3 (3 steps per epoch)
    assert [(e["step"], e["epoch"]) for e in evals] == [(6, 2), (9, 3)]
    events = EventAccumulator(str(tmp_path / "fd" / "tensorboard"))
    events.Reload()
    for tag in ("knn_top1", "knn_top5"):
        assert [(e.step, e.value) for e in events.Scalars(f"eval/{tag}")] == \
            [(r["step"], pytest.approx(r[tag])) for r in evals]
    assert all(e["knn_count"] == 19 and e["knn_bank"] == 24 and 0 <= e["knn_top1"] <= e["knn_top5"] <= 100
               for e in evals)
    # the k-NN numbers are the final student's (not a fine-tune top-1: no best/ folder, no best record)
    assert not (tmp_path / "fd" / "best").exists() and summary["best"] == {}
    assert {k: evals[-1][k] for k in ("knn_top1", "knn_top5")} == \
        {k: v for k, v in student_knn(tmp_path / "fd", with_knn).items() if k in ("knn_top1", "knn_top5")}
    # eval mode, no grad and untouched RNG streams: the training is bit-identical to one without the monitor
    train(config_from_dict(knn_dict(tmp_path, folders, "plain", knn_every=0)), CPU)
    plain_steps, plain_evals = records(tmp_path / "plain")
    assert plain_evals == []
    assert [(r["step"], r["loss"]) for r in plain_steps] == [(r["step"], r["loss"]) for r in steps]


def test_a_missing_knn_set_stops_the_run_before_its_first_step_but_not_the_task_api(tmp_path, folders):
    d = knn_dict(tmp_path, folders, "fd")
    d["data"]["knn_train"] = str(tmp_path / "no-such-folder")
    cfg = config_from_dict(d)
    task = DistillTask(cfg, CPU)  # the Python API: a loss without data on disk
    task.loss(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(DataError, match="data.knn_train='.*no-such-folder' does not exist"):
        train(cfg, CPU)
    assert not (tmp_path / "fd" / "metrics.jsonl").exists() and not ckpt.list_checkpoints(tmp_path / "fd")


def test_the_monitor_may_be_turned_on_or_changed_when_a_run_resumes(tmp_path, folders):
    """The k-NN keys change no weight: a checkpoint written without them (or with other values) resumes."""
    from fdfast.config import to_dict
    from fdfast.resume import check_config_drift

    old = to_dict(config_from_dict(knn_dict(tmp_path, folders, knn_every=0)))
    for section, keys in (("train", ("knn_every", "knn_k", "knn_temperature", "knn_feature")),
                          ("data", ("knn_train", "knn_train_per_class"))):
        for key in keys:
            del old[section][key]  # a checkpoint from before the monitor existed
    new = to_dict(config_from_dict(knn_dict(tmp_path, folders, knn_every=1, knn_k=5)))
    logged = []
    check_config_drift(old, new, allow=False, where=tmp_path, log=logged.append)
    assert any("train.knn_every: None -> 1" in line for line in logged)


def test_a_stop_signal_during_a_knn_pass_abandons_it_and_the_rerun_redoes_it(tmp_path, folders, monkeypatch):
    real, calls = knn_mod.image_features, []

    def signalled(network, x, feature):
        if not calls:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler only sets a flag
        calls.append(len(x))
        return real(network, x, feature)

    d = knn_dict(tmp_path, folders, "fd", knn_every=1, epochs=2)
    d["checkpoint"] = {"every": 100}
    monkeypatch.setattr(knn_mod, "image_features", signalled)
    with pytest.raises(Preempted, match="during the evaluation at step 3"):
        train(config_from_dict(d), CPU)
    assert len(calls) == 1  # stopped before the second batch of the bank
    assert ckpt.find_latest(tmp_path / "fd").name == "step_00000003"
    assert records(tmp_path / "fd")[1] == []  # nothing partial recorded
    monkeypatch.setattr(knn_mod, "image_features", real)
    train(config_from_dict(d), CPU)
    assert [e["epoch"] for e in records(tmp_path / "fd")[1]] == [1, 2]


def test_the_progress_line_shows_the_latest_knn_top1():
    console = Console(file=io.StringIO(), width=200)
    progress = Progress(total=10, mode="plain", console=console)
    progress.update(1, {"loss": 0.5})
    progress.show_eval({"knn_top1": 43.75, "knn_top5": 90.0, "kind": "eval"})
    progress.update(2, {"loss": 0.4})
    first, second = console.file.getvalue().splitlines()
    assert "k-NN" not in first and "loss 0.4000  k-NN 43.8%" in second
    console = Console(file=io.StringIO(), width=80)
    bar = Progress(total=10, mode="rich", console=console)
    bar.show_eval({"knn_top1": 43.75})
    bar.update(2, {"loss": 0.4, "img_per_s_per_device": 100.0})
    bar.close()
    (line,) = console.file.getvalue().splitlines()
    assert "loss 0.4000" in line and "k-NN 43.8%" in line and len(line) <= 80


# ----------------------------------------------------------------------------------------------
# fdfast-eval --knn
# ----------------------------------------------------------------------------------------------
def _eval(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fdfast.cli.eval", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_fdfast_eval_knn_gives_the_monitors_numbers_for_the_student_and_measures_its_teacher(tmp_path, folders):
    train_dir, val = folders
    d = knn_dict(tmp_path, folders, "fd", knn_every=1, epochs=1, knn_feature="mean")
    d["data"]["knn_train_per_class"] = 4
    train(config_from_dict(d), CPU)
    last = records(tmp_path / "fd")[1][-1]
    r = _eval("--knn", "--knn-train", train_dir, "--knn-per-class", 4, "--knn-feature", "mean", tmp_path / "fd",
              "--data", val, "--batch-size", 8, "--workers", 0, "--json", tmp_path / "knn.json")
    assert r.returncode == 0, r.stderr[-3000:]
    teacher, student = json.loads((tmp_path / "knn.json").read_text())
    assert teacher["model"] == "fd-teacher" and student["model"] == "fd"
    assert {k: student[k] for k in last if k.startswith("knn_")} == {k: v for k, v in last.items()
                                                                      if k.startswith("knn_")}
    assert last["knn_bank"] == 16 and teacher["knn_count"] == 19
    assert "fd: k-NN top-1" in r.stdout and "k=20 T=0.07 mean" in r.stdout
    # another batch size gives the same numbers; --no-teacher leaves the run's teacher out
    assert eval_main(["--knn", "--knn-train", str(train_dir), "--knn-per-class", "4", "--knn-feature", "mean",
                      str(tmp_path / "fd"), "--data", str(val), "--batch-size", "5", "--workers", "0", "--no-teacher",
                      "--json", str(tmp_path / "b5.json")]) == 0
    (alone,) = json.loads((tmp_path / "b5.json").read_text())
    assert (alone["knn_top1"], alone["knn_top5"]) == (student["knn_top1"], student["knn_top5"])


def test_fdfast_eval_knn_refusals_are_one_line(tmp_path):
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    from fdfast.cli import eval as eval_cli
    from fdfast.interop.sources import SourceError, Subject

    with pytest.raises(SystemExit) as e:
        eval_cli.parse_args(["run", "--data", "val", "--knn"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        eval_cli.parse_args(["run", "--data", "val", "--knn-train", "t"])  # --knn-train without --knn
    args = eval_cli.parse_args(["run", "--data", str(tmp_path), "--knn", "--knn-train", str(tmp_path)])
    swin = SwinTransformerV2(img_size=32, patch_size=4, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(1, 1),
                             num_classes=0)
    subject = Subject(name="swin", role="backbone", source="random:swin", network=swin, img_size=32)
    with pytest.raises(SourceError, match=r"^swin \(random:swin\) has no CLS token: use --knn-feature mean$"):
        eval_cli.knn(subject, args, CPU)


WORKER = """
import json, sys, torch
from pathlib import Path
from fdfast.config import config_from_dict
from fdfast.distributed import init_distributed, shutdown
from fdfast.trainer import train
torch.set_num_threads(1)
info = init_distributed()
assert info.world_size == 2
try:
    train(config_from_dict(json.loads(Path(sys.argv[1]).read_text())), info)
finally:
    shutdown()
"""


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(tmp_path, folders):
    """The monitor of a distillation under torchrun (2 ranks: the bank gathered, 19 images padded to 2 x 10)
    equals fdfast-eval --knn of the final student in one process."""
    train_dir, val = folders
    d = knn_dict(tmp_path, folders, "fd", knn_every=1, epochs=2, batch_size=4)
    (tmp_path / "cfg.json").write_text(json.dumps(d))
    (tmp_path / "worker.py").write_text(WORKER)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(tmp_path / "worker.py"), str(tmp_path / "cfg.json")], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    evals = records(tmp_path / "fd")[1]
    assert [e["epoch"] for e in evals] == [1, 2] and all(e["knn_count"] == 19 and e["knn_bank"] == 24 for e in evals)
    assert eval_main(["--knn", "--knn-train", str(train_dir), str(tmp_path / "fd"), "--data", str(val),
                      "--batch-size", "4", "--workers", "0", "--no-teacher", "--json", str(tmp_path / "one.json")]) == 0
    (one,) = json.loads((tmp_path / "one.json").read_text())
    assert {k: one[k] for k in ("knn_top1", "knn_top5", "knn_count", "knn_bank")} == \
        {k: evals[-1][k] for k in ("knn_top1", "knn_top5", "knn_count", "knn_bank")}
