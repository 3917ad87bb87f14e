"""The teacher target: uint8 pixels -> whitened teacher tokens, and its CUDA-graph replay.

:class:`TeacherTarget` is the maths (teacher normalisation, optional resize, frozen teacher, non-affine
LayerNorm); :class:`GraphedTarget` replays any such function from a CUDA graph per input shape.
``fdfast.tasks.distill.build_target`` decides which of them (compiled or not) a run uses.

Why a manual CUDA graph around a compiled function instead of ``torch.compile(mode="reduce-overhead")``:

1. it works the same around the eager and the compiled teacher, so the benchmark can isolate what
   the graph buys from what compilation buys;
2. the output-lifetime contract is explicit (one static output buffer per captured shape, valid
   until the next replay of that shape) instead of cudagraph-trees' implicit rules, which require
   ``cudagraph_mark_step_begin`` calls and interact with the separately compiled student;
3. it fails loudly: reduce-overhead silently skips graphing on CPU tensors, mutated inputs or
   dynamic shapes, which would make a benchmark number mean something else than its label.
"""
from __future__ import annotations

import collections
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..objective import pixel_constants, whiten
from .phi_s import PhiS
from .token_rules import TargetPlan


class TeacherTarget(nn.Module):
    """uint8 pixels -> whitened teacher tokens (float32). Frozen, no grad, no state of its own.

    The target of one teacher, self-contained: the teacher's own normalisation (CLIP's, ImageNet's, SigLIP's
    0.5 / 0.5 ...) applied here, on the device, to the same uint8 pixels the student sees; the resize of the
    batch to the teacher's input size (the official code's bilinear, no antialias: CLIP L/14 at 224 under a
    256 px student, a patch-14 teacher at 196 under a 224 px patch-16 student); the frozen teacher; its
    :class:`~.token_rules.TargetPlan` (``plan``, default: the teacher's own, see :class:`~.teachers.Teacher`),
    which picks the target tokens (registers dropped, the patch map resized to the student's grid ...); and
    FD's whitening, or ``phi_s`` (:class:`~.phi_s.PhiS`, one teacher of several). :meth:`student_tokens` picks
    the student tokens that face this target.
    """

    def __init__(self, teacher: nn.Module, eps: float = 1e-5, plan: Optional[TargetPlan] = None, *,
                 phi_s: Optional[PhiS] = None):
        super().__init__()
        self.teacher = teacher
        self.eps = float(eps)
        self.plan: TargetPlan = plan or teacher.plan
        self.phi_s = phi_s  # PHI-S instead of FD's whitening (several teachers, ``whiten: phi_s``)
        self.img_size = int(self.plan.input_size)
        # Buffers (not Python lists) so that they follow .to(), exist before a CUDA-graph capture and
        # are graph inputs, not host->device copies, when compiled.
        p = next(teacher.parameters(), None)
        m, s = pixel_constants(tuple(teacher.mean), tuple(teacher.std),
                               p.device if p is not None else torch.device("cpu"))
        self.register_buffer("pix_mean", m.clone(), persistent=False)
        self.register_buffer("pix_std", s.clone(), persistent=False)

    @property
    def embed_dim(self) -> int:
        return int(self.teacher.embed_dim)

    @property
    def num_tokens(self) -> int:
        return self.plan.num_tokens

    def student_tokens(self, pred: torch.Tensor) -> torch.Tensor:
        """The student's projected tokens (B, N, D) that this target is compared with."""
        return self.plan.student_tokens(pred)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The target's teacher tokens before the whitening (what PHI-S is estimated from)."""
        x = (images.float() - self.pix_mean) / self.pix_std
        size = self.img_size
        if x.shape[-1] != size or x.shape[-2] != size:
            # official: torchvision 0.13 Resize((224, 224)) on a tensor = bilinear, no antialias
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        return self.plan.select(self.teacher(x))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.features(images)
        return self.phi_s(tokens) if self.phi_s is not None else whiten(tokens, self.eps)


def _autocast_key(device_type: str) -> tuple:
    if torch.is_autocast_enabled(device_type):
        return (True, torch.get_autocast_dtype(device_type))
    return (False, None)


class GraphedTarget:
    """``images (uint8) -> whitened teacher tokens`` replayed from a CUDA graph.

    One graph per (shape, strides, dtype, autocast state) of the input, captured on first use:
    a static input buffer, warm-up calls on a side stream (this is where a compiled ``fn`` compiles),
    then ``torch.cuda.graph`` capture. Each call copies the batch into the static input and replays.

    **Output lifetime**: the returned tensor is the graph's static output buffer; the next call *with
    the same input shape* overwrites it (in stream order). The FD step consumes it within the same
    micro-step: the loss reads it and backward (SmoothL1 saves it) runs before the next micro-batch
    calls the target again, so no copy is needed. A caller that keeps targets across calls (e.g. all
    forwards before any backward) must pass ``clone_output=True``. The buffer never requires grad, so
    autocast's weight-cast cache (leaf tensors that require grad) never holds it.

    Captured with ``capture_error_mode="thread_local"``: loader threads (the nvJPEG producer,
    DataLoader's pin-memory thread) may call cudaMalloc / cudaHostAlloc / stream syncs while the
    main thread captures, which the default global mode turns into capture errors.

    The teacher's weights must not move (``.to()``) after capture: the graph holds their addresses.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device, *,
                 max_graphs: int = 4, warmup_iters: int = 2, clone_output: bool = False):
        if device.type != "cuda":
            raise ValueError("GraphedTarget needs a CUDA device")
        self.fn = fn
        self.device = torch.device("cuda", torch.cuda.current_device()) if device.index is None else device
        self.max_graphs = max_graphs
        self.warmup_iters = warmup_iters
        self.clone_output = clone_output
        self.graphs: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        self.captures = 0  # how many graphs were captured (the benchmark reports re-captures)

    def _key(self, images: torch.Tensor) -> tuple:
        return (tuple(images.shape), images.stride(), images.dtype, images.device, _autocast_key("cuda"))

    def _capture(self, images: torch.Tensor) -> tuple:
        static_in = torch.empty_strided(images.shape, images.stride(), dtype=images.dtype, device=self.device)
        static_in.copy_(images)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup_iters):
                self.fn(static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, capture_error_mode="thread_local"):
            static_out = self.fn(static_in)
        self.captures += 1
        return graph, static_in, static_out

    @torch.compiler.disable  # a replay is opaque to dynamo; never trace into it
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        key = self._key(images)
        entry = self.graphs.get(key)
        if entry is None:
            while len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)  # drops the graph and its private memory pool
            entry = self._capture(images)
            self.graphs[key] = entry
        else:
            self.graphs.move_to_end(key)
        graph, static_in, static_out = entry
        static_in.copy_(images, non_blocking=True)
        graph.replay()
        return static_out.clone() if self.clone_output else static_out

    def reset(self) -> None:
        self.graphs.clear()
