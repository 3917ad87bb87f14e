"""A run killed with SIGKILL at a random moment and restarted with the same command ends exactly
where an uninterrupted run ends (CPU): same weights, same logged losses."""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_dict
from fdfast import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def _cmd(cfg_file):
    return [sys.executable, "-m", "fdfast.cli.train", "--config", str(cfg_file)]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _kill_then_rerun(tmp_path, make_dict, steps):
    """An uninterrupted run and one SIGKILLed up to three times at random moments then rerun to its end: their
    final checkpoints (model + task state) and logged records; the rerun's output."""
    cfgs = {}
    for name in ("full", "killed"):
        d = make_dict(tmp_path)
        d["train"]["output_dir"] = str(tmp_path / name)
        cfgs[name] = tmp_path / f"{name}.yaml"
        cfgs[name].write_text(yaml.safe_dump(d))
    subprocess.run(_cmd(cfgs["full"]), check=True, cwd=ROOT, env=_env(), capture_output=True, timeout=600)

    out = tmp_path / "killed"
    rng = random.Random(os.getpid())
    kills = 0
    for _ in range(3):  # up to three kills at random moments, each after some progress
        proc = subprocess.Popen(_cmd(cfgs["killed"]), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        start = len(ckpt.list_checkpoints(out))
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(ckpt.list_checkpoints(out)) <= start:
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))  # somewhere between two checkpoints, maybe mid-write
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1, "the run finished before it could be killed; make it longer"
    r = subprocess.run(_cmd(cfgs["killed"]), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    def final(run):
        state, _ = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / run))
        records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return state, records

    (a, la), (b, lb) = final("full"), final("killed")
    assert a["step"] == b["step"] == steps
    assert [(x["step"], x["loss"]) for x in la] == [(x["step"], x["loss"]) for x in lb], \
        "logged losses differ after kill + resume"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp_*")), "stale temporary checkpoint left"
    return a, b, la, lb, r.stdout + r.stderr


@pytest.mark.slow
def test_sigkill_at_random_moment_then_rerun_equals_uninterrupted(tmp_path):
    settings = dict(data={"synthetic_size": 96}, train={"epochs": 2}, checkpoint={"every": 3}, log={"every": 1})
    _kill_then_rerun(tmp_path, lambda tmp: tiny_dict(tmp, **settings), steps=24)


def _two_phi_s_teachers(tmp):
    d = tiny_dict(tmp, data={"synthetic_size": 64}, train={"epochs": 2}, checkpoint={"every": 2}, log={"every": 1},
                  model={"phi_s_batches": 3})
    del d["model"]["teacher"]
    d["model"]["teachers"] = [
        {"name": "sig", "kind": "timm", "model": "vit_base_patch16_siglip_224", "weights": "random",
         "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}, "whiten": "phi_s"},
        {"name": "dino", "kind": "timm", "model": "vit_base_patch14_reg4_dinov2", "weights": "random", "weight": 0.5,
         "model_kwargs": {"patch_size": 7, "embed_dim": 48, "depth": 1, "num_heads": 2}, "whiten": "phi_s",
         "head": "mlp"}]
    return d


@pytest.mark.slow
def test_two_teacher_phi_s_run_killed_and_rerun_equals_uninterrupted(tmp_path):
    """Heads, PHI-S statistics and per-teacher losses come back bit-exactly; the rerun resumes them from its
    checkpoint instead of estimating them again."""
    a, b, la, lb, rerun = _kill_then_rerun(tmp_path, _two_phi_s_teachers, steps=16)
    assert {k.split(".")[1] for k in a["model"] if k.startswith("heads.")} == {"sig", "dino"}
    for name in ("sig", "dino"):
        for k, v in a["extra"]["phi_s"][name].items():
            assert torch.equal(v, b["extra"]["phi_s"][name][k]), (name, k)
    assert [(x["loss_sig"], x["loss_dino"]) for x in la] == [(x["loss_sig"], x["loss_dino"]) for x in lb]
    assert "resumed from" in rerun and "PHI-S from" not in rerun
