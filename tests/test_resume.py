"""Checkpoints: atomic writes, latest-valid selection, exact resume, NaN stop."""
import json
import shutil

import pytest
import torch

from fdfast import checkpoint as ckpt
from fdfast.trainer import NonFiniteLoss, train


def _losses(out_dir):
    return {r["step"]: r["loss"] for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r and r.get("kind") != "eval"}


def _weights(out_dir):
    state, _ = ckpt.load_checkpoint(ckpt.find_latest(out_dir))
    return state["model"]


@pytest.mark.parametrize("backend", ["synthetic", "torchvision"])
def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_cfg, tmp_path, image_folder, backend):
    data = {"backend": backend, "train": str(image_folder)} if backend == "torchvision" else {}
    full = tmp_path / "full"
    part = tmp_path / "part"
    # 48 images / 8 = 6 steps per epoch, 2 epochs; the break at step 5 is mid-epoch
    train(tiny_cfg(data=data, train={"output_dir": str(full)}))
    train(tiny_cfg(data=data, train={"output_dir": str(part), "max_steps": 5}, checkpoint={"every": 100}))
    assert ckpt.find_latest(part) .name == "step_00000005"
    train(tiny_cfg(data=data, train={"output_dir": str(part)}))
    a, b = _losses(full), _losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 13 if backend == "torchvision" else 17))
    assert a == b, "resumed losses differ from the uninterrupted run"
    wa, wb = _weights(full), _weights(part)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_interrupted_mid_write_is_never_picked(tiny_cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 4}, checkpoint={"every": 2, "keep": 5}))
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2, 4]

    real_save = torch.save

    def dying_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("format") == ckpt.FORMAT:
            f.write(b"PK\x03\x04 half a checkpoint")
            raise KeyboardInterrupt("killed mid-write")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(out, 6, {"model": {}}, keep=5)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.find_latest(out).name == "step_00000004"
    assert not (ckpt.ckpt_root(out) / "step_00000006").exists()

    # a folder with the final name but a truncated file (e.g. copied by hand) is skipped too
    bad = ckpt.ckpt_root(out) / "step_00000008"
    shutil.copytree(ckpt.ckpt_root(out) / "step_00000004", bad)
    with open(bad / "state.pt", "r+b") as f:
        f.truncate(100)
    assert ckpt.find_latest(out).name == "step_00000004"
    # and a folder without meta.json
    nometa = ckpt.ckpt_root(out) / "step_00000010"
    shutil.copytree(ckpt.ckpt_root(out) / "step_00000004", nometa)
    (nometa / "meta.json").unlink()
    assert ckpt.find_latest(out).name == "step_00000004"


def test_checkpoint_is_weights_only_loadable(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 2}))
    path = ckpt.find_latest(out)
    state = torch.load(path / "state.pt", weights_only=True)
    assert state["step"] == 2 and "encoder.cls_token" in state["model"] and "decoder.weight" in state["model"]
    assert state["optimizer"]["state"]
    torch.load(path / "rng_rank0.pt", weights_only=True)
    assert (out / "config.yaml").exists()


def test_nan_loss_stops_with_last_good_checkpoint_intact(tiny_cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 4}, checkpoint={"every": 4}))
    import fdfast.tasks.distill as step_mod
    real = step_mod.fd_loss
    calls = {"n": 0}

    def poisoned(pred, target, beta=2.0):
        calls["n"] += 1
        return real(pred, target, beta) * (float("nan") if calls["n"] >= 3 else 1.0)

    monkeypatch.setattr(step_mod, "fd_loss", poisoned)
    with pytest.raises(NonFiniteLoss, match="last good checkpoint"):
        train(tiny_cfg(train={"output_dir": str(out), "max_steps": 12}, checkpoint={"every": 2}, log={"every": 5}))
    latest = ckpt.find_latest(out)
    assert latest.name == "step_00000006"  # steps 5-6 were good; NaN from step 7 is never saved
    state, _ = ckpt.load_checkpoint(latest)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_rerunning_a_finished_run_changes_nothing(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 3}))
    path = ckpt.find_latest(out)
    before = (path / "state.pt").stat().st_mtime_ns
    lines = (out / "metrics.jsonl").read_text()
    summary = train(tiny_cfg(train={"output_dir": str(out), "max_steps": 3}))
    assert summary["step"] == 3
    assert (path / "state.pt").stat().st_mtime_ns == before
    assert (out / "metrics.jsonl").read_text() == lines
