"""fdfast-eval: the top-1 of a fine-tune run, its best/ folder, its timm export and an official-layout
file of the same weights, through the real command."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from fdfast import checkpoint as ckpt
from fdfast.config import config_from_dict
from fdfast.interop.export import export_checkpoint
from fdfast.trainer import train
from pipelines.generate import make_image_folder

ROOT = Path(__file__).resolve().parents[1]
STUDENT = {"arch": "beit", "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2,
           "drop_path": 0.0, "num_classes": 4}


def _eval(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fdfast.cli.eval", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=600)


def test_fdfast_eval_reproduces_the_runs_own_top1_from_every_form_of_the_model(tmp_path):
    images = tmp_path / "images"
    make_image_folder(images / "train", num_classes=4, per_class=4, sizes=((40, 56), (36, 36)), seed=1)
    make_image_folder(images / "val", num_classes=4, per_class=5, sizes=((50, 44), (36, 48)), seed=2)
    out = tmp_path / "ft"
    cfg = config_from_dict({
        "model": {"student": STUDENT},
        "data": {"backend": "torchvision", "train": str(images / "train"), "val": str(images / "val"),
                 "num_classes": 4, "num_workers": 0, "eval_resize": 36},
        "optim": {"base_lr": 5e-3, "warmup_epochs": 0, "layer_decay": 0.75, "clip_grad": 5.0},
        "train": {"task": "finetune", "epochs": 2, "batch_size": 8, "output_dir": str(out), "eval_norm": "clip"},
        "log": {"every": 1, "progress": "none", "tensorboard": False}})
    train(cfg)
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]
    export_checkpoint(out, "timm", tmp_path / "timm_export")
    state, _ = ckpt.load_checkpoint(ckpt.find_latest(out))
    official = {"model": dict(state["model"])}  # an official fine-tuned file: the same keys, no config
    torch.save(official, tmp_path / "official_ft.pth")

    r = _eval(out, out / "best", tmp_path / "timm_export", tmp_path / "official_ft.pth",
              "--data", images / "val", "--batch-size", 3, "--workers", 0, "--json", tmp_path / "val.json")
    assert r.returncode == 0, r.stderr[-3000:]
    run, best, timm_export, official = json.loads((tmp_path / "val.json").read_text())
    assert run["count"] == timm_export["count"] == official["count"] == 20
    # the run's own eval (CLIP normalisation, resize 36) and its export agree to the image
    assert run["top1"] == last["top1"] and run["top5"] == last["top5"]
    assert timm_export["top1"] == run["top1"] and abs(timm_export["loss"] - run["loss"]) < 1e-4
    assert best["top1"] == json.loads((out / "summary.json").read_text())["best"]["top1"]
    assert "top-1" in r.stdout and str(out) in r.stdout

    # a folder with fewer classes than the head is evaluated with a warning; with more, refused
    fewer, more = tmp_path / "fewer", tmp_path / "more"
    for c in range(3):
        shutil.copytree(images / "val" / f"class_{c:03d}", fewer / f"class_{c:03d}")
    shutil.copytree(images / "val", more)
    shutil.copytree(images / "val" / "class_000", more / "class_009")
    r = _eval(out, "--data", fewer, "--workers", 0)
    assert r.returncode == 0 and "warning: --data" in r.stdout and "has 3 classes and" in r.stdout, r.stdout[-2000:]
    r = _eval(out, "--data", more, "--workers", 0)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith("has 5 classes but ft predicts 4")
    # an unwritable --json (here a folder) loses nothing: the results are printed, then one line, exit 2
    r = _eval(out, "--data", images / "val", "--workers", 0, "--json", fewer)
    assert r.returncode == 2 and "top-1" in r.stdout and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (f"fdfast-eval: OutputNotWritable: --json {fewer}: cannot write it "
                                                 "(Is a directory); the results are printed above")


def test_a_model_without_a_classifier_is_one_line_exit_2(tmp_path, tiny_cfg):
    images = make_image_folder(tmp_path / "val", num_classes=2, per_class=2, sizes=((40, 40),))
    train(tiny_cfg(train={"output_dir": str(tmp_path / "fd"), "max_steps": 1}))
    r = _eval(tmp_path / "fd", "--data", images, "--workers", 0)
    assert r.returncode == 2 and "has no classifier head" in r.stderr and "Traceback" not in r.stderr


def test_worker_default_is_eight_or_the_usable_cores_if_fewer(monkeypatch):
    import pipelines
    from fdfast.cli import eval as eval_cli

    for cores, expected in ((2, 2), (64, 8)):
        monkeypatch.setattr(pipelines, "usable_cores", lambda cores=cores: cores)
        assert eval_cli.parse_args(["run", "--data", "val"]).workers == expected
    assert eval_cli.parse_args(["run", "--data", "val", "--workers", "0"]).workers == 0  # main process
