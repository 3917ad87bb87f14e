"""Typed configuration: dataclass schema, YAML files, dotted overrides, validation.

A config is a YAML file whose keys mirror the dataclasses below. ``load_config`` merges, in order:
the schema defaults, the YAML file (and any file it names under ``base:``), then ``--set a.b=value``
overrides. Unknown keys, wrong types and impossible combinations raise :class:`ConfigError`, whose
message names the key, the nearest valid key and what to change.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------------
@dataclass
class StudentConfig:
    arch: Literal["beit", "swinv2"] = "beit"
    """Student family: BEiT-style ViT with a shared relative position bias, or SwinV2."""
    img_size: int = 224
    """Input resolution of the student (and of the teacher, unless teacher.img_size is set)."""
    patch_size: int = 16
    """ViT patch size (16 for B/16, 14 for L/14) or Swin patch size (4)."""
    embed_dim: int = 768
    """Token width (Swin: width of the first stage)."""
    depth: int = 12
    """ViT depth. Ignored for Swin (see depths)."""
    num_heads: int = 12
    """ViT heads. Ignored for Swin (see heads)."""
    depths: list[int] = field(default_factory=lambda: [2, 2, 18, 2])
    """Swin blocks per stage."""
    heads: list[int] = field(default_factory=lambda: [4, 8, 16, 32])
    """Swin heads per stage."""
    window_size: int = 14
    """Swin window size."""
    mlp_ratio: float = 4.0
    """MLP hidden width / token width."""
    init_values: float = 0.1
    """ViT layer-scale init (gamma_1/gamma_2). Swin uses FD's 1e-5 res-post-norm init instead."""
    drop_path: float = 0.1
    """Stochastic depth, linear ramp from 0 to this value over the blocks."""
    shared_rel_pos_bias: bool = True
    """ViT: one relative position bias table shared by every block (FD's USE_SHARED_RPB)."""
    num_classes: int = 0
    """0 for distillation (features only); the class count for fine-tuning / probing."""


@dataclass
class TeacherConfig:
    kind: Literal["clip", "dino", "deit", "esvit"] = "clip"
    """Which teacher: selects the release-file layout, the input normalisation and the token set."""
    model: str = "vit_base_patch16_clip_quickgelu_224"
    """timm model name of the teacher architecture."""
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra timm.create_model arguments (e.g. a tiny width for tests, window_size=14 for EsViT)."""
    weights: str = "random"
    """Path to the original release file (CLIP .pt, DINO .pth, DeiT .pth, EsViT .pth), or 'random'."""
    img_size: Optional[int] = None
    """Teacher input size; None = student.img_size. CLIP L/14 uses 224 with a 256 px student."""
    fp16_weights: bool = False
    """Keep the teacher's weights in fp16 as the official CLIP loader does (CUDA only)."""


@dataclass
class ModelConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    whiten_eps: float = 1e-5
    """eps of the non-affine LayerNorm that whitens the teacher's features."""
    loss_beta: float = 2.0
    """SmoothL1 beta."""
    pretrained: str = ""
    """Fine-tune / probe: distilled student file (fdfast checkpoint, official FD .pth, timm weights)."""
    pretrained_trust_pickle: bool = False
    """Allow `pretrained` files that pickle classes other than the known ones (runs code from the file)."""


@dataclass
class DataConfig:
    backend: Literal["synthetic", "torchvision", "ffcv", "dali", "nvjpeg"] = "synthetic"
    """Loader backend. All yield uint8 channels-last images on the device and int64 labels."""
    train: str = ""
    """Training set: ImageFolder directory (torchvision, dali, nvjpeg) or .beton file (ffcv)."""
    val: str = ""
    """Validation set, same kinds as `train`; empty = no evaluation."""
    num_classes: int = 1000
    """Number of classes (synthetic labels; fine-tune head)."""
    synthetic_size: int = 4096
    """Images per epoch of the synthetic backend."""
    generate_if_missing: bool = False
    """Write a small synthetic JPEG ImageFolder at data.train / data.val when missing (demo runs)."""
    min_scale: float = 0.08
    """RandomResizedCrop lower scale bound."""
    max_scale: float = 1.0
    """RandomResizedCrop upper scale bound."""
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    """Training crop interpolation (FD distillation: bilinear; fine-tuning: bicubic). FFCV always
    resizes with OpenCV's INTER_AREA and ignores it."""
    eval_resize: int = 256
    """Evaluation: resize the shorter side to this, then center-crop to the model size."""
    num_workers: int = 8
    """Decoding workers / threads per process."""
    prefetch: int = 2
    """Batches prepared ahead of the step."""
    auto_augment: Optional[str] = None
    """timm RandAugment spec for fine-tuning, e.g. 'rand-m9-mstd0.5-inc1'; None = off."""
    re_prob: float = 0.0
    """Random erasing probability (applied on the device, per image)."""
    ffcv_order: Literal["random", "quasi_random"] = "random"
    """FFCV traversal order."""
    ffcv_os_cache: bool = True
    """FFCV: memory-map the .beton through the OS page cache."""
    dali_hw_decoder_load: float = 0.65
    """DALI: share of JPEG decoding sent to the hardware decoder (tune per card)."""


@dataclass
class OptimConfig:
    base_lr: float = 3e-4
    """Peak LR per 512 images; lr = base_lr * total_batch / 512 (total = per-device x world x accum)."""
    warmup_lr: float = 5e-7
    """LR at the start of warm-up, per 512 images (scaled like base_lr)."""
    min_lr: float = 5e-6
    """Final LR of the cosine, per 512 images (scaled like base_lr)."""
    warmup_epochs: float = 10
    """Linear warm-up length in epochs (converted to iterations)."""
    weight_decay: float = 0.05
    """AdamW weight decay for the decayed group."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: Optional[float] = 3.0
    """Global gradient-norm clip; None = off."""
    decay_rel_pos_bias: bool = True
    """Apply weight decay to the ViT relative position bias table (the official code does)."""
    layer_decay: float = 1.0
    """Layer-wise LR decay (fine-tuning); 1.0 = off."""
    fused: Optional[bool] = None
    """Fused AdamW; None = on when every parameter is on CUDA."""
    optimizer: Literal["adamw", "lars"] = "adamw"
    """adamw (distillation, fine-tuning) or lars (linear probe)."""


@dataclass
class TrainConfig:
    task: Literal["distill", "finetune", "linprobe"] = "distill"
    """What to train."""
    epochs: int = 300
    """Training length in epochs."""
    batch_size: int = 128
    """Images per device per optimizer micro-step."""
    accum_steps: int = 1
    """Gradient accumulation micro-steps per optimizer step."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (the schedule still spans `epochs`); None = all."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 autocast on CUDA, fp32 on CPU; fp16 = autocast + GradScaler (the official mode)."""
    compile: bool = False
    """torch.compile the student (and teacher)."""
    compile_scope: Literal["whole", "blocks"] = "whole"
    """Compile the student (and teacher target) as one graph, or each transformer block separately
    (much faster compile, less fusion)."""
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"
    """torch.compile mode; CUDA graphs come from train.cuda_graph_teacher, never from a mode."""
    cuda_graph_teacher: bool = False
    """Capture the teacher forward in a CUDA graph (CUDA only)."""
    tf32: bool = True
    """Allow TF32 for fp32 matmuls/convs on CUDA."""
    cudnn_benchmark: bool = True
    """Autotune conv algorithms (patch embedding), as the official recipe does."""
    channels_last: bool = True
    """Run convolutions on channels-last memory."""
    attention: Literal["sdpa", "flex", "eager"] = "sdpa"
    """Student attention kernel with the relative position bias."""
    seed: int = 0
    """Seed for init, data order and augmentation."""
    output_dir: str = "runs/fd"
    """Checkpoints, metrics.jsonl and the resolved config go here."""
    log_every: int = 10
    """Read metrics from the device (a host sync) every N optimizer steps."""
    ckpt_every: int = 500
    """Save a resumable checkpoint every N optimizer steps (and always at the end)."""
    keep_ckpts: int = 2
    """How many recent checkpoints to keep."""
    eval_every: int = 1
    """Evaluate every N epochs (fine-tune / probe)."""
    resume: bool = True
    """Resume automatically from the latest valid checkpoint in output_dir."""
    progress: Literal["auto", "rich", "plain", "none"] = "auto"
    """Progress display on rank 0: rich bar on a terminal, plain lines otherwise."""
    # fine-tuning
    mixup: float = 0.0
    """Mixup alpha (fine-tuning: 0.8)."""
    cutmix: float = 0.0
    """CutMix alpha (fine-tuning: 1.0)."""
    label_smoothing: float = 0.0
    """Label smoothing (fine-tuning: 0.1)."""
    eval_norm: Literal["imagenet", "clip"] = "imagenet"
    """Eval normalisation; 'clip' reproduces the official fine-tune eval (spec pitfall 1)."""
    probe_drop_path: bool = False
    """Linear probe: keep the backbone's drop path active, as the official code does."""


@dataclass
class FDConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------------------------
# Building from dicts with type checking
# ----------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}{hint}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _unknown_key_error(cls: type, key: str, prefix: str) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    full = f"{prefix}.{key}" if prefix else key
    hint = f"; did you mean '{prefix + '.' if prefix else ''}{close[0]}'?" if close else ""
    return ConfigError(f"unknown config key '{full}'{hint} (valid keys here: {', '.join(names)})")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in data.items():
        if k not in names:
            raise _unknown_key_error(cls, k, prefix)
        kwargs[k] = _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'base:' include")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, optim, train)")
    base = data.pop("base", None)
    if base:
        parent = _read_yaml((path.parent / base), seen + (path.resolve(),))
        data = _merge(parent, data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (numbers, true/false, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. optim.base_lr=1e-3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for p in path[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[path[-1]] = value


def config_from_dict(data: dict) -> FDConfig:
    cfg = _build(FDConfig, data)
    validate(cfg)
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> FDConfig:
    """Defaults <- YAML file (with `base:` includes) <- dotted overrides; validated."""
    data: dict = _read_yaml(Path(path)) if path else {}
    for ov in overrides:
        keys, value = parse_override(ov)
        _set_path(data, keys, value)
    return config_from_dict(data)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: FDConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


# ----------------------------------------------------------------------------------------------
# Cross-field validation
# ----------------------------------------------------------------------------------------------
def validate(cfg: FDConfig) -> None:
    s, t, d, o, tr = cfg.model.student, cfg.model.teacher, cfg.data, cfg.optim, cfg.train

    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(tr.batch_size > 0, f"train.batch_size must be > 0, got {tr.batch_size}")
    need(tr.accum_steps >= 1, f"train.accum_steps must be >= 1, got {tr.accum_steps}")
    need(tr.epochs >= 1, f"train.epochs must be >= 1, got {tr.epochs}")
    need(tr.max_steps is None or tr.max_steps >= 1, "train.max_steps must be >= 1 or null")
    need(tr.log_every >= 1 and tr.ckpt_every >= 1, "train.log_every and train.ckpt_every must be >= 1")
    need(0 < d.min_scale <= d.max_scale <= 1.0,
         f"data.min_scale/max_scale must satisfy 0 < min <= max <= 1, got ({d.min_scale}, {d.max_scale})")
    need(0 <= s.drop_path < 1, f"model.student.drop_path must be in [0, 1), got {s.drop_path}")
    need(o.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
    need(0 < o.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {o.layer_decay}")
    need(len(o.betas) == 2, f"optim.betas needs two values, got {o.betas}")
    need(0 <= d.re_prob <= 1, f"data.re_prob must be in [0, 1], got {d.re_prob}")
    if s.arch == "beit":
        need(s.img_size % s.patch_size == 0,
             f"model.student.img_size={s.img_size} is not a multiple of patch_size={s.patch_size}")
        need(s.embed_dim % s.num_heads == 0,
             f"model.student.embed_dim={s.embed_dim} is not divisible by num_heads={s.num_heads}")
    else:
        need(len(s.depths) == len(s.heads),
             f"model.student.depths {s.depths} and heads {s.heads} need the same length")
        need(s.img_size % (s.patch_size * 2 ** (len(s.depths) - 1)) == 0,
             f"model.student.img_size={s.img_size} must be divisible by patch_size*2^(stages-1)")
    if d.backend != "synthetic":
        need(bool(d.train), f"data.backend={d.backend!r} needs data.train (an ImageFolder dir or .beton file)")
    if d.backend == "ffcv" and d.train:
        need(d.train.endswith(".beton"), f"data.backend='ffcv' reads .beton files; data.train={d.train!r} "
             "is not one (build it with fdfast-convert)")
    if tr.task == "distill":
        need(s.num_classes == 0, "model.student.num_classes must be 0 for train.task='distill'")
        # the loss is index-aligned, so both token grids must match; checked again on the built models
        if s.arch == "beit" and t.kind == "esvit":
            raise ConfigError("teacher kind 'esvit' (49 Swin tokens) needs model.student.arch='swinv2'")
        if s.arch == "swinv2" and t.kind != "esvit":
            raise ConfigError(f"student arch 'swinv2' has no CLS token; teacher kind {t.kind!r} needs "
                              "model.student.arch='beit'")
    else:
        need(s.num_classes > 0, f"train.task={tr.task!r} needs model.student.num_classes > 0")
    if tr.task == "linprobe":
        need(o.optimizer == "lars", "train.task='linprobe' uses optim.optimizer='lars'")
    if tr.cuda_graph_teacher:
        need(tr.task == "distill", "train.cuda_graph_teacher only applies to train.task='distill'")
