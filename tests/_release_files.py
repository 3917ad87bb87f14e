"""Tiny files in the ORIGINAL release layouts, with random non-zero weights everywhere, for parity tests.

* OpenAI CLIP: a TorchScript archive (``torch.jit.save`` of a traced module) whose state dict has OpenAI's
  keys (``visual.*`` + the text tower + ``input_resolution``/``context_length``/``vocab_size``), fp16 tensors.
* DINO: the flat timm-style ViT state dict of ``dino_vitbase16_pretrain.pth``.
* Official FD training checkpoint, as ``main_fd.py``'s ``save_checkpoint`` writes it: ``{'model':
  FD.state_dict(), 'optimizer', 'lr_scheduler', 'scaler', 'max_accuracy', 'epoch', 'config': yacs CfgNode}``,
  where ``FD.state_dict()`` holds ``encoder.*`` (incl. the persistent ``relative_position_index`` buffer),
  ``decoder.0.{weight [Dt, Ds, 1], bias}`` and the whole teacher under ``feature_model.*``.

Nothing here imports fdfast: the files are built from shapes and key names alone, so a wrong key mapping in
fdfast cannot be mirrored by the writer.
"""
from __future__ import annotations

import contextlib
import math
import sys
import types
import warnings
from collections import OrderedDict

import torch
import torch.nn as nn



def relative_position_index_loops(grid_h: int, grid_w: int) -> torch.Tensor:
    """The index buffer FD's RelativePositionBias saves, entry by entry (a deliberately different
    construction from ``_official_reference.relative_position_index``, so the two check each other)."""
    rows = (2 * grid_h - 1) * (2 * grid_w - 1) + 3
    n = grid_h * grid_w + 1
    index = torch.zeros(n, n, dtype=torch.long)
    for q in range(n):
        for k in range(n):
            if q == 0 and k == 0:
                index[q, k] = rows - 1  # cls -> cls
            elif q == 0:
                index[q, k] = rows - 3  # cls -> token
            elif k == 0:
                index[q, k] = rows - 2  # token -> cls
            else:
                (qh, qw), (kh, kw) = divmod(q - 1, grid_w), divmod(k - 1, grid_w)
                index[q, k] = (qh - kh + grid_h - 1) * (2 * grid_w - 1) + (qw - kw + grid_w - 1)
    return index


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fill(shape, kind: str, g: torch.Generator) -> torch.Tensor:
    """Random values with roughly unit-scale activations, so softmaxes are not saturated, both SmoothL1
    branches occur and every parameter's gradient is well away from zero."""
    r = torch.randn(shape, generator=g)
    if kind == "weight":  # Linear [out, in] or Conv [out, in, kh, kw]: fan-in scaling
        return r / math.sqrt(max(1, math.prod(shape[1:])))
    if kind == "ln_weight":
        return 1.0 + 0.25 * r
    if kind == "gamma":  # layer scale: far from the 0.1 init so a dropped/duplicated gamma shows
        return 0.6 + 0.3 * r
    if kind == "table":  # relative position bias: comparable to the q.k logits
        return 0.8 * r
    if kind == "token":
        return 0.5 * r
    return 0.2 * r  # biases, q/v bias


def _fp16_exact(t: torch.Tensor) -> torch.Tensor:
    # OpenAI ships fp16 tensors; values representable in fp16 keep every reader on identical numbers.
    return t.half().float()


# ----------------------------------------------------------------------------------------------
# OpenAI CLIP TorchScript archive
# ----------------------------------------------------------------------------------------------
class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(nn.Module):
    # module names are OpenAI's (ln_1, attn = nn.MultiheadAttention, mlp.c_fc/gelu/c_proj, ln_2)
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(4 * width, width))]))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.ModuleList([_ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        for blk in self.resblocks:
            x = blk(x)
        return x


class _Visual(nn.Module):
    def __init__(self, img: int, patch: int, width: int, layers: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros((img // patch) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, width // 64)  # OpenAI's build_model: heads = width // 64
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, out_dim))

    def forward(self, x):
        x = self.conv1(x).flatten(2).permute(0, 2, 1)
        x = torch.cat([self.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype), x], 1)
        x = self.ln_pre(x + self.positional_embedding).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class _OpenAICLIP(nn.Module):
    def __init__(self, img: int, patch: int, width: int, layers: int, embed_dim: int = 16):
        super().__init__()
        self.visual = _Visual(img, patch, width, layers, embed_dim)
        # a text tower with OpenAI's names: its 'transformer.resblocks.*' keys must not leak into the teacher
        self.transformer = _Transformer(64, 1, 1)
        self.token_embedding = nn.Embedding(50, 64)
        self.positional_embedding = nn.Parameter(torch.zeros(8, 64))
        self.ln_final = nn.LayerNorm(64)
        self.text_projection = nn.Parameter(torch.zeros(64, embed_dim))
        self.logit_scale = nn.Parameter(torch.zeros([]))
        for name, value in (("input_resolution", img), ("context_length", 8), ("vocab_size", 50)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image):
        return self.visual(image)


def _randomize_clip(model: nn.Module, seed: int) -> None:
    g = _gen(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("class_embedding", "positional_embedding")):
                kind = "token"
            elif p.ndim == 1 and "ln" in name and name.endswith("weight"):
                kind = "ln_weight"
            elif p.ndim >= 2:
                kind = "weight"
            else:
                kind = "bias"
            p.copy_(_fp16_exact(_fill(p.shape, kind, g)))


def write_openai_clip(path, *, img: int = 32, patch: int = 8, width: int = 128, layers: int = 2,
                      seed: int = 0):
    """An OpenAI-layout CLIP TorchScript archive (fp16 tensors, like ViT-B-16.pt)."""
    model = _OpenAICLIP(img, patch, width, layers).eval()
    _randomize_clip(model, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.9 marks torch.jit as deprecated; OpenAI's files use it
        traced = torch.jit.trace(model, torch.zeros(1, 3, img, img), check_trace=False)
        traced.half()
        torch.jit.save(traced, str(path))
    return path


# ----------------------------------------------------------------------------------------------
# DINO backbone file (flat timm-style ViT keys)
# ----------------------------------------------------------------------------------------------
def dino_state_dict(*, img: int = 32, patch: int = 8, dim: int = 128, depth: int = 2, seed: int = 1) -> dict:
    g = _gen(seed)
    n = (img // patch) ** 2 + 1
    sd = {"cls_token": _fill((1, 1, dim), "token", g), "pos_embed": _fill((1, n, dim), "token", g),
          "patch_embed.proj.weight": _fill((dim, 3, patch, patch), "weight", g),
          "patch_embed.proj.bias": _fill((dim,), "bias", g)}
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": _fill((dim,), "ln_weight", g), b + "norm1.bias": _fill((dim,), "bias", g),
            b + "attn.qkv.weight": _fill((3 * dim, dim), "weight", g),
            b + "attn.qkv.bias": _fill((3 * dim,), "bias", g),
            b + "attn.proj.weight": _fill((dim, dim), "weight", g), b + "attn.proj.bias": _fill((dim,), "bias", g),
            b + "norm2.weight": _fill((dim,), "ln_weight", g), b + "norm2.bias": _fill((dim,), "bias", g),
            b + "mlp.fc1.weight": _fill((4 * dim, dim), "weight", g), b + "mlp.fc1.bias": _fill((4 * dim,), "bias", g),
            b + "mlp.fc2.weight": _fill((dim, 4 * dim), "weight", g), b + "mlp.fc2.bias": _fill((dim,), "bias", g),
        })
    sd.update({"norm.weight": _fill((dim,), "ln_weight", g), "norm.bias": _fill((dim,), "bias", g)})
    return sd


# ----------------------------------------------------------------------------------------------
# Official FD training checkpoint
# ----------------------------------------------------------------------------------------------
def fd_model_state_dict(*, img: int = 32, patch: int = 8, dim: int = 32, depth: int = 2, heads: int = 2,
                        teacher_dim: int = 128, decoder_scale: float = 1.5, seed: int = 2) -> dict:
    """``FD.state_dict()`` minus the teacher: ``encoder.*`` of ``VisionTransformerForFD`` (USE_APE False,
    shared RPB, q/v bias, layer scale, final norm) and the Conv1d projector ``decoder.0.*``."""
    g = _gen(seed)
    grid = img // patch
    e = "encoder."
    sd = {e + "cls_token": _fill((1, 1, dim), "token", g),
          e + "patch_embed.proj.weight": _fill((dim, 3, patch, patch), "weight", g),
          e + "patch_embed.proj.bias": _fill((dim,), "bias", g),
          e + "rel_pos_bias.relative_position_bias_table": _fill(((2 * grid - 1) ** 2 + 3, heads), "table", g),
          # a persistent buffer of the official module, so FD.state_dict() carries it
          e + "rel_pos_bias.relative_position_index": relative_position_index_loops(grid, grid)}
    for i in range(depth):
        b = f"{e}blocks.{i}."
        sd.update({
            b + "gamma_1": _fill((dim,), "gamma", g), b + "gamma_2": _fill((dim,), "gamma", g),
            b + "norm1.weight": _fill((dim,), "ln_weight", g), b + "norm1.bias": _fill((dim,), "bias", g),
            b + "attn.q_bias": _fill((dim,), "bias", g), b + "attn.v_bias": _fill((dim,), "bias", g),
            b + "attn.qkv.weight": _fill((3 * dim, dim), "weight", g),
            b + "attn.proj.weight": _fill((dim, dim), "weight", g), b + "attn.proj.bias": _fill((dim,), "bias", g),
            b + "norm2.weight": _fill((dim,), "ln_weight", g), b + "norm2.bias": _fill((dim,), "bias", g),
            b + "mlp.fc1.weight": _fill((4 * dim, dim), "weight", g), b + "mlp.fc1.bias": _fill((4 * dim,), "bias", g),
            b + "mlp.fc2.weight": _fill((dim, 4 * dim), "weight", g), b + "mlp.fc2.bias": _fill((dim,), "bias", g),
        })
    sd.update({e + "norm.weight": _fill((dim,), "ln_weight", g), e + "norm.bias": _fill((dim,), "bias", g),
               "decoder.0.weight": decoder_scale * _fill((teacher_dim, dim, 1), "weight", g),
               "decoder.0.bias": _fill((teacher_dim,), "bias", g)})
    return sd


class _CfgNode(dict):
    """Stand-in for ``yacs.config.CfgNode`` with its pickled form (a dict subclass + four __dict__ fields),
    so the file carries the same ``yacs.config.CfgNode`` global as a real ``main_fd.py`` checkpoint."""

    def __init__(self, init=None):
        super().__init__({k: _CfgNode(v) if type(v) is dict else v for k, v in dict(init or {}).items()})
        self.__dict__.update({"__immutable__": True, "__deprecated_keys__": set(), "__renamed_keys__": {},
                              "__new_allowed__": False})


_CfgNode.__module__, _CfgNode.__qualname__, _CfgNode.__name__ = "yacs.config", "CfgNode", "CfgNode"


@contextlib.contextmanager
def fake_yacs():
    """Make ``yacs.config.CfgNode`` importable (for writing, and for reading the way the official code does,
    with a full unpickle); sys.modules is restored afterwards, as on a machine without yacs."""
    saved = {k: sys.modules.get(k) for k in ("yacs", "yacs.config")}
    pkg, mod = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    mod.CfgNode, pkg.config = _CfgNode, mod
    sys.modules.update({"yacs": pkg, "yacs.config": mod})
    try:
        yield mod
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def write_official_fd_checkpoint(path, model_sd: dict, teacher_sd: dict, *, pred_feat: str = "CLIP_400M",
                                 epoch: int = 299):
    """``main_fd.py``'s checkpoint: the FD state (student, projector, teacher) + training state + config."""
    model = dict(model_sd)
    # FD's feature_model is the whole teacher module; CLIP's build_model drops the three scalar entries
    model.update({"feature_model." + k: v for k, v in teacher_sd.items()
                  if k not in ("input_resolution", "context_length", "vocab_size")})
    with fake_yacs() as yacs:
        cfg = yacs.CfgNode({"MODEL": {"TYPE": "vit", "VIT": {"USE_SHARED_RPB": True, "USE_APE": False}},
                            "DEV": {"PRED_FEAT": pred_feat, "PRED_FEAT_AFTERNORM": True}})
        torch.save({"model": model, "optimizer": {"state": {}, "param_groups": []},
                    "lr_scheduler": {"_step_count": 1}, "scaler": {"scale": 65536.0}, "max_accuracy": 0.0,
                    "epoch": epoch, "config": cfg}, path)
    return path


def read_official_fd_checkpoint(path) -> dict:
    """Read the file as the official code does (a full unpickle, yacs importable)."""
    with fake_yacs():
        return torch.load(path, map_location="cpu", weights_only=False)
