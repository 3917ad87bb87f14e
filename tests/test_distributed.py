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
    latest = ckpt.find_latest(tmp_path / "run")
    assert ckpt.read_meta(latest)["world_size"] == 2
    saved = torch.load(latest / "state.pt", weights_only=True)["model"]
    assert all(torch.equal(saved[k], w0[k]) for k in w0)
    init = torch.load(latest.parent / "step_00000002" / "state.pt",
                      weights_only=True)["model"]
    assert not torch.equal(init["decoder.weight"], w0["decoder.weight"]), "no training happened"
    # both ranks' RNG states are in the checkpoint, so either can resume exactly
    assert (latest / "rng_rank1.pt").exists()


RUN_WORKER = textwrap.dedent("""
    import json, os, sys, torch
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from fdfast.config import config_from_dict
    from fdfast.distributed import init_distributed, shutdown
    from fdfast.guard import EXIT_PREEMPTED
    from fdfast.trainer import Preempted, train
    torch.set_num_threads(1)
    info = init_distributed()
    Path({tmp!r}, f"pid_rank{{info.rank}}").write_text(str(os.getpid()))
    try:
        train(config_from_dict(json.loads(Path(sys.argv[1]).read_text())), info)
    except Preempted as e:
        print(e, flush=True)
        sys.exit(EXIT_PREEMPTED)
    finally:
        shutdown()
""")


def _run_cfg(tmp_path, name, **sections) -> Path:
    from conftest import tiny_dict
    d = tiny_dict(tmp_path, **sections)
    d["train"]["output_dir"] = str(tmp_path / name)
    f = tmp_path / f"{name}.json"
    f.write_text(json.dumps(d))
    return f


def _launch(tmp_path, cfg_file, nproc, background=False):
    script = tmp_path / "run_worker.py"
    script.write_text(RUN_WORKER.format(tests=str(ROOT / "tests"), tmp=str(tmp_path)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), str(cfg_file)] if nproc > 1 else [sys.executable, str(script), str(cfg_file)]
    kw = dict(cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
              text=True)
    if background:
        return subprocess.Popen(cmd, **kw)
    return subprocess.run(cmd, timeout=600, **kw)


def _train_records(run):
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.mark.slow
def test_signal_to_one_rank_stops_both_with_a_checkpoint_and_the_rerun_is_bit_identical(tmp_path):
    import signal
    import time

    from fdfast import checkpoint as ckpt
    settings = dict(data={"synthetic_size": 128}, checkpoint={"every": 100}, log={"every": 1})
    full, stopped = _run_cfg(tmp_path, "full", **settings), _run_cfg(tmp_path, "stopped", **settings)
    r = _launch(tmp_path, full, 2)
    assert r.returncode == 0, r.stdout[-3000:]
    proc = _launch(tmp_path, stopped, 2, background=True)
    metrics, deadline = tmp_path / "stopped" / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 4):
        time.sleep(0.05)
    os.kill(int((tmp_path / "pid_rank1").read_text()), signal.SIGUSR1)  # one rank only: both must agree
    out, _ = proc.communicate(timeout=300)
    # the first rank to exit 4 makes torchrun stop the other; the checkpoint is complete by then (the
    # save is collective and both ranks leave it only after rank 0 has published the folder)
    assert proc.returncode != 0 and "stopped by signal" in out, out[-3000:]
    saved = ckpt.find_latest(tmp_path / "stopped")
    assert saved is not None and 4 <= int(saved.name[5:]) < 16
    assert ckpt.read_meta(saved)["world_size"] == 2 and (saved / "rng_rank1.pt").exists()
    r = _launch(tmp_path, stopped, 2)
    assert r.returncode == 0, r.stdout[-3000:]
    assert _train_records(tmp_path / "stopped") == _train_records(tmp_path / "full")
    a = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "full"))[0]["model"]
    b = ckpt.load_checkpoint(ckpt.find_latest(tmp_path / "stopped"))[0]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("before, after", [(1, 2), (2, 1)])
def test_resume_on_a_different_number_of_processes_continues_at_the_same_image(tmp_path, before, after):
    """64 images of 8 per rank: 1 rank = 8 steps per epoch, 2 ranks = 4. Stopping after 32 images and
    resuming on the other world size must continue at image 32 of the epoch, never at step 0."""
    from fdfast import checkpoint as ckpt
    stop_step = 32 // (8 * before)
    first = _run_cfg(tmp_path, "run", data={"synthetic_size": 64}, train={"max_steps": stop_step})
    r = _launch(tmp_path, first, before)
    assert r.returncode == 0, r.stdout[-3000:]
    second = _run_cfg(tmp_path, "run", data={"synthetic_size": 64})
    r = _launch(tmp_path, second, after)
    assert r.returncode == 0, r.stdout[-3000:]
    resumed_at = 32 // (8 * after)
    assert f"at step {resumed_at} (epoch 0)" in r.stdout and "images per step" in r.stdout
    final = ckpt.find_latest(tmp_path / "run")
    spe = 64 // (8 * after)
    assert int(final.name[5:]) == 2 * spe and ckpt.read_meta(final)["world_size"] == after
    marker = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"resume"' in x]
    assert marker == [{"kind": "resume", "step": resumed_at, "from_step": stop_step, "world_size": after,
                       "total_batch": 8 * after}]
