"""Fine-tuning / linear probe tasks (fdfast.tasks.finetune, .evaluation) and the fine-tune configs (spec §2)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from fdfast import checkpoint as ckpt
from fdfast.config import ConfigError, config_from_dict, load_config
from fdfast.distributed import DistInfo, shutdown
from fdfast.tasks.evaluation import eval_counts, summarize_counts
from fdfast.cli.train import main as train_main
from fdfast.tasks.classes import resolve_num_classes
from fdfast.tasks.finetune import BatchAugment, FinetuneTask
from fdfast.trainer import train as train_run
from fdfast.trainer import build_task
from fdfast.models.student import DistillModel, build_student
from fdfast.objective import normalize
from fdfast.optim import build_optimizer
from fdfast.step import TrainStep
from fdfast.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from pipelines.generate import make_image_folder
from conftest import tiny_dict

REPO = Path(__file__).resolve().parents[1]
CPU = DistInfo()
STUDENT = {"arch": "beit", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
           "drop_path": 0.1, "num_classes": 6}


def ft_dict(tmp_path, *, train_dir="", val_dir="", **sections) -> dict:
    """A fine-tune config small enough for CPU tests (17 tokens, 6 classes)."""
    d = {
        "model": {"student": dict(STUDENT), "pretrained": ""},
        "data": {"backend": "torchvision" if train_dir else "synthetic", "train": str(train_dir),
                 "val": str(val_dir), "num_classes": 6, "synthetic_size": 64, "num_workers": 0,
                 "interpolation": "bicubic", "eval_resize": 36},
        "optim": {"base_lr": 1e-3, "warmup_lr": 1e-6, "min_lr": 1e-6, "warmup_epochs": 1, "layer_decay": 0.75,
                  "clip_grad": 5.0},
        "augment": {"mixup": 0.8, "cutmix": 1.0, "label_smoothing": 0.1},
        "train": {"task": "finetune", "epochs": 2, "batch_size": 8, "output_dir": str(tmp_path / "run")},
        "checkpoint": {"every": 1000},
        "log": {"every": 1, "progress": "none"},
    }
    for section, values in sections.items():
        node = d.setdefault(section, {})
        for k, v in values.items():
            node[k] = {**node[k], **v} if isinstance(v, dict) and isinstance(node.get(k), dict) else v
    return d


def ft_cfg(tmp_path, **kw):
    return config_from_dict(ft_dict(tmp_path, **kw))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """train: 6 classes x 4 JPEGs (3 steps of 8 per epoch); val: 17 JPEGs (not a multiple of the batch
    or of 2 ranks)."""
    root = tmp_path_factory.mktemp("ft_images")
    sizes = ((40, 56), (64, 48), (36, 36), (50, 44))
    train = make_image_folder(root / "train", num_classes=6, per_class=4, sizes=sizes, seed=1)
    val = make_image_folder(root / "val", num_classes=6, per_class=3, sizes=sizes, seed=2)
    (val / "class_005" / "img_0002.jpg").unlink()
    return train, val


# ----------------------------------------------------------------------------------------------
# Batch augmentation and loss
# ----------------------------------------------------------------------------------------------
def _batch(n=8, size=32, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    return images.contiguous(memory_format=torch.channels_last), torch.randint(0, classes, (n,), generator=g)


def test_mixup_cutmix_soft_targets(tmp_path):
    cfg = ft_cfg(tmp_path)
    aug = BatchAugment(cfg, torch.device("cpu"))
    images = _batch()[0]
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 0, 1])  # every image's mirror has another label
    off = 0.1 / 6  # label smoothing 0.1 over 6 classes
    on = 1 - 0.1 + off
    y = torch.full((8, 6), off).scatter_(1, labels[:, None], on)
    base = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    saw_mix = saw_cut = False
    np.random.seed(0)
    for _ in range(20):
        x, t = aug(images, labels)
        assert t.shape == (8, 6) and t.dtype == torch.float32
        torch.testing.assert_close(t.sum(1), torch.ones(8))
        assert bool((t >= off - 1e-6).all())
        # one lambda per batch: target = lam * y + (1 - lam) * y.flip(0)
        lam = float((t[0, 0] - off) / (on - off))
        torch.testing.assert_close(t, lam * y + (1 - lam) * y.flip(0), atol=1e-6, rtol=0)
        if torch.allclose(x, lam * base + (1 - lam) * base.flip(0), atol=1e-5):
            saw_mix = saw_mix or 0 < lam < 1
        else:  # cutmix: each pixel is the image's own or its mirror's, and lam is the kept area
            own = (x - base).abs().amax(1) < 1e-6
            other = (x - base.flip(0)).abs().amax(1) < 1e-6
            assert bool((own | other).all())
            assert own[0].float().mean().item() == pytest.approx(lam, abs=1e-6)
            saw_cut = True
    assert saw_mix and saw_cut


def test_plain_ce_with_label_smoothing_and_random_erasing(tmp_path):
    cfg = ft_cfg(tmp_path, augment={"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1, "re_prob": 1.0})
    aug = BatchAugment(cfg, torch.device("cpu"))
    assert aug.mixup is None
    images, labels = _batch()
    x, t = aug(images, labels)
    assert t is labels  # hard labels go to CE with label_smoothing
    base = normalize(images, IMAGENET_MEAN, IMAGENET_STD)
    changed = (x != base).any(1)  # (B, H, W)
    for i in range(8):  # one erased rectangle per image (probability 1, max_count 1), filled with noise
        rows, cols = changed[i].any(1).nonzero().flatten(), changed[i].any(0).nonzero().flatten()
        assert len(rows) and len(cols)
        assert bool(changed[i][rows.min():rows.max() + 1, cols.min():cols.max() + 1].all())
        assert int(changed[i].sum()) == len(rows) * len(cols)


def test_odd_batch_with_mixup_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train.batch_size=7 is odd"):
        ft_cfg(tmp_path, train={"batch_size": 7})
    ft_cfg(tmp_path, train={"batch_size": 7}, augment={"mixup": 0.0, "cutmix": 0.0})


def test_num_classes_must_agree(tmp_path):
    with pytest.raises(ConfigError, match="data.num_classes"):
        ft_cfg(tmp_path, data={"num_classes": 1000})


def _unset_classes(tmp_path, train_dir, **data) -> dict:
    d = ft_dict(tmp_path, train_dir=train_dir, train={"epochs": 1}, augment={"mixup": 0.0, "cutmix": 0.0})
    d["model"]["student"]["num_classes"] = 0
    d["data"].pop("num_classes")
    d["data"].update(data)
    return d


def test_class_count_is_read_from_the_folder_and_the_student_follows(folders, tmp_path):
    train, _ = folders
    cfg = config_from_dict(_unset_classes(tmp_path, train))
    assert (cfg.data.num_classes, cfg.model.student.num_classes) == (None, 0)
    resolved = resolve_num_classes(cfg)
    assert (resolved.data.num_classes, resolved.model.student.num_classes) == (6, 6)
    assert FinetuneTask(cfg, CPU).model.head.out_features == 6  # built from the API, resolved as well
    summary = train_run(cfg)
    written = load_config(Path(summary["output_dir"]) / "config.yaml")  # the records hold the resolved count
    assert (written.data.num_classes, written.model.student.num_classes) == (6, 6)


@pytest.mark.parametrize("name", ["finetune/clip_vit_base_300ep", "eva02_clip_vitb16_vit_base"])
def test_shipped_fine_tune_configs_take_the_class_count_of_the_data(folders, name):
    train, _ = folders  # six classes: a shipped recipe pointed at them must not insist on ImageNet's 1000
    cfg = resolve_num_classes(load_config(name, [f"data.train={train}"]))
    assert (cfg.data.num_classes, cfg.model.student.num_classes) == (6, 6)


def test_class_count_is_read_from_a_beton(folders, tmp_path):
    pytest.importorskip("ffcv")
    from pipelines.ffcv_writer import convert_folder
    train, _ = folders
    beton = tmp_path / "train.beton"
    convert_folder(str(train), str(beton), num_workers=1)
    cfg = config_from_dict(_unset_classes(tmp_path, beton, backend="ffcv", auto_augment=None))
    assert resolve_num_classes(cfg).model.student.num_classes == 6


def test_a_class_count_the_data_do_not_hold_is_one_line_before_any_weights_load(folders, tmp_path, monkeypatch,
                                                                               capsys):
    train, _ = folders
    import fdfast.tasks.finetune as finetune

    def loaded(*args, **kwargs):
        raise AssertionError("weights were loaded before the class count was checked")
    monkeypatch.setattr(finetune, "load_student_weights", loaded)
    monkeypatch.setattr(finetune, "build_student", loaded)
    d = _unset_classes(tmp_path, train, num_classes=10)
    d["model"]["pretrained"] = str(tmp_path)  # would be read, if it came to that
    with pytest.raises(ConfigError, match=r"data\.num_classes=10 but data\.train=.* holds 6 classes"):
        train_run(config_from_dict(d))
    d = _unset_classes(tmp_path, train)
    d["model"]["student"]["num_classes"] = 5
    with pytest.raises(ConfigError, match=r"model\.student\.num_classes=5 but data\.train=.* holds 6 classes"):
        train_run(config_from_dict(d))
    file = tmp_path / "ft.yaml"
    file.write_text(json.dumps(d))
    assert train_main(["--config", str(file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.student.num_classes=5" in err, err


def test_a_distillation_recorded_with_a_class_count_resumes_with_it_unset(tmp_path):
    """Earlier versions wrote data.num_classes: 1000 into every config; a distillation has no head, so the
    same run resumed with the count unset is no config change worth refusing (a classifier's head size is
    model.student.num_classes, which stays guarded)."""
    d = tiny_dict(tmp_path, train={"max_steps": 2})
    train_run(config_from_dict(d))
    d["data"].pop("num_classes")
    d["train"]["max_steps"] = 3
    assert train_run(config_from_dict(d))["step"] == 3


# ----------------------------------------------------------------------------------------------
# RandAugment placement
# ----------------------------------------------------------------------------------------------
def test_randaugment_refused_where_the_backend_cannot_run_it(tmp_path):
    aa = "rand-m9-mstd0.5-inc1"
    with pytest.raises(ConfigError) as e:
        ft_cfg(tmp_path, data={"backend": "ffcv", "train": "x/train.beton", "auto_augment": aa})
    msg = str(e.value)
    assert "data.backend='ffcv'" in msg and "data.auto_augment='rand-m9-mstd0.5-inc1'" in msg
    assert "torchvision" in msg and "data.auto_augment=null" in msg
    with pytest.raises(ConfigError, match="data.backend='synthetic'"):
        ft_cfg(tmp_path, data={"auto_augment": aa})
    with pytest.raises(ConfigError, match="nvjpeg"):
        ft_cfg(tmp_path, data={"backend": "nvjpeg", "train": "x", "auto_augment": aa})
    with pytest.raises(ConfigError, match="DALI graph here has no RandAugment"):
        ft_cfg(tmp_path, data={"backend": "dali", "train": "x", "auto_augment": aa})


def test_randaugment_allowed_on_torchvision_and_spec_checked(tmp_path, folders):
    train, val = folders
    ft_cfg(tmp_path, train_dir=train, data={"auto_augment": "rand-m9-mstd0.5-inc1"})
    with pytest.raises(ConfigError, match="data.auto_augment='autoaug'"):
        ft_cfg(tmp_path, train_dir=train, data={"auto_augment": "autoaug"})


def test_official_randaugment_never_raises():
    import random

    from PIL import Image

    from fdfast.config import DataConfig
    from pipelines.torchvision import build_transform

    data = DataConfig(backend="torchvision", train="x", auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic")
    tf = build_transform(data, train=True, img_size=32)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    random.seed(0)
    torch.manual_seed(0)
    for _ in range(3000):  # ~0.15 % of images draw posterize at magnitude >= 10
        out = tf(img)
    assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)


# ----------------------------------------------------------------------------------------------
# Evaluation: exact counts
# ----------------------------------------------------------------------------------------------
def test_eval_counts_ignore_padding():
    logits = torch.tensor([[5.0, 1, 0, 0, 0, 0, 0],    # top1 = 0
                           [0, 5.0, 4, 3, 2, 1, 0],    # label 2: top5 hit, top1 miss
                           [0, 0, 0, 0, 0, 1, 5.0],    # label 0: outside top5 (ties broken by order)
                           [9.0, 0, 0, 0, 0, 0, 0]])   # padding
    labels = torch.tensor([0, 2, 1, -1])
    c = eval_counts(logits, labels)
    assert c.dtype == torch.float64
    assert c[0].item() == 1 and c[1].item() == 2 and c[3].item() == 3
    ce = torch.nn.functional.cross_entropy(logits[:3], labels[:3], reduction="sum")
    assert c[2].item() == pytest.approx(ce.item(), rel=1e-6)
    r = summarize_counts(c)
    assert r.top1 == pytest.approx(100 / 3) and r.top5 == pytest.approx(200 / 3) and r.count == 3


def _eval_worker(rank, cfg_dict, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        cfg = config_from_dict(cfg_dict)
        torch.manual_seed(0)
        task = build_task(cfg, DistInfo(rank, rank, 2, torch.device("cpu")))
        _spread_head(task.model)
        res = task.evaluate()
        if rank == 0:
            torch.save(task.model.state_dict(), Path(out_dir) / "model.pt")
        Path(out_dir, f"res{rank}.json").write_text(json.dumps(res))
    finally:
        task = None  # its DDP wrapper holds the group: freed first, then a barrier, then the group goes
        shutdown()


def _reference_eval(model, val_dir, mean, std):
    """Single process, every image once, per-image predictions: the ground truth."""
    from torchvision.datasets import ImageFolder
    from torchvision import transforms as T

    tf = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.PILToTensor()])
    ds = ImageFolder(str(val_dir), transform=tf)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor([ds[i][1] for i in range(len(ds))])
    model.eval()
    with torch.no_grad():
        logits = model(normalize(x, mean, std))
    top5 = logits.topk(5, dim=1).indices
    hit1, hit5 = (top5[:, 0] == y).sum().item(), (top5 == y[:, None]).any(1).sum().item()
    return 100.0 * hit1 / len(ds), 100.0 * hit5 / len(ds), len(ds), torch.nn.functional.cross_entropy(logits, y).item()


@torch.no_grad()
def _spread_head(model, seed=1):
    """The x0.001 head init makes a random model predict one class; spread the logits so that top-1
    is neither 0 nor 100 and a wrong count would show."""
    torch.manual_seed(seed)
    model.head.weight.normal_(0, 1.0)
    model.head.bias.normal_(0, 0.5)


@pytest.mark.slow
def test_eval_top1_exact_with_two_ranks(tmp_path, folders):
    train, val = folders
    d = ft_dict(tmp_path, train_dir=train, val_dir=val, train={"batch_size": 4, "eval_norm": "clip"})
    torch.multiprocessing.spawn(_eval_worker, args=(d, str(tmp_path / "pg_init"), str(tmp_path)), nprocs=2)
    r0 = json.loads((tmp_path / "res0.json").read_text())
    r1 = json.loads((tmp_path / "res1.json").read_text())
    assert r0 == r1  # all-reduced totals
    model = build_student(config_from_dict(d).model.student, finetune=True)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    top1, top5, n, loss = _reference_eval(model, val, CLIP_MEAN, CLIP_STD)
    assert r0["count"] == n == 17  # padding entries counted nowhere, nothing dropped
    assert r0["top1"] == pytest.approx(top1, abs=1e-9)
    assert r0["top5"] == pytest.approx(top5, abs=1e-9)
    assert r0["loss"] == pytest.approx(loss, rel=1e-5)
    assert 0 < r0["top1"] < 100
    # eval_norm switches the statistics: ImageNet normalisation gives other logits
    assert _reference_eval(model, val, IMAGENET_MEAN, IMAGENET_STD)[3] != pytest.approx(loss, rel=1e-5)


def test_evaluate_single_process_and_modes(tmp_path, folders):
    train, val = folders
    cfg = ft_cfg(tmp_path, train_dir=train, val_dir=val, train={"batch_size": 4})
    torch.manual_seed(0)
    task = build_task(cfg, CPU)
    _spread_head(task.model)
    assert task.model.training
    rng = torch.get_rng_state()
    res = task.evaluate()
    assert torch.equal(rng, torch.get_rng_state())  # eval leaves the training RNG stream alone
    assert task.model.training  # back in train mode
    top1, top5, n, loss = _reference_eval(task.model, val, IMAGENET_MEAN, IMAGENET_STD)
    task.model.train()
    assert res["count"] == n == 17
    assert res["top1"] == pytest.approx(top1, abs=1e-9) and res["top5"] == pytest.approx(top5, abs=1e-9)
    assert res["loss"] == pytest.approx(loss, rel=1e-5)
    assert 0 < res["top1"] < res["top5"] < 100
    # the fixed-shape path used with compile.enabled pads the short last batch with label -1 entries
    task.evaluator.pad = True
    batches = list(task.evaluator._batches())
    assert {b[0].shape[0] for b in batches} == {4} and int((batches[-1][1] == -1).sum()) == 3
    padded = task.evaluate()
    assert (padded["top1"], padded["top5"], padded["count"]) == (res["top1"], res["top5"], 17)
    assert padded["loss"] == pytest.approx(res["loss"], rel=1e-6)  # batch shape changes fp32 rounding only
    assert not build_task(ft_cfg(tmp_path, train_dir=train), CPU).can_evaluate  # no data.val


# ----------------------------------------------------------------------------------------------
# Loading distilled students
# ----------------------------------------------------------------------------------------------
def _student_cfg_dict(**kw):
    return {**STUDENT, "num_classes": 0, **kw}


def _distilled(seed=3):
    """A 'distilled' student with non-trivial weights everywhere (the RPB table starts at zero)."""
    from fdfast.config import StudentConfig
    torch.manual_seed(seed)
    dm = DistillModel(StudentConfig(**_student_cfg_dict()), 48)
    with torch.no_grad():
        for p in dm.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return dm


def _assert_loaded(model, encoder):
    sd, enc = model.state_dict(), encoder.state_dict()
    shared = enc["rel_pos_bias.relative_position_bias_table"]
    for i in range(STUDENT["depth"]):
        assert torch.equal(sd[f"blocks.{i}.attn.relative_position_bias_table"], shared)
    for k in ("cls_token", "patch_embed.proj.weight", "blocks.1.attn.qkv.weight", "blocks.0.gamma_1",
              "blocks.1.attn.q_bias", "blocks.0.mlp.fc2.bias"):
        assert torch.equal(sd[k], enc[k]), k
    # fresh head (init x0.001) and fc_norm; the distillation 'norm' is discarded
    assert torch.equal(sd["fc_norm.weight"], torch.ones(STUDENT["embed_dim"]))
    assert sd["head.weight"].abs().max() < 1e-3


def test_task_builds_from_an_fdfast_checkpoint(tmp_path):
    dm = _distilled()
    distill_run = tmp_path / "distill"
    dcfg = ft_dict(tmp_path)
    dcfg["model"]["student"] = _student_cfg_dict()
    dcfg["train"]["task"] = "distill"
    ckpt.save_checkpoint(distill_run, 12, {"model": dm.state_dict(), "step": 12, "config": dcfg})
    cfg = ft_cfg(tmp_path, model={"pretrained": str(distill_run)})  # the run folder: newest checkpoint
    task = build_task(cfg, CPU)
    _assert_loaded(task.model, dm.encoder)
    assert task.state_dict()["pretrained_tensors"] > 0 and task.state_dict()["pretrained"] == str(distill_run)


def test_task_builds_from_an_official_layout_file(tmp_path):
    dm = _distilled(seed=4)
    enc = dm.encoder.state_dict()
    model = {f"encoder.{k}": v for k, v in enc.items()}
    model["encoder.rel_pos_bias.relative_position_index"] = torch.zeros(17, 17, dtype=torch.long)
    model["decoder.0.weight"] = dm.decoder.weight.detach()[..., None]
    model["decoder.0.bias"] = dm.decoder.bias.detach()
    model["feature_model.visual.conv1.weight"] = torch.randn(4, 3, 8, 8)  # the teacher, ignored
    path = tmp_path / "ckpt_epoch_299.pth"
    torch.save({"model": model, "epoch": 299, "max_accuracy": 0.0}, path)
    task = build_task(ft_cfg(tmp_path, model={"pretrained": str(path)}), CPU)
    _assert_loaded(task.model, dm.encoder)
    # strict: a missing encoder key is an error that names it (the official loader would ignore it)
    del model["encoder.blocks.1.mlp.fc1.weight"]
    torch.save({"model": model}, path)
    from fdfast.interop.conversion import CheckpointKeyError
    with pytest.raises(CheckpointKeyError, match=r"blocks\.1\.mlp\.fc1\.weight"):
        build_task(ft_cfg(tmp_path, model={"pretrained": str(path)}), CPU)


def test_missing_pretrained_path_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="model.pretrained="):
        build_task(ft_cfg(tmp_path, model={"pretrained": str(tmp_path / "nope")}), CPU)


# ----------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------
def _probe_cfg(tmp_path, **train):
    return ft_cfg(tmp_path, optim={"optimizer": "lars", "layer_decay": 1.0, "base_lr": 0.1, "weight_decay": 0.0},
                  train={"task": "linprobe", **train}, augment={"mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.0})


def _drop_paths(model):
    from timm.layers import DropPath
    return [m for m in model.modules() if isinstance(m, DropPath)]


def test_linprobe_trains_only_the_head(tmp_path):
    cfg = _probe_cfg(tmp_path)
    torch.manual_seed(0)
    task = build_task(cfg, CPU)
    model = task.model
    head = model.head
    assert isinstance(head, nn.Sequential) and isinstance(head[0], nn.BatchNorm1d) and isinstance(head[1], nn.Linear)
    assert not head[0].affine and head[0].eps == 1e-6
    assert head[1].weight.std().item() == pytest.approx(0.01, rel=0.15) and not head[1].bias.any()
    assert sorted(n for g in task.groups for n in g["names"]) == ["head.1.bias", "head.1.weight"]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    # drop path off (backbone in eval mode) by default; BN head in train mode
    assert _drop_paths(model) and not any(m.training for m in _drop_paths(model))
    assert head.training and head[0].training
    # no gradient reaches the backbone
    task.loss(*_batch()).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == {"head.1.weight", "head.1.bias"}
    model.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = build_optimizer(task.groups, cfg.optim, CPU.device)
    step = TrainStep(task.train_model, task.loss, opt, [p for g in task.groups for p in g["params"]],
                     precision="fp32", device=CPU.device, clip_grad=cfg.optim.clip_grad)
    step.set_lr([0.1] * len(task.groups))
    step([_batch(seed=1)])
    after = model.state_dict()
    for k, v in before.items():
        if not k.startswith("head."):
            assert torch.equal(v, after[k]), f"backbone tensor {k} changed"
    assert not torch.equal(before["head.1.weight"], after["head.1.weight"])
    assert not torch.equal(before["head.0.running_mean"], after["head.0.running_mean"])  # BN in train mode
    # train.probe_drop_path=true: the official behaviour, whole model in train mode, drop path active
    task2 = build_task(_probe_cfg(tmp_path, probe_drop_path=True), CPU)
    assert all(m.training for m in _drop_paths(task2.model))


def test_linprobe_backbone_is_deterministic_and_eval_restores_modes(tmp_path, folders):
    train, val = folders
    cfg = ft_cfg(tmp_path, train_dir=train, val_dir=val, optim={"optimizer": "lars", "layer_decay": 1.0},
                 train={"task": "linprobe", "batch_size": 4}, augment={"mixup": 0.0, "cutmix": 0.0})
    task = build_task(cfg, CPU)
    x = normalize(_batch(4)[0], IMAGENET_MEAN, IMAGENET_STD)
    with torch.no_grad():
        f1, f2 = task.model.forward_features(x), task.model.forward_features(x)
    assert torch.equal(f1, f2)  # no drop path in the frozen backbone
    task.evaluate()
    assert task.model.head.training and not any(m.training for m in _drop_paths(task.model))


def test_swin_finetune_and_linprobe_build(tmp_path):
    swin = {"arch": "swinv2", "img_size": 32, "patch_size": 2, "embed_dim": 16, "depth": [2, 2], "num_heads": [2, 4],
            "window_size": 4, "drop_path": 0.1, "num_classes": 6}
    task = build_task(ft_cfg(tmp_path, model={"student": swin}), CPU)
    assert {n for g in task.groups for n in g["names"]} == {n for n, _ in task.model.named_parameters()}
    task.loss(*_batch()).backward()
    probe = build_task(ft_cfg(tmp_path, model={"student": swin},
                                       optim={"optimizer": "lars", "layer_decay": 1.0},
                                       train={"task": "linprobe"}, augment={"mixup": 0.0, "cutmix": 0.0}), CPU)
    fc = probe.model.head.fc
    assert isinstance(fc, nn.Sequential) and isinstance(fc[0], nn.BatchNorm1d) and fc[1].in_features == 32
    assert sorted(n for g in probe.groups for n in g["names"]) == ["head.fc.1.bias", "head.fc.1.weight"]
    assert not any(m.training for m in _drop_paths(probe.model)) and fc.training
    probe.loss(*_batch()).backward()
    grads = {n for n, p in probe.model.named_parameters() if p.grad is not None}
    assert grads == {"head.fc.1.weight", "head.fc.1.bias"}


def _moco_lars_step(w, g, lr, wd, momentum_buf=None, eta=1e-3, m=0.9):
    """MoCo v3's LARS (moco-v3/optimizer.py) for one parameter."""
    dp = g.clone()
    if w.ndim > 1:
        dp = dp.add(w, alpha=wd)
        pn, un = torch.norm(w), torch.norm(dp)
        q = torch.where(pn > 0, torch.where(un > 0, eta * pn / un, torch.ones_like(pn)), torch.ones_like(pn))
        dp = dp.mul(q)
    mu = dp if momentum_buf is None else momentum_buf.mul(m).add(dp)
    return w - lr * mu, mu


@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_lars_matches_moco_v3(tmp_path, wd):
    from fdfast.config import OptimConfig

    torch.manual_seed(0)
    lin = nn.Linear(16, 5)
    groups = [{"params": [lin.weight], "weight_decay": wd, "lr_scale": 1.0},
              {"params": [lin.bias], "weight_decay": 0.0, "lr_scale": 1.0}]
    opt = build_optimizer(groups, OptimConfig(optimizer="lars", weight_decay=wd), torch.device("cpu"))
    for g in opt.param_groups:
        g["lr"] = 0.5
    mw = mb = None
    for _ in range(3):
        w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
        gw, gb = torch.randn_like(w), torch.randn_like(b)
        lin.weight.grad, lin.bias.grad = gw.clone(), gb.clone()
        opt.step()
        w_ref, mw = _moco_lars_step(w, gw, 0.5, wd, mw)
        b_ref, mb = _moco_lars_step(b, gb, 0.5, wd, mb)
        # compare the updates themselves: they are small next to the weights
        torch.testing.assert_close(lin.weight.detach() - w, w_ref - w, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(lin.bias.detach() - b, b_ref - b, rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# The configs
# ----------------------------------------------------------------------------------------------
SPEC = {  # spec §2.3: DPR, epochs, warmup, base LR, warmup = min LR, layer decay, batch / GPU
    "clip_vit_base_100ep": (0.1, 100, 20, 1.25e-3, 2.5e-7, 0.65, 128),
    "clip_vit_base_300ep": (0.3, 100, 20, 1.25e-3, 2.5e-7, 0.6, 128),
    "clip_vit_large_300ep": (0.4, 50, 5, 2.5e-4, 5e-7, 0.75, 128),
    "deit_vit_base_300ep": (0.3, 100, 20, 1.25e-3, 2.5e-7, 0.65, 128),
    "dino_vit_base_300ep": (0.2, 100, 20, 1.5e-3, 2.5e-7, 0.6, 128),
    "esvit_swin_base_300ep": (0.4, 100, 20, 1.25e-3, 2.5e-7, 0.8, 64),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_finetune_configs_match_the_spec(name, tmp_path):
    cfg = load_config(REPO / "configs" / "finetune" / f"{name}.yaml")
    imagenet = tmp_path / "train"  # ImageNet-1K's class folders (the class count reads folder names only)
    for k in range(1000):
        (imagenet / f"n{k:08d}").mkdir(parents=True)
    resolved = resolve_num_classes(load_config(REPO / "configs" / "finetune" / f"{name}.yaml",
                                               [f"data.train={imagenet}"]))
    assert (cfg.model.student.num_classes, cfg.data.num_classes) == (0, None)  # both follow the data
    assert (resolved.model.student.num_classes, resolved.data.num_classes) == (1000, 1000)
    dpr, epochs, warmup, lr, wmin, ld, bs = SPEC[name]
    s, d, o, t = cfg.model.student, cfg.data, cfg.optim, cfg.train
    assert (s.drop_path, t.epochs, o.warmup_epochs, t.batch_size) == (dpr, epochs, warmup, bs)
    assert o.base_lr == pytest.approx(lr) and o.layer_decay == pytest.approx(ld)
    assert o.warmup_lr == pytest.approx(wmin) and o.min_lr == pytest.approx(wmin)
    assert (o.weight_decay, o.clip_grad, o.optimizer, tuple(o.betas), o.eps) == (0.05, 5.0, "adamw", (0.9, 0.999), 1e-8)
    a = cfg.augment
    assert (t.task, a.mixup, a.cutmix, a.label_smoothing) == ("finetune", 0.8, 1.0, 0.1)
    assert (d.auto_augment, a.re_prob, d.interpolation, d.eval_resize) == ("rand-m9-mstd0.5-inc1", 0.25, "bicubic", 256)
    assert (d.min_scale, d.max_scale, s.img_size) == (0.08, 1.0, 224)
    assert t.precision == "auto" and d.val and cfg.model.pretrained
    assert d.backend in ("torchvision", "dali")
    if "swin" in name:
        assert (s.arch, s.patch_size, s.embed_dim, s.depth, s.num_heads, s.window_size) == (
            "swinv2", 4, 128, [2, 2, 18, 2], [4, 8, 16, 32], 14)
    else:
        large = "large" in name
        assert (s.arch, s.patch_size, s.embed_dim, s.depth, s.num_heads) == (
            ("beit", 14, 1024, 24, 16) if large else ("beit", 16, 768, 12, 12))
    # effective LR on 16 GPUs as in the spec table
    total = 16 * bs
    assert lr * total / 512 == pytest.approx({128: 4.0, 64: 2.0}[bs] * lr)


def test_demo_config_matches_the_pretrain_demo():
    ft = load_config(REPO / "configs" / "finetune" / "demo_cpu.yaml")
    pre = load_config(REPO / "configs" / "pretrain" / "demo_cpu.yaml")
    for k in ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "init_values"):
        assert getattr(ft.model.student, k) == getattr(pre.model.student, k), k
    assert ft.model.pretrained == pre.train.output_dir
    assert ft.data.train == pre.data.train and ft.data.val
    assert Path(ft.data.val).parent == Path(pre.data.train).parent  # both written by `make demo`
    assert ft.model.student.num_classes == ft.data.num_classes == pre.data.num_classes
    assert ft.train.output_dir != pre.train.output_dir


# ----------------------------------------------------------------------------------------------
# Through the trainer: end to end and exact resume
# ----------------------------------------------------------------------------------------------
def _metrics(run: Path):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "kind" not in r], [r for r in lines if r.get("kind") == "eval"]


def _e2e_dict(tmp_path, train, val, out, **train_kw):
    return ft_dict(tmp_path, train_dir=train, val_dir=val,
                   data={"auto_augment": "rand-m9-mstd0.5-inc1"}, augment={"re_prob": 0.25},
                   train={"output_dir": str(out), "batch_size": 8, "epochs": 2, **train_kw})


def test_end_to_end_finetune_reports_top1(tmp_path, folders):
    from fdfast.trainer import train as run_train

    train, val = folders
    dm = _distilled()
    ckpt.save_checkpoint(tmp_path / "distill", 5, {"model": dm.state_dict(), "step": 5, "config": {}})
    d = _e2e_dict(tmp_path, train, val, tmp_path / "ft", epochs=1)
    d["model"]["pretrained"] = str(tmp_path / "distill")
    summary = run_train(config_from_dict(d), CPU)
    assert summary["step"] == 24 // 8
    best = summary["best"]
    assert best["count"] == 17 and 0 <= best["top1"] <= best["top5"] <= 100
    steps, evals = _metrics(tmp_path / "ft")
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) for r in steps)
    assert len(evals) == 1 and evals[0]["top1"] == best["top1"]
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["best"]["top1"] == best["top1"]
    state, _ = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "ft"))
    assert state["extra"]["pretrained"] == str(tmp_path / "distill")
    # layer decay reached the optimizer: 4 layer ids x (decay, no-decay)
    assert len(state["optimizer"]["param_groups"]) == 8


def test_exact_resume(tmp_path, folders):
    """Interrupt mid-epoch (max_steps), resume, compare every logged loss and the final weights with an
    uninterrupted run: mixup/cutmix (numpy), random erasing (python + torch), drop path (torch) and
    RandAugment (per-sample seeds in the loader) all have to continue the same streams. (Breaking the
    restore of any one of the torch / numpy / python RNG states makes this test fail.)"""
    from fdfast.trainer import train as run_train

    train, val = folders
    full = _e2e_dict(tmp_path, train, val, tmp_path / "full", epochs=2)
    run_train(config_from_dict(full), CPU)
    part = _e2e_dict(tmp_path, train, val, tmp_path / "part", epochs=2, max_steps=4)  # epoch 2, step 1 of 3
    run_train(config_from_dict(part), CPU)
    del part["train"]["max_steps"]
    run_train(config_from_dict(part), CPU)
    (ref, ref_eval), (got, got_eval) = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 7))
    assert [r["loss"] for r in got] == [r["loss"] for r in ref]
    assert [e["top1"] for e in got_eval][-1] == ref_eval[-1]["top1"]
    a = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "full"))[0]["model"]
    b = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "part"))[0]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_best_weights_are_kept_beside_the_last_checkpoints(tmp_path, folders, monkeypatch):
    """best/ holds the weights of the epoch with the highest top-1, not the last epoch's."""
    import copy

    from fdfast.tasks.finetune import FinetuneTask
    from fdfast.trainer import train as run_train

    train_dir, val = folders
    scripted, seen = iter([10.0, 30.0, 20.0]), []

    def fake_eval(self, should_stop=None):
        seen.append(copy.deepcopy(self.model.state_dict()))
        return {"top1": next(scripted), "top5": 90.0, "loss": 1.0, "count": 17}

    monkeypatch.setattr(FinetuneTask, "evaluate", fake_eval)
    out = tmp_path / "ft"
    run_train(config_from_dict(_e2e_dict(tmp_path, train_dir, val, out, epochs=3)), CPU)
    assert ckpt.verify(out / "best") is None
    best, _ = ckpt.load_checkpoint(out / "best")
    assert best["epoch"] == 2 and best["best"]["top1"] == 30.0 and "optimizer" not in best
    assert all(torch.equal(best["model"][k], seen[1][k]) for k in seen[1])
    assert not all(torch.equal(best["model"][k], seen[2][k]) for k in seen[2])


def test_an_epoch_checkpointed_but_not_evaluated_is_evaluated_on_resume(tmp_path, folders, monkeypatch):
    from fdfast.tasks.finetune import FinetuneTask
    from fdfast.trainer import train as run_train

    train_dir, val = folders
    real = FinetuneTask.evaluate
    calls = []

    def killed_in_eval(self, should_stop=None):
        calls.append("x")
        raise KeyboardInterrupt("killed after the epoch's checkpoint, before its evaluation")

    d = _e2e_dict(tmp_path, train_dir, val, tmp_path / "ft", epochs=2)
    d["checkpoint"] = {"every": 3}  # 3 steps per epoch: a checkpoint at each epoch end
    monkeypatch.setattr(FinetuneTask, "evaluate", killed_in_eval)
    with pytest.raises(KeyboardInterrupt):
        run_train(config_from_dict(d), CPU)
    assert calls and ckpt.find_latest(tmp_path / "ft").name == "step_00000003"
    monkeypatch.setattr(FinetuneTask, "evaluate", real)
    run_train(config_from_dict(d), CPU)
    _, evals = _metrics(tmp_path / "ft")
    assert [e["epoch"] for e in evals] == [1, 2], "epoch 1 was checkpointed but never evaluated"


def test_a_stop_signal_during_an_evaluation_abandons_it_checkpoints_and_the_rerun_redoes_it(tmp_path, folders,
                                                                                          monkeypatch):
    """A preemption grace period can be shorter than a validation pass: the pass stops at the next batch."""
    from fdfast.tasks import evaluation
    from fdfast.trainer import Preempted
    from fdfast.trainer import train as run_train

    train_dir, val = folders
    real_counts, batches = evaluation.eval_counts, []

    def signalled_during_first_batch(logits, labels):
        if not batches:
            os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends; the trainer's handler only sets a flag
        batches.append(len(labels))
        return real_counts(logits, labels)

    d = _e2e_dict(tmp_path, train_dir, val, tmp_path / "ft", epochs=2)
    d["checkpoint"] = {"every": 100}  # no periodic checkpoint at the epoch end: the stop must write one
    monkeypatch.setattr(evaluation, "eval_counts", signalled_during_first_batch)
    with pytest.raises(Preempted, match="during the evaluation at step 3"):
        run_train(config_from_dict(d), CPU)
    assert len(batches) == 1  # 17 images = 3 batches of 8: the pass stopped before the second
    assert ckpt.find_latest(tmp_path / "ft").name == "step_00000003"
    steps, evals = _metrics(tmp_path / "ft")
    assert [r["step"] for r in steps] == [1, 2, 3] and evals == []  # no partial top-1 recorded
    monkeypatch.setattr(evaluation, "eval_counts", real_counts)
    run_train(config_from_dict(d), CPU)
    steps, evals = _metrics(tmp_path / "ft")
    assert [r["step"] for r in steps if r.get("kind") is None] == [1, 2, 3, 4, 5, 6]
    assert [e["epoch"] for e in evals] == [1, 2] and all(e["count"] == 17 for e in evals)


def test_a_finetune_resume_skips_a_damaged_checkpoint_and_does_not_reread_pretrained(tmp_path, folders, capsys):
    """The fine-tune task asks the resume rules whether weights will come from a checkpoint (before: a
    damaged newest checkpoint crashed the task's own look-up); model.pretrained is then not read again."""
    from fdfast.trainer import train as run_train

    train_dir, val = folders
    dm = _distilled()
    ckpt.save_checkpoint(tmp_path / "distill", 5, {"model": dm.state_dict(), "step": 5, "config": {}})
    d = _e2e_dict(tmp_path, train_dir, val, tmp_path / "ft", epochs=2, max_steps=4)
    d["model"]["pretrained"] = str(tmp_path / "distill")
    d["checkpoint"] = {"every": 2, "keep": 5}
    run_train(config_from_dict(d), CPU)
    newest = ckpt.find_latest(tmp_path / "ft") / "state.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 4
    newest.write_bytes(bytes(data))
    shutil.rmtree(tmp_path / "distill")  # not needed any more: the checkpoints hold every weight
    del d["train"]["max_steps"]
    capsys.readouterr()
    summary = run_train(config_from_dict(d), CPU)
    log = capsys.readouterr().out
    assert "is not read again" in log and "skipping checkpoint" in log and "step_00000002 at step 2" in log
    assert summary["step"] == 6
