"""torchrun environment -> rank / world / device; the collectives the loop waits on; a lost peer as one
line; an orderly shutdown. No-ops when not distributed."""
from __future__ import annotations

import gc
import os
import re
import socket
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

# (host, pid) of every rank, gathered once at start: a survivor of a lost peer can then say which one it was
_PROCESSES: list[tuple[str, int]] = []
# set once a peer is lost: the group can no longer meet, so shutdown() must not wait for it
_BROKEN = False


class LostRank(RuntimeError):
    """Another process of the job died (killed, crashed): the collective this rank waited in failed."""


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Read RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun); NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=30),
                                device_id=dev if use_cuda else None)
        _PROCESSES[:] = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(_PROCESSES, (socket.gethostname(), os.getpid()))
    return DistInfo(rank, local, world, dev)


def collective_device() -> torch.device:
    """Where small tensors for collectives must live: the current CUDA device under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s small picklable ``obj`` on every rank (``obj`` itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=collective_device())
    return box[0]


def max_rank(value: int) -> int:
    """The largest of every rank's ``value`` (a collective: every rank must call it)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.int64, device=collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective: every rank must call it)."""
    return bool(max_rank(1 if flag else 0))


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / dist.get_world_size()
    return t


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``t`` (dim 0), concatenated in rank order on every rank; ranks may hold different
    numbers of rows (each is padded to the longest for the collective, and the padding is cut off again)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64, device=t.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([t.shape[0]], dtype=torch.int64, device=t.device))
    sizes = [int(c) for c in counts]
    padded = t.new_zeros((max(sizes), *t.shape[1:]))
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def is_lost_peer(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because a peer is gone: gloo raises a RuntimeError
    from its transport ("Connection closed by peer"), NCCL a DistError."""
    return (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
            and (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in str(error))))


def _gone(pid: int) -> bool:
    try:  # a killed process stays a zombie until its launcher reaps it
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            pass
        return False


def lost_rank(error: BaseException, where: str, wait_s: float = 3.0) -> LostRank:
    """A :class:`LostRank` naming the peer this rank lost (``error`` = the failed collective): a rank on this
    host whose process is gone (waiting ``wait_s`` for it to end), else the other rank of two."""
    global _BROKEN
    _BROKEN = True
    rank, world, host = dist.get_rank(), dist.get_world_size(), socket.gethostname()
    lost: list[int] = []
    deadline = time.monotonic() + wait_s
    while not lost and time.monotonic() < deadline:
        lost = [r for r, (h, pid) in enumerate(_PROCESSES) if r != rank and h == host and _gone(pid)]
        if not lost:
            time.sleep(0.1)
    if not lost and world == 2:
        lost = [1 - rank]
    if lost:
        who = ", ".join(f"rank {r} (process {_PROCESSES[r][1]} on {_PROCESSES[r][0]})" if _PROCESSES else
                        f"rank {r}" for r in lost)
        what = f"lost {who}"
    else:
        first = re.sub(r"^\[[^\]]*\]\s*", "", str(error)).split(". ")[0].strip()  # gloo: "[file:line] what. ..."
        what = f"lost another rank ({first or type(error).__name__})"
    return LostRank(f"rank {rank} of {world} {what} {where}; the job cannot continue without it. Its launcher's "
                    "log says why it ended; rerun the same command to resume from the last checkpoint")


def shutdown(wait: bool = True) -> None:
    """Leave the process group in order: free what still holds it (the DDP wrappers' reducers, kept alive by
    reference cycles), wait until every rank is done with it, then destroy it. A DDP reducer freed after the
    group (at interpreter exit) can abort the process ("terminate called without an active exception").
    ``wait=False`` (a rank that fails alone: the others may never come) and a lost peer skip the barrier."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        if wait and not _BROKEN:
            dist.barrier()
        dist.destroy_process_group()
