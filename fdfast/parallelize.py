"""How a model is made ready to train: backend flags, device and memory format, attention kernel,
``torch.compile``, DDP. One path for every task and for the benchmark (torchtitan's ``parallelize``).

Compilation (``compile`` section):

* ``enabled`` — ``torch.compile`` the student and the teacher target (``dynamic=False``: FD batches
  have one shape; a partial batch recompiles once instead of making every kernel dynamic).
* ``scope`` — ``whole``: one graph per model (most fusion); ``blocks``: each transformer block compiled
  on its own (regional compilation: identical blocks share one compiled graph, so compile time drops
  from ~1 min to seconds for ViT-B; glue ops between blocks stay eager).
* ``mode`` — ``default`` or ``max-autotune-no-cudagraphs``. Modes with CUDA graphs are not offered:
  the teacher's graph is captured explicitly (``models/target.py``) and the student's backward +
  optimizer are not graph-safe under DDP / GradScaler.

The model is compiled before it is wrapped in DDP, as timm's distillation task does; only the
trainable module is wrapped (the frozen teacher lives outside DDP).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn as nn

from .config import CompileConfig, FDConfig, TrainConfig
from .distributed import DistInfo
from .models.attention import flex_kernel_options, set_attention_kernel


def apply_backend_settings(train: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Process-wide CUDA flags. TF32 only affects fp32 matmuls/convs (the fp32 baseline, any op
    autocast leaves in fp32); cudnn.benchmark picks the fastest patch-embed conv algorithm (the
    official recipe sets it too). Returns what was set, for the benchmark's record."""
    if device.type != "cuda":
        return {}
    torch.set_float32_matmul_precision("high" if train.tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = train.tf32
    torch.backends.cudnn.benchmark = train.cudnn_benchmark
    return {"tf32": train.tf32, "cudnn_benchmark": train.cudnn_benchmark}


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """Every block of every ``blocks`` container (timm ViT/Beit: ``blocks``; Swin: ``layers.i.blocks``)."""
    out: list[nn.Module] = []
    for name, m in module.named_modules():
        if name.rsplit(".", 1)[-1] == "blocks" and isinstance(m, (nn.ModuleList, nn.Sequential)):
            out.extend(m.children())
    return out


def apply_compile(module: nn.Module, compile_cfg: CompileConfig, *, scope: Optional[str] = None,
                  backend: Optional[str] = None) -> nn.Module:
    """Compile ``module`` as one graph (``whole``: returns the compiled wrapper) or block by block
    (``blocks``: in place, returns ``module`` itself, state-dict keys unchanged).

    ``backend`` overrides inductor (tests use ``aot_eager`` to check the traced graphs quickly)."""
    scope = scope or compile_cfg.scope
    kwargs: dict[str, Any] = {"dynamic": False}
    if backend is not None:
        kwargs["backend"] = backend
    if compile_cfg.mode != "default" and backend in (None, "inductor"):
        kwargs["mode"] = compile_cfg.mode
    if scope == "whole":
        return torch.compile(module, **kwargs)
    if scope != "blocks":
        raise ValueError(f"compile.scope={scope!r}: choose 'whole' or 'blocks'")
    blocks = transformer_blocks(module)
    if not blocks:
        raise ValueError(f"compile.scope='blocks': {type(module).__name__} has no `blocks` container; "
                         "use compile.scope=whole")
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


def set_grad_checkpointing(model: nn.Module, enable: bool = True) -> int:
    """Activation checkpointing in every timm network inside ``model`` (a DistillModel's encoder, a
    fine-tune student); returns how many were switched. torch.utils.checkpoint replays the RNG state, so
    drop path draws the same masks in the recomputation: loss and gradients are unchanged."""
    nets = [m for m in model.modules() if hasattr(m, "set_grad_checkpointing") and hasattr(m, "forward_features")]
    for m in nets:
        m.set_grad_checkpointing(enable)
    return len(nets)


def prepare_model(model: nn.Module, cfg: FDConfig, info: DistInfo) -> nn.Module:
    """What every task does to its trainable model before wrapping: process-wide backend flags (TF32,
    cudnn.benchmark), the device, channels-last memory, the attention kernel (with FlexAttention's tiles
    for this device) and activation checkpointing."""
    apply_backend_settings(cfg.train, info.device)
    model = model.to(info.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    set_attention_kernel(model, cfg.model.attention,
                         flex_kernel_options(cfg.compile.flex_kernel_options, info.device))
    if cfg.model.grad_checkpointing and not set_grad_checkpointing(model):
        raise ValueError(f"model.grad_checkpointing: {type(model).__name__} holds no timm network to checkpoint")
    return model


def wrap_ddp(module: nn.Module, info: DistInfo) -> nn.Module:
    """DDP over the trainable module when more than one process runs; the module itself otherwise."""
    if not info.enabled:
        return module
    kwargs = {"device_ids": [info.local_rank]} if info.device.type == "cuda" else {}
    return nn.parallel.DistributedDataParallel(module, broadcast_buffers=False, **kwargs)


def wrap_for_training(model: nn.Module, cfg: FDConfig, info: DistInfo,
                      compile_backend: Optional[str] = None) -> nn.Module:
    """Compile (before DDP), then DDP over the trainable module. ``compile_backend`` (e.g. 'aot_eager')
    is for CPU checks of the compiled path."""
    run = apply_compile(model, cfg.compile, backend=compile_backend) if cfg.compile.enabled else model
    return wrap_ddp(run, info)
