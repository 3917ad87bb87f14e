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


@pytest.mark.slow
def test_sigkill_at_random_moment_then_rerun_equals_uninterrupted(tmp_path):
    settings = dict(data={"synthetic_size": 96}, train={"epochs": 2}, checkpoint={"every": 3}, log={"every": 1})
    cfgs = {}
    for name in ("full", "killed"):
        d = tiny_dict(tmp_path, **settings)
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
        losses = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return state, [(x["step"], x["loss"]) for x in losses]

    (a, la), (b, lb) = final("full"), final("killed")
    assert a["step"] == b["step"] == 24
    assert la == lb, "logged losses differ after kill + resume"
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert not list((tmp_path / "killed" / "checkpoints").glob(".tmp_*")), "stale temporary checkpoint left"
