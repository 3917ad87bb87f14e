"""Two CPU processes under torchrun (gloo): DDP trains and both ranks end with the same weights."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {tests!r})
    from conftest import tiny_dict
    from pathlib import Path
    from fdfast.config import config_from_dict
    from fdfast.distributed import init_distributed, shutdown
    from fdfast.trainer import train
    torch.set_num_threads(1)
    tmp = Path({tmp!r})
    cfg = config_from_dict(tiny_dict(tmp, data={data}, train={{"max_steps": 4}}, checkpoint={{"every": 2}}))
    info = init_distributed()
    assert info.world_size == 2
    train(cfg, info, on_end=lambda task: torch.save(task.model.state_dict(), tmp / f"weights_rank{{info.rank}}.pt"))
    shutdown()
""")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["synthetic", "torchvision"])
def test_two_rank_torchrun_trains_and_ranks_agree(tmp_path, image_folder, backend):
    data = {"backend": backend, "train": str(image_folder)} if backend == "torchvision" else {}
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(ROOT / "tests"), tmp=str(tmp_path), data=data))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    w0 = torch.load(tmp_path / "weights_rank0.pt", weights_only=True)
    w1 = torch.load(tmp_path / "weights_rank1.pt", weights_only=True)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks disagree on {k}"
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert lines[-1]["loss"] < lines[0]["loss"] * 1.5  # finite, sane
    from fdfast import checkpoint as ckpt
    latest = ckpt.find_latest(tmp_path / "run", world_size=2)
    saved = torch.load(latest / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], w0[k]) for k in w0)
    init = torch.load(ckpt.find_latest(tmp_path / "run", 2).parent / "step_00000002" / "state.pt",
                      weights_only=True)["model"]
    assert not torch.equal(init["decoder.weight"], w0["decoder.weight"]), "no training happened"
    # both ranks' RNG states are in the checkpoint, so either can resume exactly
    assert (latest / "rng_rank1.pt").exists()
