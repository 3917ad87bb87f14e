"""Reading configs: YAML files with ``base:`` includes, dotted overrides, type checking.

A config is a YAML file whose keys mirror the dataclasses of :mod:`fdfast.config.sections`.
``load_config`` merges, in order: the schema defaults, the YAML file (and any file it names under
``base:``), then ``--set a.b=value`` overrides. Unknown keys and wrong types raise
:class:`ConfigError` naming the key and the nearest valid one; each section then checks its own
values (``__post_init__``). The file is a path or the name of a config shipped with the package
(``fd_clip_vit_base_300ep``, ``pretrain/demo_cpu``): see :func:`resolve_config`.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Union

import yaml

from ..constants import TRUST_SWITCH
from ..errors import ConfigError
from .sections import FDConfig

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


# Keys of earlier fdfast versions and where they live now: a config that still uses one is told where
# it went, rather than silently migrated (the user's file stays the single source of truth).
MOVED_KEYS = {
    "train.compile": "compile.enabled", "train.compile_scope": "compile.scope",
    "train.compile_mode": "compile.mode", "train.cuda_graph_teacher": "compile.cuda_graph_teacher",
    "train.attention": "model.attention", "train.log_every": "log.every", "train.progress": "log.progress",
    "train.ckpt_every": "checkpoint.every", "train.keep_ckpts": "checkpoint.keep",
    "train.mixup": "augment.mixup", "train.cutmix": "augment.cutmix",
    "train.label_smoothing": "augment.label_smoothing", "data.re_prob": "augment.re_prob",
    "model.student.depths": "model.student.depth", "model.student.heads": "model.student.num_heads",
    "data.generate_if_missing": "(removed: `python -m pipelines.generate --demo DIR` writes demo data)",
}


# Keys only the command line may set: permission to run code from a file is the user's, never a file's.
# A config (its base: chain, a --set) that sets one is refused; a config saved in a run drops them unread.
COMMAND_LINE_KEYS = {"model.trust_pickle": TRUST_SWITCH, "model.pretrained_trust_pickle": TRUST_SWITCH}


def without_command_line_keys(data: Mapping) -> dict:
    """A copy of a saved config (a checkpoint's, a run's ``config.yaml``) without :data:`COMMAND_LINE_KEYS`,
    which earlier versions wrote there: read back, they would grant what only the command line may grant.
    Earlier versions also wrote ``model.teacher`` at its defaults beside ``model.teachers``: dropped as well,
    as :func:`to_dict` does."""
    data = _without_unused_teacher(copy.deepcopy(dict(data)))
    for key in COMMAND_LINE_KEYS:
        pop_key(data, key)
    return data


def pop_key(data: dict, key: str) -> tuple[bool, Any]:
    """Remove the dotted ``key`` (``model.trust_pickle``) from the nested mapping ``data``:
    ``(True, its value)``, or ``(False, None)`` where it is absent."""
    *parents, leaf = key.split(".")
    node: Any = data
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if not isinstance(node, dict) or leaf not in node:
        return False, None
    return True, node.pop(leaf)


def _unknown_key_error(cls: type, key: str, prefix: str) -> ConfigError:
    full = f"{prefix}.{key}" if prefix else key
    if full in COMMAND_LINE_KEYS:
        return ConfigError(f"config key '{full}' is refused: only the command line can allow files that run code "
                           f"when unpickled, never a config; remove the key (and pass {COMMAND_LINE_KEYS[full]} "
                           "if you trust the files)")
    if full in MOVED_KEYS:
        return ConfigError(f"config key '{full}' has moved: use '{MOVED_KEYS[full]}'")
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
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


def yaml_error_line(error: yaml.YAMLError) -> str:
    """A YAML parser error as one line: where (line and column, 1-based) and what."""
    mark = getattr(error, "problem_mark", None)
    what = " ".join(str(getattr(error, "problem", None) or error).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark is not None else what


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: circular 'base:' include")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, augment, optim, train, compile, checkpoint, log)")
    base = data.pop("base", None)
    if base:
        parent = _read_yaml((path.parent / base), seen + (path.resolve(),))
        data = _merge(parent, data)
    return data


# ----------------------------------------------------------------------------------------------
# Configs shipped with the package, by name
# ----------------------------------------------------------------------------------------------
CONFIG_GROUPS = ("pretrain", "finetune")
"""Sub-folders of the shipped configs, in the order a bare name is looked up (and listed)."""


def packaged_configs_dir() -> Path:
    """The configs shipped with fdfast: ``fdfast/configs`` in an installed wheel, ``configs/`` beside the
    package in a source checkout (the wheel maps that folder into the package)."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "configs", package.parent / "configs"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"fdfast's configs are missing from this installation (looked in {package / 'configs'} "
                      f"and {package.parent / 'configs'}): reinstall fdfast, or pass --config a YAML file")


def _config_key(path: Path, root: Path) -> tuple:
    rel = path.relative_to(root)
    group = rel.parts[0] if len(rel.parts) > 1 else ""
    return (CONFIG_GROUPS.index(group) if group in CONFIG_GROUPS else len(CONFIG_GROUPS), rel.as_posix())


def _shipped_configs(root: Path) -> list[Path]:
    """Runnable shipped configs (``_*.yaml`` are only ``base:`` includes), pretrain first."""
    return sorted((p for p in root.rglob("*.yaml") if not p.name.startswith("_")),
                  key=lambda p: _config_key(p, root))


def list_configs() -> list[tuple[str, str]]:
    """``(name, description)`` of every shipped config; the name is the file's stem when that is
    unique, else its path under the configs folder without ``.yaml`` (``pretrain/demo_cpu``)."""
    root = packaged_configs_dir()
    paths = _shipped_configs(root)
    stems = [p.stem for p in paths]
    out = []
    for p in paths:
        name = p.stem if stems.count(p.stem) == 1 else p.relative_to(root).with_suffix("").as_posix()
        out.append((name, _first_sentence(p)))
    return out


def _first_sentence(path: Path) -> str:
    """The first sentence of the comment block a config file starts with (its one-line description)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    text = " ".join(lines)
    end = re.search(r"\.(\s|$)", text)
    return text[:end.start() + 1] if end else text


def resolve_config(name: str | Path) -> Path:
    """The YAML file meant by ``--config NAME``, in this order: an existing file; ``NAME`` or
    ``NAME.yaml`` under the shipped configs (a leading ``configs/`` is allowed, so the documented
    ``configs/pretrain/x.yaml`` works outside the repository too); a bare ``NAME`` searched in
    pretrain/ then finetune/, where a name found in both is an error listing both."""
    path = Path(name)
    if path.is_file():
        return path
    root = packaged_configs_dir()
    rel = Path(*path.parts[1:]) if path.parts[:1] == ("configs",) and len(path.parts) > 1 else path
    if not rel.is_absolute():
        for candidate in (root / rel, root / f"{rel}.yaml"):
            if candidate.is_file():
                return candidate
    if len(path.parts) == 1:
        stem = path.name.removesuffix(".yaml")
        found = [p for p in _shipped_configs(root) if p.stem == stem]
        if len(found) == 1:
            return found[0]
        if found:
            names = ", ".join(p.relative_to(root).with_suffix("").as_posix() for p in found)
            raise ConfigError(f"config name {str(name)!r} is ambiguous: it is each of {names}; pass one of those")
    close = difflib.get_close_matches(str(name), [n for n, _ in list_configs()], n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ConfigError(f"config {str(name)!r} is neither a file nor the name of a shipped config{hint}; "
                      "`fdfast-train --list-configs` lists the names")


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


def _list_entry(items: list, key: str, where: str) -> dict:
    """The mapping of a list of mappings (``model.teachers``) that a dotted key names: by its ``name``, else by
    its index (``model.teachers.dinov2.weights=...``, ``model.teachers.0.weights=...``)."""
    for item in items:
        if isinstance(item, dict) and item.get("name") == key:
            return item
    if key.isdigit() and int(key) < len(items) and isinstance(items[int(key)], dict):
        return items[int(key)]
    names = [str(i.get("name")) for i in items if isinstance(i, dict) and i.get("name")]
    raise ConfigError(f"override {where}: {key!r} names no entry of the list (its names: {', '.join(names) or '-'}; "
                      f"or an index below {len(items)})")


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node: Any = data
    for i, p in enumerate(path[:-1]):
        if isinstance(node, list):
            node = _list_entry(node, p, ".".join(path[:i + 1]))
            continue
        nxt = node.get(p)
        if not isinstance(nxt, (dict, list)) or (isinstance(nxt, list) and not all(isinstance(v, dict) for v in nxt)):
            nxt = {}
            node[p] = nxt
        node = nxt
    if isinstance(node, list):
        raise ConfigError(f"override {'.'.join(path)}: set a key of the entry ({'.'.join(path)}.KEY=VALUE), or "
                          f"the whole list ({'.'.join(path[:-1])}=[...])")
    node[path[-1]] = value


def config_from_dict(data: dict) -> FDConfig:
    """Build and check an :class:`FDConfig` from a nested dict (YAML sections)."""
    return _build(FDConfig, data)


def load_config(path: Optional[str | Path] = None, overrides: tuple[str, ...] | list[str] = ()) -> FDConfig:
    """Defaults <- YAML file or shipped config name (with `base:` includes) <- dotted overrides; validated."""
    data: dict = _read_yaml(resolve_config(path)) if path else {}
    for ov in overrides:
        keys, value = parse_override(ov)
        _set_path(data, keys, value)
    return config_from_dict(data)


def _without_unused_teacher(data: dict) -> dict:
    model = data.get("model")
    if isinstance(model, dict) and model.get("teachers"):
        model.pop("teacher", None)  # at its defaults (ModelConfig refuses both): it would read as a CLIP teacher
    return data


def to_dict(cfg: Any) -> dict:
    """A config as saved (config.yaml, checkpoints, trackers): every field, but a run of several teachers
    without the unused ``model.teacher`` section."""
    return _without_unused_teacher(dataclasses.asdict(cfg))


def dump_config(cfg: FDConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
