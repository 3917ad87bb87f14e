"""What keeps a run and its checkpoints trustworthy: integrity, finiteness, one run per folder, config
drift, clean stops on signals, failed writes (single process; the two-rank cases are in test_distributed)."""
import errno
import json
import os
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
from fdfast.guard import EXIT_PREEMPTED, RunLock
from fdfast.resume import ConfigDrift, map_position
from fdfast.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def _cli(cfg_file, *extra, timeout=600):
    return subprocess.run([sys.executable, "-m", "fdfast.cli.train", "--config", str(cfg_file), *extra],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=timeout)


def _write_cfg(tmp_path, name="run", **sections) -> Path:
    d = tiny_dict(tmp_path, **sections)
    d["train"]["output_dir"] = str(tmp_path / name)
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "kind" not in r]  # training records; eval / resume / preempted records have a kind


def _final_weights(out):
    return ckpt.load_checkpoint(ckpt.find_latest(out))[0]["model"]


# ----------------------------------------------------------------------------------------------
# integrity
# ----------------------------------------------------------------------------------------------
def test_bit_flip_in_the_newest_checkpoint_is_skipped_with_a_warning(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 4}, checkpoint={"every": 2, "keep": 5}))
    state = ckpt.ckpt_root(out) / "step_00000004" / "state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size, one bit: loads fine, garbage weights, exit 0 before
    state.write_bytes(bytes(data))
    assert "SHA-256" in ckpt.verify(state.parent)
    capsys.readouterr()
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 6}, checkpoint={"every": 2, "keep": 5}))
    log = capsys.readouterr().out
    assert "skipping checkpoint" in log and "step_00000004" in log and "SHA-256" in log
    assert "resumed from" in log and "step_00000002 at step 2" in log


def test_checkpoint_that_verifies_but_does_not_load_is_skipped(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 4}, checkpoint={"every": 2, "keep": 5}))
    folder = ckpt.ckpt_root(out) / "step_00000004"
    (folder / "state.pt").write_bytes(b"PK\x03\x04 not a zip at all")  # a broken zip with a matching hash
    meta = ckpt.read_meta(folder)
    meta["files"]["state.pt"] = {"size": (folder / "state.pt").stat().st_size,
                                 "sha256": ckpt.file_sha256(folder / "state.pt")}
    (folder / "meta.json").write_text(json.dumps(meta))
    assert ckpt.verify(folder) is None
    capsys.readouterr()
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 6}, checkpoint={"every": 2, "keep": 5}))
    log = capsys.readouterr().out
    assert "skipping checkpoint" in log and "cannot read checkpoint" in log and "step_00000002 at step 2" in log


def test_a_folder_whose_only_checkpoints_are_damaged_is_refused_not_restarted(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 2}))
    state = ckpt.find_latest(out) / "state.pt"
    data = bytearray(state.read_bytes())
    data[-100] ^= 1
    state.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointLoadError, match=r"step_00000002: state\.pt does not match its SHA-256.*"
                                                       r"train\.resume=false"):
        train(tiny_cfg(train={"output_dir": str(out), "max_steps": 4}))
    assert train(tiny_cfg(train={"output_dir": str(out), "max_steps": 2, "resume": False}))["step"] == 2


def test_non_finite_state_is_never_written(tmp_path):
    with pytest.raises(ckpt.NonFiniteState, match=r"model\.w"):
        ckpt.save_checkpoint(tmp_path, 3, {"model": {"w": torch.tensor([1.0, float("nan")])}})
    assert not ckpt.list_checkpoints(tmp_path) and not list(ckpt.ckpt_root(tmp_path).glob("*"))


def test_an_infinite_gradient_is_skipped_and_nothing_non_finite_is_saved(tiny_cfg, tmp_path, monkeypatch):
    """A finite loss whose gradient is Inf (before: NaN weights saved as the newest checkpoint)."""
    import fdfast.tasks.distill as distill

    class InfGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            return g * float("inf")

    real, calls = distill.fd_loss, {"n": 0}

    def spiking(pred, target, beta=2.0):
        calls["n"] += 1
        loss = real(pred, target, beta)
        return InfGrad.apply(loss) if calls["n"] == 3 else loss

    monkeypatch.setattr(distill, "fd_loss", spiking)
    out = tmp_path / "run"
    summary = train(tiny_cfg(train={"output_dir": str(out), "max_steps": 6}, checkpoint={"every": 2, "keep": 5}))
    assert summary["step"] == 6 and summary["skipped_steps"] == 1
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in recs] == [0, 0, 1, 1, 1, 1]
    for _, path in ckpt.list_checkpoints(out):
        state, _ = ckpt.load_checkpoint(path)
        assert not ckpt._non_finite_keys(state), path


# ----------------------------------------------------------------------------------------------
# one run per folder, failed writes
# ----------------------------------------------------------------------------------------------
def test_a_second_run_on_a_locked_folder_exits_2_naming_the_holder(tmp_path):
    cfg = _write_cfg(tmp_path, train={"max_steps": 2})
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        r = _cli(cfg)
        assert r.returncode == 2 and f"PID {os.getpid()}" in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "run" / "metrics.jsonl").exists()
    finally:
        lock.release()
    assert _cli(cfg).returncode == 0  # released (and a dead holder's lock goes with its process)


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_nothing_half_written(tiny_cfg, tmp_path,
                                                                                   monkeypatch):
    out = tmp_path / "run"
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 2}, checkpoint={"every": 2}))
    real = ckpt._save_hashed

    def full(path, obj):
        if path.name == "state.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, obj)

    monkeypatch.setattr(ckpt, "_save_hashed", full)
    with pytest.raises(ckpt.CheckpointWriteError, match=r"no space left on .*checkpoints"):
        train(tiny_cfg(train={"output_dir": str(out), "max_steps": 4}, checkpoint={"every": 2}))
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2] and ckpt.verify(ckpt.find_latest(out)) is None
    assert not list(ckpt.ckpt_root(out).glob(".tmp_*"))


class _FillsUp:
    """A file whose disk fills up after ``room`` bytes: ``write`` raises ENOSPC as a real full disk does."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        self.room -= len(data)
        if self.room < 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("how", ["full_disk_in_the_zip_writer", "zip_writer_error_alone"])
def test_every_write_failure_of_a_checkpoint_is_one_line(how, tiny_cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 2}, checkpoint={"every": 2}))
    if how == "full_disk_in_the_zip_writer":  # the real torch.save, whose writer turns ENOSPC into a RuntimeError
        monkeypatch.setattr(ckpt, "open", lambda path, mode="r", *a, **k: _FillsUp(open(path, mode, *a, **k), 4096)
                            if Path(path).name == "state.pt" and "w" in mode else open(path, mode, *a, **k),
                            raising=False)
        expected = r"no space left on .*checkpoints while writing checkpoint step 4"
    else:
        def broken(obj, f):
            f.write(b"PK")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        monkeypatch.setattr(ckpt.torch, "save", broken)
        expected = r"cannot write checkpoint step 4 into .*checkpoints \(the file was not written completely"
    with pytest.raises(ckpt.CheckpointWriteError, match=expected) as err:
        train(tiny_cfg(train={"output_dir": str(out), "max_steps": 4}, checkpoint={"every": 2}))
    assert "\n" not in str(err.value) and err.value.__suppress_context__
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2] and ckpt.verify(ckpt.find_latest(out)) is None
    assert not list(ckpt.ckpt_root(out).glob(".tmp_*"))  # no half-written folder


def test_unwritable_output_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    cfg = _write_cfg(tmp_path)
    d = yaml.safe_load(cfg.read_text())
    d["train"]["output_dir"] = str(tmp_path / "file" / "run")
    cfg.write_text(yaml.safe_dump(d))
    r = _cli(cfg)
    assert r.returncode == 2 and "is not writable" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_half_precision_on_a_cpu_is_one_line(tmp_path, precision):
    r = _cli(_write_cfg(tmp_path), "--set", f"train.precision={precision}")
    assert r.returncode == 2 and f"train.precision='{precision}' needs a CUDA device" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "run").exists()  # no lock file, no folder left


def test_a_refused_run_leaves_the_output_folder_as_it_found_it(tmp_path, capsys, monkeypatch):
    import fdfast.trainer as trainer_module
    from fdfast.cli import train as train_cli

    def refuse(*args, **kwargs):  # refused as the loop starts: config.yaml and tensorboard/ exist by then
        assert (out / "config.yaml").exists() and (out / "tensorboard").exists()
        raise ckpt.CheckpointLoadError("refused for the test")

    monkeypatch.setattr(trainer_module, "Progress", refuse)
    cases = {"absent": tmp_path / "a" / "b" / "run", "empty": tmp_path / "empty", "used": tmp_path / "used"}
    cases["empty"].mkdir()
    cases["used"].mkdir()
    (cases["used"] / "notes.txt").write_text("the user's")
    for name, out in cases.items():
        cfg = _write_cfg(tmp_path, name, log={"tensorboard": True}, train={"max_steps": 2})
        d = yaml.safe_load(cfg.read_text())
        d["train"]["output_dir"] = str(out)
        cfg.write_text(yaml.safe_dump(d))
        assert train_cli.main(["--config", str(cfg)]) == 2
        assert "refused for the test" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert list(cases["empty"].iterdir()) == []
    assert sorted(p.name for p in cases["used"].iterdir()) == ["notes.txt"]  # what the run added is gone



def test_an_unreadable_checkpoint_folder_is_one_line(tiny_cfg, tmp_path, monkeypatch):
    out = tmp_path / "run"
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 2}))
    real = Path.iterdir

    def denied(self):
        if self == ckpt.ckpt_root(out):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", denied)  # tests run as root, where chmod does not stop a read
    with pytest.raises(ckpt.CheckpointLoadError, match=r"cannot list .*checkpoints \(Permission denied\)"):
        train(tiny_cfg(train={"output_dir": str(out), "max_steps": 4}))


# ----------------------------------------------------------------------------------------------
# config drift
# ----------------------------------------------------------------------------------------------
def test_a_changed_config_is_refused_with_a_diff_unless_allowed(tiny_cfg, tmp_path, capsys):
    out = tmp_path / "run"
    base = {"output_dir": str(out), "max_steps": 2}
    train(tiny_cfg(train=base))
    first = (out / "config.yaml").read_text()
    with pytest.raises(ConfigDrift, match=r"optim\.base_lr: 0\.001 -> 0\.002"):
        train(tiny_cfg(train={**base, "max_steps": 4}, optim={"base_lr": 2e-3}))
    with pytest.raises(ConfigDrift, match=r"model\.student\.depth: 2 -> 3"):  # before: a state-dict traceback
        train(tiny_cfg(train={**base, "max_steps": 4}, model={"student": {"depth": 3}}))
    assert (out / "config.yaml").read_text() == first, "config.yaml was overwritten before the check"
    capsys.readouterr()
    summary = train(tiny_cfg(train={**base, "max_steps": 4}, log={"every": 2}))  # harmless: allowed, logged
    assert summary["step"] == 4
    log = capsys.readouterr().out
    assert "train.max_steps: 2 -> 4" in log and "log.every: 1 -> 2" in log
    kept = sorted(out.glob("config.*.yaml"))
    assert len(kept) == 1 and kept[0].read_text() == first
    summary = train(tiny_cfg(train={**base, "max_steps": 6}, optim={"base_lr": 2e-3}), allow_config_change=True)
    assert summary["step"] == 6 and "optim.base_lr: 0.001 -> 0.002" in capsys.readouterr().out


def test_allow_config_change_never_turns_a_checkpoint_into_another_network(tiny_cfg, tmp_path):
    out = tmp_path / "run"
    base = {"output_dir": str(out), "max_steps": 2}
    train(tiny_cfg(train=base))
    for change, expected in (({"model": {"student": {"depth": 3}}}, r"architecture .*model\.student\.depth: 2 -> 3"),
                             ({"model": {"student": {"embed_dim": 64}}}, r"model\.student\.embed_dim: 32 -> 64"),
                             ({"optim": {"layer_decay": 0.75}}, r"parameter groups \(\d+\) differ")):
        with pytest.raises(ConfigDrift, match=expected) as err:
            train(tiny_cfg(train={**base, "max_steps": 4}, **change), allow_config_change=True)
        assert "\n" not in str(err.value) and "start a new train.output_dir" in str(err.value)
    assert [s for s, _ in ckpt.list_checkpoints(out)] == [2]


def test_config_drift_through_the_cli_exits_2(tmp_path):
    cfg = _write_cfg(tmp_path, train={"max_steps": 2})
    assert _cli(cfg).returncode == 0
    r = _cli(cfg, "--set", "optim.weight_decay=0.1", "--set", "train.max_steps=4")
    assert r.returncode == 2 and "optim.weight_decay: 0.05 -> 0.1" in r.stderr and "--allow-config-change" in r.stderr
    assert "Traceback" not in r.stderr
    assert _cli(cfg, "--set", "optim.weight_decay=0.1", "--set", "train.max_steps=4",
                "--allow-config-change").returncode == 0


# ----------------------------------------------------------------------------------------------
# named checkpoints and world-size changes (the position arithmetic; the torchrun runs are elsewhere)
# ----------------------------------------------------------------------------------------------
def test_resume_from_a_named_checkpoint_starts_a_new_folder_from_it(tiny_cfg, tmp_path, capsys):
    src = tmp_path / "src"
    train(tiny_cfg(train={"output_dir": str(src), "max_steps": 4}, checkpoint={"every": 2, "keep": 5}))
    named = ckpt.ckpt_root(src) / "step_00000002"
    out = tmp_path / "branch"
    capsys.readouterr()
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 3, "resume": str(named)}))
    assert f"resumed from {named} at step 2" in capsys.readouterr().out
    # once the branch has checkpoints of its own, a rerun continues from them, not from the named one
    train(tiny_cfg(train={"output_dir": str(out), "max_steps": 4, "resume": str(named)}))
    assert f"resumed from {ckpt.ckpt_root(out) / 'step_00000003'} at step 3" in capsys.readouterr().out
    with pytest.raises(ckpt.CheckpointLoadError, match="does not exist"):
        train(tiny_cfg(train={"output_dir": str(tmp_path / "x"), "resume": str(tmp_path / "nope")}))


@pytest.mark.parametrize("old, new, expect", [
    ((5, 10, 16), (20, 8), (10, True)),    # 1 -> 2 ranks: 80 images in = step 10 of 8
    ((13, 10, 16), (20, 8), (26, True)),   # epoch 1, step 3 of the epoch
    ((5, 20, 8), (10, 16), (2, False)),    # 40 images = 2.5 steps of 16: 8 images seen twice
])
def test_data_position_is_counted_in_images_across_world_sizes(old, new, expect):
    step, spe, total = old
    pos = map_position({"step": step, "steps_per_epoch": spe, "total_batch": total}, *new)
    assert (pos.step, pos.exact) == expect and (pos.note != "")


# ----------------------------------------------------------------------------------------------
# signals
# ----------------------------------------------------------------------------------------------
def test_a_run_with_loader_workers_exits_cleanly(tmp_path, image_folder):
    """The workers ignore stop signals only while the trainer handles them: at exit, when the
    interpreter terminates them, they leave quietly (no hang, no 'worker killed' report)."""
    cfg = _write_cfg(tmp_path, data={"backend": "torchvision", "train": str(image_folder), "num_workers": 2},
                     train={"max_steps": 3})
    r = _cli(cfg, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Exception ignored" not in r.stderr


def _wait_for_lines(path: Path, n: int, proc, timeout=300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig, backend, group", [(signal.SIGTERM, "synthetic", False),
                                                (signal.SIGINT, "torchvision", True),
                                                (signal.SIGTERM, "torchvision", True)])
def test_signal_writes_a_checkpoint_exits_4_and_the_rerun_is_bit_identical(tmp_path, image_folder, sig, backend,
                                                                            group):
    """A signal to the trainer, or to its whole process group as Ctrl-C and a job scheduler send it,
    DataLoader workers included (they must leave the stop to the trainer)."""
    data = {"synthetic_size": 96} if backend == "synthetic" else {"backend": backend, "train": str(image_folder),
                                                                  "num_workers": 2}
    settings = dict(data=data, train={"epochs": 2}, checkpoint={"every": 100}, log={"every": 1})
    full, stopped = _write_cfg(tmp_path, "full", **settings), _write_cfg(tmp_path, "stopped", **settings)
    assert _cli(full).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "fdfast.cli.train", "--config", str(stopped)], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _wait_for_lines(tmp_path / "stopped" / "metrics.jsonl", 5, proc)
    if group:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert "stopped by signal" in err and "Traceback" not in err
    last = len(_losses(tmp_path / "full"))
    saved = ckpt.find_latest(tmp_path / "stopped")
    assert saved is not None and 5 <= int(saved.name[5:]) < last  # the step it stopped at, not a periodic one
    assert _cli(stopped).returncode == 0
    assert _losses(tmp_path / "stopped") == _losses(tmp_path / "full")
    a, b = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a)
