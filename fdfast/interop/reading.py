"""One load policy for every file fdfast reads: teachers, ``model.pretrained``, resume checkpoints, official FD files.

A pickle can run any code when it is loaded, so a file is read with ``torch.load(weights_only=True)``
(tensors, containers, plain values) plus an explicit allow-list of the data-only classes that real release
files pickle next to their weights: EsViT's / DINO's ``argparse.Namespace`` and the official FD files' yacs
``CfgNode``, which is rebuilt as a plain ``OrderedDict`` (yacs is neither imported nor run). Any other
pickled global is refused with :class:`UnsafePickleError`, which names the globals, the file and the opt-in.
Permission to run such a file comes only from the person at the keyboard: ``trust_pickle=True``, which every
command that reads files sets from its own :data:`TRUST_SWITCH` and never from a config, a checkpoint or a
run folder. Only then is the file loaded with ``weights_only=False``, and a warning says that code stored in
the file runs. Nothing falls back silently.

OpenAI's CLIP ``.pt`` files are TorchScript archives, and ``torch.jit.load`` runs the ``__setstate__``
methods stored in them. :func:`read_torchscript_state_dict` instead unpickles the archive's ``data.pkl``
with an unpickler that knows only the globals TorchScript's own pickler writes for data (TorchScript
classes, rebuilt as inert attribute holders; storage types; the tensor rebuild function; ``OrderedDict``;
the list / type-tag helpers of ``torch.jit._pickle``, which return their argument) and collects the
tensors, so no code from the file runs. Traced archives such as OpenAI's keep only parameters and buffers as tensor attributes
(plain tensors become constants), so the result equals ``torch.jit.load(path).state_dict()``.
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import torch

from ..constants import TRUST_SWITCH
from ..errors import UserError

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
_MAX_LISTED = 12  # keys named in an error message before "... and N more"


class CheckpointReadError(UserError, ValueError):
    """The file is missing, unreadable or not a checkpoint of the expected kind; names the file."""


class UnsafePickleError(CheckpointReadError):
    """The file pickles globals the load policy does not allow; names them, the file and the opt-in."""


class _CfgNodeAsDict:
    """Stand-in for ``yacs.config.CfgNode`` while unpickling official FD files.

    The weights-only unpickler only creates allowlisted classes, and its SETITEMS opcode only fills plain
    dicts / OrderedDicts, so a dict *subclass* cannot be rebuilt even when allowlisted. Mapping the name to a
    class whose ``__new__`` returns an ``OrderedDict`` rebuilds the config as plain data (items via SETITEMS,
    CfgNode's bookkeeping attributes via BUILD into ``__dict__``).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "collections.OrderedDict":  # type: ignore[misc]
        return collections.OrderedDict()


# Neither class has a __setstate__ or __reduce__ that could run code when the weights-only unpickler
# rebuilds it; nothing else in a file gains any permission from this list.
DATA_ONLY_GLOBALS: list = [(_CfgNodeAsDict, "yacs.config.CfgNode"), argparse.Namespace]
_DATA_ONLY_NAMES = {"yacs.config.CfgNode", "argparse.Namespace"}


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def fmt_keys(keys: Sequence[str], limit: int = _MAX_LISTED) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def strip_wrapper_prefixes(sd: Mapping[str, Any]) -> dict:
    """Keys without the ``module.`` (DDP) / ``_orig_mod.`` (torch.compile) wrapper prefixes, in any nesting."""
    out = {}
    for k, v in sd.items():
        changed = True
        while changed:  # 'module._orig_mod.x' (DDP around a compiled module) needs both stripped
            changed = False
            for p in WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def check_state_dict(sd: Any, path: Path, what: str) -> dict:
    """``sd`` as a dict, after checking it is a non-empty mapping of tensors (the message names ``what``)."""
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointReadError(f"{path}: {what} is not a non-empty mapping of tensors "
                                  f"(got {type(sd).__name__}); is this a model checkpoint?")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointReadError(
            f"{path}: {what} is not a state dict: {fmt_keys(bad)} hold non-tensor values "
            f"(e.g. {bad[0]!r}: {type(sd[bad[0]]).__name__})")
    return dict(sd)


def load_safetensors(path: Path) -> dict:
    from safetensors.torch import load_file  # noqa: PLC0415 - only needed for .safetensors input
    try:
        return load_file(str(path), device="cpu")
    except Exception as e:
        raise CheckpointReadError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


# ----------------------------------------------------------------------------------------------
# The policy
# ----------------------------------------------------------------------------------------------
def _refusal(path: Path, names: Sequence[str], opt_in: Optional[str]) -> UnsafePickleError:
    """``opt_in`` names the switch of the command that reads the file (None: no switch applies)."""
    what = f"it pickles {', '.join(names)}, which can run code when unpickled"
    if opt_in is None:
        return UnsafePickleError(
            f"{path}: refusing to load: {what}. fdfast training checkpoints hold only tensors and plain values, "
            "so this file was not written by fdfast-train (or was altered): remove or replace it")
    return UnsafePickleError(
        f"{path}: refusing to load: {what}; only tensors, plain values, argparse.Namespace and yacs CfgNode are "
        f"read by default. If you trust where the file came from, add {opt_in} to the command (Python: "
        "trust_pickle=True); that runs the code stored in the file")


def _warn_trusted(path: Path, names: Sequence[str]) -> None:
    warnings.warn(f"{path}: it pickles {', '.join(names)}, so it is loaded with weights_only=False as "
                  f"{TRUST_SWITCH} (trust_pickle=True) allows; this runs code stored in the file", UserWarning,
                  stacklevel=3)


def _refused_globals(path: Path, error: Exception) -> tuple[list[str], str]:
    """(globals a weights-only load refused, torch's reason); no globals when the file is damaged instead."""
    # torch wraps every weights-only failure in one long message; the cause follows this marker
    text = str(error)
    reason = text.split("WeightsUnpickler error:", 1)[-1].strip().split("\n", 1)[0].strip() or first_line(error)
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # legacy (non-zip) files cannot be scanned: read the names from torch's message
        found = re.findall(r"GLOBAL (\S+) was not an allowed global", text)
    names = [g for g in found if g not in _DATA_ONLY_NAMES]
    if not names and re.search(r"global|unrecognized function|Can only (build|create)", reason):
        names = [f"an object the safe loader cannot rebuild ({reason})"]
    return names, reason


def load_torch_file(path: str | os.PathLike, *, trust_pickle: bool = False, map_location: Any = "cpu",
                    mmap: bool = False, opt_in: Optional[str] = TRUST_SWITCH) -> Any:
    """Read a PyTorch file under the load policy (see the module docstring).

    A TorchScript archive comes back as its state dict (:func:`read_torchscript_state_dict`). ``mmap``
    memory-maps zip files, so unused parts (a training checkpoint's optimizer) are never read. ``opt_in`` is
    the command-line switch that allows an unsafe load, named in the refusal; ``None`` for files where no switch
    applies (fdfast's own checkpoints), which are refused whatever ``trust_pickle`` says. Raises
    :class:`UnsafePickleError` for a refused file and :class:`CheckpointReadError` for an unreadable one.
    """
    path = Path(path)
    if is_torchscript_archive(path):
        return read_torchscript_state_dict(path, trust_pickle=trust_pickle, opt_in=opt_in)
    try:
        with torch.serialization.safe_globals(DATA_ONLY_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True,
                              mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        names, reason = _refused_globals(path, e)
        if not names:
            raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint ({reason})") from None
        if not trust_pickle or opt_in is None:
            raise _refusal(path, names, opt_in) from None
        _warn_trusted(path, names)
    except FileNotFoundError:
        raise CheckpointReadError(f"{path}: no such file") from None
    except Exception as e:
        raise CheckpointReadError(f"{path}: not a readable PyTorch checkpoint ({first_line(e)})") from None
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointReadError(f"{path}: cannot read even with {TRUST_SWITCH} ({first_line(e)})") from None


# ----------------------------------------------------------------------------------------------
# TorchScript archives without torch.jit.load
# ----------------------------------------------------------------------------------------------
def _archive_prefix(names: Sequence[str]) -> Optional[str]:
    """'<root>/' of a TorchScript archive (data.pkl plus constants.pkl or code/), else None."""
    for name in names:
        root, _, rest = name.partition("/")
        if rest == "data.pkl" and (f"{root}/constants.pkl" in names
                                   or any(n.startswith(f"{root}/code/") for n in names)):
            return root + "/"
    return None


def is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return _archive_prefix(zf.namelist()) is not None


class _ScriptObject:
    """A TorchScript object rebuilt as plain data: its attributes, no methods. ``__slots__`` leaves no
    instance ``__dict__`` in which a pickle could plant a ``__setstate__`` of its own."""

    __slots__ = ("attributes",)

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"TorchScript object state is a {type(state).__name__}, not a dict")
        self.attributes = state


class _StorageType(NamedTuple):  # a tuple, so a pickle cannot call it
    dtype: torch.dtype


class _Storage(NamedTuple):
    data: torch.UntypedStorage
    dtype: torch.dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, requires_grad: bool = False,
                    backward_hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """What ``torch._utils._rebuild_tensor_v2`` does for a plain CPU tensor; ``set_`` checks the bounds."""
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor without a storage record")
    return torch.empty(0, dtype=storage.dtype).set_(storage.data, int(offset), tuple(size), tuple(stride))


def _as_is(value: Any, type_tag: Any = None) -> Any:
    """``torch.jit._pickle``'s ``build_*list`` / ``restore_type_tag``: the plain value (the tag only matters
    to TorchScript's static types)."""
    return value


_JIT_PICKLE_HELPERS = ("build_intlist", "build_doublelist", "build_boollist", "build_tensorlist", "restore_type_tag")


class _ScriptUnpickler(pickle.Unpickler):
    def __init__(self, zf: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(zf.read(prefix + "data.pkl")))
        self.zf, self.prefix = zf, prefix
        self.classes: dict[str, type] = {}
        self.storages: dict[str, _Storage] = {}
        self.refused: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return self.classes.setdefault(f"{module}.{name}", type(name, (_ScriptObject,), {"__slots__": ()}))
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _JIT_PICKLE_HELPERS:
            return _as_is
        self.refused.append(f"{module}.{name}")
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        key = pid[2]
        if key not in self.storages:  # tensors that share a storage (views) share it here too
            raw = self.zf.read(f"{self.prefix}data/{key}")
            data = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            self.storages[key] = _Storage(data, pid[1].dtype)
        return self.storages[key]


def _collect_tensors(root: Any) -> dict:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    stack = [("", root)]
    while stack:
        prefix, obj = stack.pop()
        if id(obj) in seen:  # a pickle can build reference cycles
            continue
        seen.add(id(obj))
        later = []
        for name, value in getattr(obj, "attributes", {}).items():
            if isinstance(value, torch.Tensor):
                out[prefix + str(name)] = value
            elif isinstance(value, _ScriptObject):
                later.append((f"{prefix}{name}.", value))
        stack.extend(reversed(later))  # depth first, in attribute order, like Module.state_dict
    return out


def read_torchscript_state_dict(path: str | os.PathLike, *, trust_pickle: bool = False,
                                opt_in: Optional[str] = TRUST_SWITCH) -> dict:
    """The tensors of a TorchScript archive by attribute path (``visual.conv1.weight``), read without
    ``torch.jit.load``; an archive that pickles anything else is refused like any file (see
    :func:`load_torch_file`), and only ``trust_pickle`` hands it to ``torch.jit.load``."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            prefix = _archive_prefix(zf.namelist())
            if prefix is None:
                raise CheckpointReadError(f"{path}: not a TorchScript archive (no <root>/data.pkl with code/)")
            unpickler = _ScriptUnpickler(zf, prefix)
            try:
                return _collect_tensors(unpickler.load())
            except (pickle.UnpicklingError, RuntimeError, TypeError, ValueError, KeyError, EOFError) as e:
                if not unpickler.refused:
                    raise CheckpointReadError(f"{path}: cannot read this TorchScript archive ({first_line(e)})") \
                        from None
                refused = unpickler.refused
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointReadError(f"{path}: cannot read this TorchScript archive ({first_line(e)})") from None
    if not trust_pickle or opt_in is None:
        raise _refusal(path, refused, opt_in)
    _warn_trusted(path, refused)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.9 marks torch.jit as deprecated
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
