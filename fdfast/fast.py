"""The fast paths of the FD step: compiled + CUDA-graphed teacher target, FlexAttention student,
compile scope, backend switches. Every optimisation is a config switch so ``bench/throughput.py``
can show what each one buys (see bench/README.md).

Switches (``train.*``; the ones not yet in ``TrainConfig`` are read with ``getattr`` defaults,
see :data:`FAST_DEFAULTS`):

* ``compile`` — ``torch.compile`` the student and the teacher target (``dynamic=False``: FD
  batches have one shape; a partial batch recompiles once instead of making every kernel dynamic).
* ``compile_scope`` — ``whole``: one graph per model (most fusion); ``blocks``: each transformer
  block compiled on its own (regional compilation: identical blocks share one compiled graph, so
  compile time drops from ~1 min to seconds for ViT-B; glue ops between blocks stay eager).
* ``compile_mode`` — the ``torch.compile`` mode (``default`` or ``max-autotune-no-cudagraphs``).
  ``reduce-overhead`` is refused: CUDA graphs are applied explicitly to the teacher (below) and the
  student's backward + optimizer are not graph-safe under DDP / GradScaler.
* ``cuda_graph_teacher`` — the teacher target (normalise -> teacher -> whiten) is captured in a CUDA
  graph per input shape and replayed every step (:class:`GraphedTarget`).
* ``attention`` — ``flex`` swaps timm Beit attention for FlexAttention with a ``score_mod`` that adds
  the relative position bias (:func:`use_flex_attention`).
* ``tf32`` / ``cudnn_benchmark`` — backend flags (:func:`apply_backend_settings`).

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
import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .objective import whiten

# Defaults of the fast-path switches that may not exist in TrainConfig yet (read via getattr).
FAST_DEFAULTS: dict[str, Any] = {
    "compile": False,
    "cuda_graph_teacher": False,
    "attention": "sdpa",
    "channels_last": True,
    "compile_scope": "whole",
    "compile_mode": "default",
    "tf32": True,
    "cudnn_benchmark": True,
}
COMPILE_SCOPES = ("whole", "blocks")
# "max-autotune" and "reduce-overhead" turn on inductor's own CUDA graphs, which must not nest inside
# the teacher's manual capture and are not safe for the student's backward + optimizer.
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def train_option(cfg: Any, name: str) -> Any:
    """``cfg.train.<name>``, or its fast-path default while the field is not in the schema."""
    return getattr(cfg.train, name, FAST_DEFAULTS[name])


# ----------------------------------------------------------------------------------------------
# Backend flags
# ----------------------------------------------------------------------------------------------
def apply_backend_settings(cfg: Any, device: torch.device) -> dict[str, Any]:
    """Process-wide CUDA flags. TF32 only affects fp32 matmuls/convs (the fp32 baseline, any op
    autocast leaves in fp32); cudnn.benchmark picks the fastest patch-embed conv algorithm (the
    official recipe sets it too). Returns what was set, for the benchmark's record."""
    applied: dict[str, Any] = {}
    if device.type != "cuda":
        return applied
    tf32 = bool(train_option(cfg, "tf32"))
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = bool(train_option(cfg, "cudnn_benchmark"))
    applied.update(tf32=tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    return applied


# ----------------------------------------------------------------------------------------------
# Compilation
# ----------------------------------------------------------------------------------------------
def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """Every block of every ``blocks`` container (timm ViT/Beit: ``blocks``; Swin: ``layers.i.blocks``)."""
    out: list[nn.Module] = []
    for name, m in module.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(m, (nn.ModuleList, nn.Sequential)):
            out.extend(m.children())
    return out


def _compile_kwargs(cfg: Any, backend: Optional[str]) -> dict[str, Any]:
    mode = train_option(cfg, "compile_mode")
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile_mode={mode!r}: choose one of {list(COMPILE_MODES)} (CUDA graphs are "
                         "applied to the teacher by train.cuda_graph_teacher, not by a compile mode)")
    kwargs: dict[str, Any] = {"dynamic": False}
    if backend is not None:
        kwargs["backend"] = backend
    if mode != "default" and (backend in (None, "inductor")):
        kwargs["mode"] = mode
    return kwargs


def compile_module(module: nn.Module, cfg: Any, *, scope: Optional[str] = None,
                   backend: Optional[str] = None) -> nn.Module:
    """Compile ``module`` as one graph (``whole``: returns the compiled wrapper) or block by block
    (``blocks``: in place, returns ``module`` itself, state-dict keys unchanged).

    ``backend`` overrides inductor (tests use ``aot_eager`` to check the traced graphs quickly)."""
    scope = scope or train_option(cfg, "compile_scope")
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"train.compile_scope={scope!r}: choose one of {list(COMPILE_SCOPES)}")
    kwargs = _compile_kwargs(cfg, backend)
    if scope == "whole":
        return torch.compile(module, **kwargs)
    blocks = transformer_blocks(module)
    if not blocks:
        raise ValueError(f"train.compile_scope='blocks': {type(module).__name__} has no `blocks` container; "
                         "use train.compile_scope=whole")
    # Blocks differ in Python constants that dynamo guards on (the drop-path rate ramps with depth; the
    # first block has none), so each block may need its own graph. Past the recompile limit (default 8)
    # dynamo silently runs the remaining blocks eagerly, so raise it to cover every block.
    limit = 2 * len(blocks) + 8
    for name in ("recompile_limit", "cache_size_limit"):
        if getattr(torch._dynamo.config, name, limit) < limit:
            setattr(torch._dynamo.config, name, limit)
    for blk in blocks:
        blk.compile(**kwargs)  # nn.Module.compile: in place; identical blocks reuse one compiled graph
    return module


def compile_student(model: nn.Module, cfg: Any, *, backend: Optional[str] = None) -> nn.Module:
    """What ``trainer.wrap_for_training`` should call instead of a bare ``torch.compile`` (before DDP)."""
    return compile_module(model, cfg, backend=backend)


# ----------------------------------------------------------------------------------------------
# Teacher target
# ----------------------------------------------------------------------------------------------
def enable_fused_attention(module: nn.Module) -> int:
    """Turn on timm's SDPA path in every attention module of ``module``. The teacher's attention has
    no mask or bias, so under bf16/fp16 SDPA selects the FlashAttention kernel. Returns the count."""
    n = 0
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = True
            n += 1
    return n


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


def build_fast_target(target: nn.Module, cfg: Any, device: torch.device, *,
                      backend: Optional[str] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The fast teacher target from a :class:`fdfast.step.TeacherTarget`.

    fused (flash) attention on the teacher; ``train.compile`` -> compiled (``compile_scope``:
    the whole target incl. normalise/whiten, or the teacher's blocks); ``train.cuda_graph_teacher``
    on CUDA -> captured in a CUDA graph per input shape (:class:`GraphedTarget`). On CPU, or without
    ``cuda_graph_teacher``, the target is compiled only (or eager when ``train.compile`` is off).
    """
    enable_fused_attention(target.teacher)
    fn: nn.Module = target.to(device)
    if train_option(cfg, "compile"):
        scope = train_option(cfg, "compile_scope")
        if scope == "whole":
            fn = compile_module(fn, cfg, scope="whole", backend=backend)
        else:
            compile_module(fn.teacher, cfg, scope="blocks", backend=backend)
    if train_option(cfg, "cuda_graph_teacher") and device.type == "cuda":
        return GraphedTarget(fn, device)
    return fn


# ----------------------------------------------------------------------------------------------
# FlexAttention for the Beit student (shared relative position bias as a score_mod)
# ----------------------------------------------------------------------------------------------
_compiled_flex: Optional[Callable] = None


def _flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod, scale: float) -> torch.Tensor:
    """FlexAttention only runs fast when compiled. Inside a compiled student it is traced as is;
    an eager CUDA student calls a compiled ``flex_attention`` (compiled once per shape); on CPU the
    eager reference implementation runs (forward only: torch has no CPU flex backward)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention  # noqa: PLC0415

    if torch.compiler.is_compiling() or not q.is_cuda:
        return flex_attention(q, k, v, score_mod=score_mod, scale=scale)
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex(q, k, v, score_mod=score_mod, scale=scale)


def _flex_attention_class():
    from timm.models.beit import Attention as BeitAttention  # noqa: PLC0415

    class FlexBeitAttention(BeitAttention):
        """timm Beit attention with FlexAttention. The bias (shared table gathered once per forward by
        ``Beit.rel_pos_bias()``, plus this block's own table if it has one) enters as a ``score_mod``
        on the fp32 scores inside the fused kernel; its gradient flows back through the captured
        (heads, N, N) tensor and then, by ordinary autograd, through the gather into the table.

        Capturing the gathered (heads, N, N) tensor rather than the (732, heads) table keeps the
        backward's atomic adds spread over N*N addresses instead of 732 hot ones."""

        def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
            if self.training and self.attn_drop.p > 0:
                return super().forward(x, shared_rel_pos_bias)  # FlexAttention has no attention dropout
            B, N, C = x.shape
            if self.q_bias is None:
                qkv = self.qkv(x)
            else:
                qkv_bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                if self.qkv_bias_separate:
                    qkv = self.qkv(x) + qkv_bias
                else:
                    qkv = F.linear(x, weight=self.qkv.weight, bias=qkv_bias)
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

            bias = None
            if self.relative_position_bias_table is not None:
                bias = self._get_rel_pos_bias()[0]
            if shared_rel_pos_bias is not None:
                shared = shared_rel_pos_bias.reshape(-1, N, N)
                bias = shared if bias is None else bias + shared
            score_mod = None
            if bias is not None:
                def score_mod(score, b, h, q_idx, kv_idx):
                    return score + bias[h, q_idx, kv_idx]
            x = _flex(q, k, v, score_mod, self.scale)
            x = x.transpose(1, 2).reshape(B, N, -1)
            return self.proj_drop(self.proj(x))

    return BeitAttention, FlexBeitAttention


_FLEX_CLASSES: Optional[tuple] = None


def _retype_modules(model: nn.Module, old: type, new: type) -> tuple[int, int]:
    """Give every module of exactly class ``old`` the class ``new`` (same parameters, buffers and keys);
    returns (how many were changed, how many were ``new`` already)."""
    changed = already = 0
    for m in model.modules():
        if type(m) is old:
            m.__class__ = new
            changed += 1
        elif type(m) is new:
            already += 1
    return changed, already


def use_flex_attention(model: nn.Module) -> int:
    """Swap every timm Beit ``Attention`` in ``model`` for the FlexAttention version (same
    parameters, buffers and state-dict keys: only the class changes). Returns how many were swapped.
    Raises for models without Beit attention (SwinV2's cosine attention has no flex path here)."""
    global _FLEX_CLASSES
    if _FLEX_CLASSES is None:
        _FLEX_CLASSES = _flex_attention_class()
    base, flex_cls = _FLEX_CLASSES
    n = sum(_retype_modules(model, base, flex_cls))
    if n == 0:
        raise ValueError(f"train.attention='flex' applies to the Beit (ViT) student; {type(model).__name__} has no "
                         "timm Beit attention. Use train.attention=sdpa")
    return n


def use_sdpa_attention(model: nn.Module) -> int:
    """Undo :func:`use_flex_attention` (back to timm's own class)."""
    global _FLEX_CLASSES
    if _FLEX_CLASSES is None:
        return 0
    base, flex_cls = _FLEX_CLASSES
    return _retype_modules(model, flex_cls, base)[0]


# ----------------------------------------------------------------------------------------------
# Helpers for checks (device script, tests)
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def only_sdpa_backends(*names: str) -> Iterator[None]:
    """Restrict SDPA to the named backends (e.g. "FLASH_ATTENTION"): a call that cannot use them
    raises instead of silently falling back, which is how the device script proves the teacher
    runs on FlashAttention and finds the kernel the student's biased attention uses."""
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    with sdpa_kernel([getattr(SDPBackend, n) for n in names]):
        yield
