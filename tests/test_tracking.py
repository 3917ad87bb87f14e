"""Tracker: metrics.jsonl + TensorBoard scalars (+ W&B), rank 0 only; peak memory; run environment."""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fdfast import tracking
from fdfast.config import ConfigError, LogConfig, load_config
from fdfast.errors import MissingDependency, UserError
from fdfast.tracking import Tracker, device_peak_memory_gib, run_environment

ROOT = Path(__file__).resolve().parents[1]
TRAIN = {"step": 10, "epoch": 0.5, "loss": 0.25, "lr_groups": [1e-4, 2e-4], "img_per_s_per_device": 80.0,
         "wall_time": 1795900000.5, "peak_mem_gib": None}
EVAL = {"step": 10, "epoch": 1, "kind": "eval", "top1": 61.5, "top5": 90.0}


def scalars_in(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_records_go_to_jsonl_and_tensorboard_by_kind(tmp_path):
    with Tracker(LogConfig(), tmp_path / "run") as tracker:
        tracker.log(TRAIN)
        tracker.log(EVAL)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [TRAIN, EVAL]
    tb = scalars_in(tmp_path / "run" / "tensorboard")
    assert set(tb) == {"train/epoch", "train/loss", "train/lr_groups/0", "train/lr_groups/1",
                       "train/img_per_s_per_device", "eval/epoch", "eval/top1", "eval/top5"}
    assert tb["train/loss"] == [(10, 0.25)] and tb["eval/top1"] == [(10, 61.5)]
    assert tb["train/lr_groups/1"][0][1] == pytest.approx(2e-4)


def test_only_rank_zero_writes(tmp_path):
    tracker = Tracker(LogConfig(wandb=True), tmp_path / "run", rank=1)  # no wandb import on other ranks either
    tracker.log(TRAIN)
    tracker.close()
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_replaces_the_steps_after_its_checkpoint(tmp_path):
    with Tracker(LogConfig(), tmp_path) as first:
        for step in range(1, 5):
            first.log({"step": step, "loss": float(step)})
    # killed after step 4; the checkpoint was at step 2, so steps 3 and 4 are trained and logged again
    with Tracker(LogConfig(), tmp_path, resume_step=2) as again:
        for step in (3, 4):
            again.log({"step": step, "loss": 10.0 + step})
    assert scalars_in(tmp_path / "tensorboard")["train/loss"] == [(1, 1.0), (2, 2.0), (3, 13.0), (4, 14.0)]


def test_without_tensorboard_one_warning_and_jsonl_still_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes its import fail
    with Tracker(LogConfig(), tmp_path) as tracker:
        tracker.log(TRAIN)
        tracker.log(EVAL)
    out = capsys.readouterr().out
    assert out.count("warning") == 1 and "log.tensorboard=false" in out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "tensorboard").exists()
    with Tracker(LogConfig(tensorboard=False), tmp_path / "off") as quiet:
        quiet.log(TRAIN)
    assert capsys.readouterr().out == ""


def test_missing_wandb_is_a_user_error_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(MissingDependency, match=r"pip install 'fdfast\[wandb\]'.*log\.wandb=false") as err:
        Tracker(LogConfig(wandb=True), tmp_path / "run")
    assert isinstance(err.value, UserError)
    assert not (tmp_path / "run").exists()


class FakeWandb(types.ModuleType):
    """Records what the tracker asks of wandb (the package is optional and would need an account)."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(log=lambda data, step: self.logged.append((step, data)),
                                     finish=self._finish)

    def _finish(self):
        self.finished += 1


def test_wandb_gets_the_same_scalars_and_a_rerun_continues_the_same_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = LogConfig(wandb=True, wandb_project="fd-test", wandb_mode="offline", tensorboard=False)
    out = tmp_path / "fd_clip_b16"
    with Tracker(cfg, out, config={"train": {"epochs": 3}}) as tracker:
        tracker.log(TRAIN)
        tracker.log(EVAL)
    first = fake.inits[0]
    assert (first["project"], first["name"], first["mode"], first["dir"]) == ("fd-test", "fd_clip_b16", "offline", str(out))
    assert first["config"] == {"train": {"epochs": 3}} and first["resume"] == "allow"
    assert fake.logged[0] == (10, tracking.scalars(TRAIN)) and fake.logged[1] == (10, {
        "eval/epoch": 1.0, "eval/top1": 61.5, "eval/top5": 90.0})
    assert fake.finished == 1
    Tracker(cfg, out).close()
    assert fake.inits[1]["id"] == first["id"] and fake.finished == 2
    assert (first["entity"], first["group"], first["tags"]) == (None, None, None)  # W&B's own defaults


def test_wandb_entity_name_group_and_tags_come_from_the_log_section(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = load_config(None, ["log.wandb=true", "log.wandb_entity=my-team", "log.wandb_name=fd-b16-run1",
                             "log.wandb_group=fd-b16", "log.wandb_tags=[distill, clip]", "log.tensorboard=false"]).log
    Tracker(cfg, tmp_path / "run").close()
    (init,) = fake.inits
    assert (init["entity"], init["name"], init["group"], init["tags"]) == ("my-team", "fd-b16-run1", "fd-b16",
                                                                         ["distill", "clip"])
    with pytest.raises(ConfigError, match=r"log\.wandb_tags"):
        load_config(None, ["log.wandb_tags=7"])


def test_log_section_checks_its_wandb_keys():
    with pytest.raises(ConfigError, match=r"log\.wandb_mode: 'ofline'.*did you mean 'offline'"):
        load_config(None, ["log.wandb_mode=ofline"])
    with pytest.raises(ConfigError, match=r"log\.wandb_project is empty"):
        load_config(None, ["log.wandb=true", "log.wandb_project="])
    assert load_config(None, []).log.tensorboard is True and load_config(None, []).log.wandb is False


def test_peak_memory_is_none_on_cpu_and_gib_on_cuda(monkeypatch):
    assert device_peak_memory_gib("cpu") is None
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: 3 * 2**30)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    assert device_peak_memory_gib(torch.device("cuda", 1)) == 3.0 and resets == []
    assert device_peak_memory_gib("cuda:1", reset=True) == 3.0 and resets == [torch.device("cuda", 1)]


def test_run_environment_names_the_version_commit_libraries_and_hardware(monkeypatch):
    env = run_environment()
    assert env["torch"] == torch.__version__ and env["timm"] == timm.__version__
    assert set(env) == {"fdfast", "git_commit", "python", "torch", "cuda", "timm", "torchvision", "dali", "ffcv",
                        "cpu", "gpu", "gpu_count", "gpu_driver"}
    assert env["fdfast"] == importlib.metadata.version("fdfast") and env["cpu"]
    if (ROOT / ".git").exists():
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        assert env["git_commit"] == head
    if not torch.cuda.is_available():
        assert (env["gpu"], env["gpu_count"], env["gpu_driver"]) == (None, 0, None)
    json.dumps(env)  # goes into summary.json as is

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")
    monkeypatch.setattr(tracking.subprocess, "run", no_git)
    assert run_environment()["git_commit"] is None


def test_a_copy_outside_a_checkout_names_its_version_and_no_commit(tmp_path):
    copy = tmp_path / "site"
    shutil.copytree(ROOT / "fdfast", copy / "fdfast", ignore=shutil.ignore_patterns("__pycache__", "configs"))
    script = "import json, fdfast.tracking as t; print(t.__file__); print(json.dumps(t.run_environment()))"
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(copy)},
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    module, env = r.stdout.splitlines()[:2]
    env = json.loads(env)
    assert Path(module).is_relative_to(copy)
    assert env["git_commit"] is None and env["fdfast"] == importlib.metadata.version("fdfast")


def test_the_nvidia_driver_is_read_from_proc_or_nvidia_smi(monkeypatch):
    proc = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.124.06  Release Build  (dvs-builder@U16)"
    monkeypatch.setattr(tracking.Path, "read_text", lambda self: proc)
    assert tracking._nvidia_driver() == "570.124.06"

    def no_proc(self):
        raise FileNotFoundError(self)
    monkeypatch.setattr(tracking.Path, "read_text", no_proc)
    monkeypatch.setattr(tracking.subprocess, "run", lambda *a, **k: types.SimpleNamespace(
        returncode=0, stdout="550.54.15\n550.54.15\n"))
    assert tracking._nvidia_driver() == "550.54.15"


def test_a_training_run_records_every_group_lr_time_memory_and_its_environment(tiny_cfg, tmp_path):
    from fdfast.trainer import train
    out = tmp_path / "run"
    summary = train(tiny_cfg(train={"output_dir": str(out), "max_steps": 3}, optim={"layer_decay": 1.0}))
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert len(r["lr_groups"]) == 2 and r["lr"] == r["lr_groups"][-1]  # decay and no-decay groups
        assert r["wall_time"] > 1.7e9 and "peak_mem_gib" in r and r["peak_mem_gib"] is None  # CPU
    saved = json.loads((out / "summary.json").read_text())
    assert saved["img_per_s_per_device_mean"] > 0 and saved == json.loads(json.dumps(summary))
    env = saved["environment"]
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"] == torch.__version__
    assert env["fdfast"] == importlib.metadata.version("fdfast") and env["cpu"]
    assert any((out / "tensorboard").rglob("events.out.tfevents.*"))


def test_throughput_counts_training_steps_only_not_checkpoints_or_evaluations(tiny_cfg, tmp_path, monkeypatch):
    """A slow checkpoint write (a busy file system) must not show up as slow steps in img/s."""
    from fdfast.trainer import Trainer, train
    pause = 3.0
    real_save = Trainer.save

    def slow_save(self, *args, **kwargs):
        time.sleep(pause)
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save", slow_save)
    out = tmp_path / "run"
    cfg = tiny_cfg(train={"output_dir": str(out), "max_steps": 4}, checkpoint={"every": 2}, log={"every": 2})
    summary = train(cfg)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4]
    assert recs[1]["time"] - recs[0]["time"] > pause  # the wall clock includes the checkpoint at step 2 ...
    window_seconds = 2 * cfg.train.batch_size / recs[1]["img_per_s_per_device"]
    assert window_seconds < pause / 2  # ... the steps' img/s does not
    assert 4 * cfg.train.batch_size / summary["img_per_s_per_device_mean"] < pause
