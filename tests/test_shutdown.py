"""Leaving the process group in order: a DDP wrapper's reducer holds the group, and one freed after the group
is destroyed (at interpreter exit) can abort the process ("terminate called without an active exception").
``fdfast.distributed.shutdown`` frees such garbage, waits at a barrier, then destroys the group."""
from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fdfast import distributed


def _live_ddp() -> int:
    return sum(type(o) is DistributedDataParallel for o in gc.get_objects())


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.mark.parametrize("wait", [True, False])
def test_ddp_garbage_is_freed_and_ranks_meet_before_the_group_goes(group, monkeypatch, wait):
    calls = []
    barrier, destroy = dist.barrier, dist.destroy_process_group
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: (calls.append("barrier"), barrier(*a, **k))[1])
    monkeypatch.setattr(dist, "destroy_process_group",
                        lambda *a, **k: (calls.append(("destroy", _live_ddp())), destroy(*a, **k))[1])
    gc.disable()  # as between two automatic collections
    try:
        model = DistributedDataParallel(torch.nn.Linear(4, 2))
        model(torch.randn(3, 4)).sum().backward()
        holder = {"model": model}
        holder["self"] = holder  # a reference cycle, as trainers, tasks and hooks make
        del model, holder
        assert _live_ddp() == 1
        distributed.shutdown() if wait else distributed.shutdown(wait=False)
    finally:
        gc.enable()
    assert calls == (["barrier"] if wait else []) + [("destroy", 0)]
    assert not dist.is_initialized()


def test_a_lost_peer_is_named_by_its_process_on_this_host(monkeypatch):
    import os
    import socket
    import subprocess

    ended = subprocess.Popen(["true"])
    ended.wait()
    host = socket.gethostname()
    monkeypatch.setattr(distributed, "_BROKEN", False)
    monkeypatch.setattr(distributed, "_PROCESSES", [(host, ended.pid), (host, os.getpid()), ("node9", 1)])
    monkeypatch.setattr(dist, "get_rank", lambda *a: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 3)
    gloo = RuntimeError("[third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[10.0.0.9]:47269. This is typically caused by a remote worker crashing.")
    e = distributed.lost_rank(gloo, "after step 5", wait_s=0.2)
    assert str(e).startswith(f"rank 1 of 3 lost rank 0 (process {ended.pid} on {host}) after step 5; ")
    assert distributed._BROKEN  # the shutdown that follows must not wait at a barrier
    # nobody gone on this host, three ranks: the transport's own words stand in for the name
    monkeypatch.setattr(distributed, "_PROCESSES", [(host, os.getpid())] * 2 + [("node9", 1)])
    e = distributed.lost_rank(gloo, "after step 5", wait_s=0.2)
    assert "lost another rank (Connection closed by peer [10.0.0.9]:47269) after step 5" in str(e)


SURVIVOR = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from conftest import tiny_dict
    from fdfast import trainer
    from fdfast.config import config_from_dict
    from fdfast.distributed import LostRank

    def lost_rank(error, where, wait_s=3.0):  # the launcher's SIGTERM arrives while the lost peer is looked for
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        return LostRank("rank 1 of 2 lost rank 0 " + where)

    def failed_collective(stop):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:561] Connection closed by peer [10.0.0.9]:47269")

    trainer.is_lost_peer, trainer.lost_rank = (lambda e: True), lost_rank
    t = trainer.Trainer(config_from_dict(tiny_dict(Path(sys.argv[1]))))
    t._fit = failed_collective
    try:
        t.fit()
    except LostRank as e:
        print("survived:", e)
""")


def test_the_launchers_sigterm_does_not_end_a_survivor_before_its_line(tmp_path):
    """torchrun sends the survivors SIGTERM as soon as it sees a worker die, which can be while a survivor
    waits to name the lost rank: the stop-signal handling must still be in place then."""
    script = tmp_path / "survivor.py"
    script.write_text(SURVIVOR.format(tests=str(Path(__file__).parent)))
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).parents[1])
    assert r.returncode == 0 and "survived: rank 1 of 2 lost rank 0 after step 0" in r.stdout, r.stderr[-2000:]
