"""Leaving the process group in order: a DDP wrapper's reducer holds the group, and one freed after the group
is destroyed (at interpreter exit) can abort the process ("terminate called without an active exception").
``fdfast.distributed.shutdown`` frees such garbage, waits at a barrier, then destroys the group."""
from __future__ import annotations

import gc

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
