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
    # torchrun exits 1 for a worker's 4 as for any failure: summary.json tells a scheduler it was a preemption
    assert proc.returncode == 1 and "stopped by signal SIGUSR1" in out, out[-3000:]
    saved = ckpt.find_latest(tmp_path / "stopped")
    assert saved is not None and 4 <= int(saved.name[5:]) < 16
    summary = json.loads((tmp_path / "stopped" / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["preempted"] == {
        "step": int(saved.name[5:]), "images": 16 * int(saved.name[5:]), "signal": "SIGUSR1",
        "checkpoint": str(saved)}  # rank 0 records the signal that reached rank 1
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
    # metrics.jsonl's step goes on from the checkpoint's; run_step is the step in the new numbering
    assert marker == [{"kind": "resume", "step": stop_step, "run_step": resumed_at, "from_step": stop_step,
                       "images": 32, "world_size": after, "total_batch": 8 * after}]
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "kind" not in r]
    assert steps == list(range(1, stop_step + 1 + 2 * spe - resumed_at))


# fdfast-train itself (the command-line face) under torchrun. Rank 0 kills itself with SIGKILL right after
# logging the step named by FDFAST_TEST_KILL_AT, as a node failure or an OOM killer would. When the process
# group is destroyed, each rank writes down how many DDP wrappers are still alive (their reducers hold the
# group: one freed after it can abort the process at exit) and whether a barrier came first.
CLI_WORKER = textwrap.dedent("""
    import gc, json, os, signal, sys, torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from fdfast import tracking
    torch.set_num_threads(1)
    rank, kill_at = int(os.environ.get("RANK", "0")), int(os.environ.get("FDFAST_TEST_KILL_AT", "0"))
    log = tracking.Tracker.log
    def log_then_die(self, record):
        log(self, record)
        if kill_at and rank == 0 and "kind" not in record and record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    tracking.Tracker.log = log_then_die
    barriers, barrier, destroy = [], dist.barrier, dist.destroy_process_group
    def counted_barrier(*a, **k):
        barriers.append(1)
        return barrier(*a, **k)
    def checked_destroy(*a, **k):
        live = sum(type(o) is DistributedDataParallel for o in gc.get_objects())
        with open(os.path.join(os.environ["FDFAST_TEST_SHUTDOWN_DIR"], f"shutdown_rank{rank}.json"), "w") as f:
            json.dump({"live_ddp": live, "barriers": len(barriers)}, f)
        return destroy(*a, **k)
    dist.barrier, dist.destroy_process_group = counted_barrier, checked_destroy
    from fdfast.cli.train import main
    sys.exit(main(["--config", sys.argv[1]]))
""")


def _shutdown_checks(tmp_path) -> list[dict]:
    return [json.loads((tmp_path / f"shutdown_rank{r}.json").read_text()) for r in range(2)]


def _cli_run(tmp_path, cfg_file, nproc, kill_at=0):
    script = tmp_path / "cli_worker.py"
    script.write_text(CLI_WORKER)
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
           if nproc > 1 else [sys.executable]) + [str(script), str(cfg_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FDFAST_TEST_KILL_AT": str(kill_at),
           "FDFAST_TEST_SHUTDOWN_DIR": str(tmp_path)}
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=600)


def _yaml_cfg(tmp_path, name, out, **sections) -> Path:
    import yaml
    from conftest import tiny_dict
    d = tiny_dict(tmp_path, **sections)
    d["train"]["output_dir"] = str(out)
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_one_then_two_processes_killed_and_rerun_never_goes_back(tmp_path):
    """1 process to step 12 (image 96; checkpoints at 8 and 12) -> 2 processes resume at their step 6 and write
    their step 8 (image 128) -> rank 0 is killed two steps later -> the rerun continues from image 128 (not
    from the 1-process step 12, which has the higher step number) and ends where a 1 -> 2 run without the
    kill ends: same images, same logged losses, same weights."""
    import shutil

    from fdfast import checkpoint as ckpt
    run, ref = tmp_path / "run", tmp_path / "ref"
    settings = dict(data={"synthetic_size": 128}, checkpoint={"every": 4, "keep": 2}, log={"every": 1})
    r = _cli_run(tmp_path, _yaml_cfg(tmp_path, "first", run, train={"max_steps": 12}, **settings), 1)
    assert r.returncode == 0, r.stdout[-3000:]
    shutil.copytree(run, ref)
    r = _cli_run(tmp_path, _yaml_cfg(tmp_path, "ref", ref, **settings), 2)
    assert r.returncode == 0, r.stdout[-3000:]
    # the DDP wrappers are gone and every rank is past a barrier before the group is destroyed
    assert [(c["live_ddp"], c["barriers"] >= 1) for c in _shutdown_checks(tmp_path)] == [(0, True)] * 2

    cfg = _yaml_cfg(tmp_path, "run", run, **settings)
    r = _cli_run(tmp_path, cfg, 2, kill_at=16)  # metrics step 16 = 2-process step 10
    assert r.returncode != 0
    # the survivor says in one line which rank it lost, instead of gloo's traceback
    lost = [x for x in r.stdout.splitlines() if x.startswith("fdfast-train: rank 1 of 2 lost rank 0")]
    assert len(lost) == 1 and "Connection closed by peer" not in r.stdout, r.stdout[-3000:]
    metas = {p.name: ckpt.read_meta(p) for _, p in ckpt.list_checkpoints(run)}
    newest = max(metas, key=lambda n: metas[n]["images"])
    assert metas[newest]["images"] == 128 and metas[newest]["world_size"] == 2
    assert any(m["world_size"] == 1 and m["step"] == 12 for m in metas.values())  # the higher step is still there

    r = _cli_run(tmp_path, cfg, 2)
    assert r.returncode == 0, r.stdout[-3000:]
    assert f"resumed from {ckpt.ckpt_root(run) / newest} at step 8" in r.stdout
    summary, expected = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    assert summary["status"] == expected["status"] == "finished"
    assert summary["images"] == expected["images"] == 256 and summary["step"] == expected["step"] == 16
    train_records = [(x["step"], x["images"], x["loss"]) for x in _records(run) if "kind" not in x]
    assert train_records == [(x["step"], x["images"], x["loss"]) for x in _records(ref) if "kind" not in x]
    assert [s for s, _, _ in train_records] == list(range(1, 12 + 10 + 1))  # no step twice, none out of order
    a = ckpt.load_checkpoint(ckpt.find_latest(run))[0]["model"]
    b = ckpt.load_checkpoint(ckpt.find_latest(ref))[0]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_preemption_under_torchrun_is_recorded_and_the_slurm_recipe_requeues(tmp_path):
    """scripts/slurm_requeue.sh as the README's SLURM recipe runs it: SIGUSR1 to the batch shell -> SIGTERM to
    torchrun -> to the workers -> checkpoint, "preempted" records, torchrun exits 1 -> scontrol requeue. A
    failure, or a preempted record left by an earlier attempt, is not requeued."""
    import signal
    import time

    from fdfast import checkpoint as ckpt
    run = tmp_path / "run"
    cfg = _yaml_cfg(tmp_path, "run", run, data={"synthetic_size": 256}, checkpoint={"every": 100},
                    log={"every": 1})
    script = tmp_path / "cli_worker.py"
    script.write_text(CLI_WORKER)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol_calls"
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_JOB_ID": "4242", "FDFAST_TEST_SHUTDOWN_DIR": str(tmp_path),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    wrapper = [str(ROOT / "scripts" / "slurm_requeue.sh"), str(run)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(script), str(cfg)]

    def launch(cmd, **kw):
        return subprocess.Popen(wrapper + cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, **kw)

    proc = launch(torchrun)
    metrics, deadline = run / "metrics.jsonl", time.time() + 300
    while time.time() < deadline and proc.poll() is None and (
            not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` sends
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"{sys.executable} exited 1 and" in out  # torchrun itself failed (exit 1) ...
    assert calls.read_text() == "requeue 4242\n"  # ... and the job was requeued all the same
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "preempted", summary
    p = summary["preempted"]
    assert 3 <= p["step"] < 32 and p["images"] == 16 * p["step"] and p["signal"] == "SIGTERM"
    assert ckpt.verify(p["checkpoint"]) is None and ckpt.read_meta(p["checkpoint"])["step"] == p["step"]
    assert [c["live_ddp"] for c in _shutdown_checks(tmp_path)] == [0, 0]  # also when leaving by an exception
    marks = [x for x in _records(run) if x.get("kind") == "preempted"]
    assert [(m["step"], m["images"], m["signal"], m["checkpoint"]) for m in marks] == [
        (p["step"], p["images"], "SIGTERM", p["checkpoint"])]

    # a failing command with the earlier attempt's preempted record still there: not requeued
    failed = launch(["false"])
    failed.communicate(timeout=60)
    assert failed.returncode == 1 and calls.read_text() == "requeue 4242\n"

    # the requeued job: resumes, finishes, is not requeued again
    proc = launch(torchrun)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and calls.read_text() == "requeue 4242\n", out[-3000:]
    assert json.loads((run / "summary.json").read_text())["status"] == "finished"
    steps = [x["step"] for x in _records(run) if "kind" not in x]
    assert steps == list(range(1, 33)) and [x.get("kind") for x in _records(run)].count("preempted") == 1
