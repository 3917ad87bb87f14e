"""Resuming a run: which checkpoint, whether the config still fits it, and where in the data to continue.

* **Which checkpoint.** ``train.resume=true`` (default): the newest complete, intact checkpoint of
  ``output_dir`` (newest by write sequence, then images seen: see ``fdfast.checkpoint``); damaged or
  incomplete ones are skipped with a warning and the next older is tried, also when one verifies but
  fails to load. ``train.resume=PATH``: that checkpoint (a ``step_*`` folder
  or its ``state.pt``) when ``output_dir`` has none of its own yet; once the run has written checkpoints
  a rerun continues from its own latest, so a restarted job never goes back. ``false``: start fresh.
* **Config drift.** The new resolved config is compared with the one the checkpoint was written with.
  Keys that change the model, the data geometry, the augmentation, the optimizer or the schedule are
  refused with a diff (exit 2) unless ``fdfast-train --allow-config-change`` is given; the keys in
  :data:`FREE_KEYS` (cadences, stop step, loaders' speed knobs, kernels, paths) may change and are logged.
  The keys in :data:`ARCH_KEYS` (the shapes of the saved weights, the task) are refused even with the switch:
  the checkpoint's weights cannot continue as another network. Keys only the command line may set
  (``model.trust_pickle`` of earlier versions) are dropped from the saved config unread.
* **World size.** The data position is counted in images: ``(step within epoch) x total batch`` of the
  run that wrote the checkpoint, mapped onto the new total batch; the run's count of images seen goes on
  from the checkpoint's (less the images of the epoch read again). Under the torchvision and nvJPEG
  backends the ranks' shards interleave one global permutation, so the images left in the epoch are
  exactly the same; DALI and FFCV cut contiguous shards, so the count is the same but not the set. Ranks
  without a saved RNG state start from ``seed + rank`` (drop path, augmentation draws differ from an
  uninterrupted run: not bit-exact). The LR keeps following the schedule, scaled by the new total batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

from .checkpoint import CheckpointLoadError, find_latest, list_checkpoints, valid_checkpoints, verify
from .config.load import without_command_line_keys
from .interop.conversion import shape_mismatches, state_dict_mismatch
from .interop.reading import fmt_keys
from .errors import UserError

# Keys that may differ between the checkpoint's config and the rerun's (prefix match on dotted keys).
FREE_KEYS = (
    "log.", "checkpoint.", "compile.", "train.max_steps", "train.eval_every", "train.output_dir", "train.resume",
    "train.tf32", "train.cudnn_benchmark", "train.channels_last", "train.precision", "model.attention",
    "model.pretrained", "model.grad_checkpointing", "model.teacher.bf16", "data.train",
    "data.val", "data.backend", "data.num_classes",  # a classifier's class count is guarded as its head's size
    "data.num_workers", "data.prefetch", "data.ffcv_os_cache", "data.ffcv_order", "data.dali_hw_decoder_load",
    "data.on_bad_image", "train.knn_", "data.knn_",
)
# Keys that change what the saved weights are (their shapes, the teacher they regress, the task): refused
# even under --allow-config-change, which is for optimizer and schedule changes.
ARCH_KEYS = (
    "model.student.arch", "model.student.img_size", "model.student.patch_size", "model.student.embed_dim",
    "model.student.depth", "model.student.num_heads", "model.student.window_size", "model.student.mlp_ratio",
    "model.student.shared_rel_pos_bias", "model.student.num_classes", "model.teacher.kind", "model.teacher.model",
    "model.teacher.model_kwargs", "model.teacher.img_size", "train.task",
)


class ConfigDrift(UserError):
    """The rerun's config changes what the checkpoint was trained with."""


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and not key.endswith("model_kwargs"):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``(key, old value, new value)`` for every dotted key whose value differs (missing = None)."""
    a, b = flatten(old), flatten(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def check_config_drift(old: Optional[dict], new: dict, *, allow: bool, where: Path,
                       log: Callable[[str], None]) -> None:
    """Raise :class:`ConfigDrift` naming every refused change (unless ``allow``; architecture changes
    whatever ``allow`` says); log the allowed ones."""
    if not old:
        return
    changes = config_changes(without_command_line_keys(old), new)
    arch = [c for c in changes if c[0] in ARCH_KEYS]
    if arch:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in arch)
        raise ConfigDrift(f"the config changes the architecture {where} was trained with: {diff}. Its weights "
                          "cannot continue as another network (--allow-config-change covers optimizer and schedule "
                          "changes only): restore these keys, or start a new train.output_dir")
    refused = [c for c in changes if not c[0].startswith(FREE_KEYS)]
    for key, a, b in changes:
        if (key, a, b) not in refused or allow:
            log(f"config change on resume: {key}: {a!r} -> {b!r}")
    if refused and not allow:
        diff = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in refused)
        raise ConfigDrift(f"the config differs from the one {where} was trained with: {diff}. These keys change "
                          "the model, data geometry, augmentation or optimizer; restore them, start a new "
                          "train.output_dir, or pass --allow-config-change to continue anyway")


def check_state_fits(state: dict, model: Any, optimizer: Any, *, where: Path) -> None:
    """Raise :class:`ConfigDrift` when the checkpoint's weights or optimizer state do not fit what this config
    builds (a change the config comparison lets through, e.g. under --allow-config-change), instead of the
    ``load_state_dict`` traceback: the first mismatching keys and shapes, or the parameter groups."""
    saved, mine = state.get("model") or {}, model.state_dict()
    missing, unexpected = state_dict_mismatch(saved, mine)
    shapes = list(shape_mismatches(saved, mine).values())
    if missing or unexpected or shapes:
        what = "; ".join(f"{n} {fmt_keys(keys, 3)}" for n, keys in (("shapes differ:", shapes), ("missing:", missing),
                                                                   ("unexpected:", unexpected)) if keys)
        raise ConfigDrift(f"{where} holds the weights of another network than this config builds ({what}); "
                          "restore the model keys it was trained with, or start a new train.output_dir")
    groups = [len(g["params"]) for g in optimizer.state_dict()["param_groups"]]
    old = [len(g["params"]) for g in (state.get("optimizer") or {}).get("param_groups", [])]
    if groups != old:
        raise ConfigDrift(f"the optimizer's parameter groups ({len(groups)}) differ from those {where} was trained "
                          f"with ({len(old)}): optim.layer_decay or the weight-decay exemptions changed, and AdamW's "
                          "saved moments cannot follow; restore them, or start a new train.output_dir")


def archive_config(path: Path, new_text: str) -> Optional[Path]:
    """Keep the previous start's ``config.yaml`` beside the new one (``config.<UTC time>.yaml``) when it
    differs; returns where it went."""
    if not path.exists() or path.read_text() == new_text:
        return None
    stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).strftime("%Y%m%dT%H%M%S")
    dest = path.with_name(f"config.{stamp}.yaml")
    n = 1
    while dest.exists():
        dest = path.with_name(f"config.{stamp}-{n}.yaml")
        n += 1
    path.rename(dest)
    return dest


def will_resume(output_dir: Path, resume: Any) -> bool:
    """Whether the run will start from a checkpoint (its own, or the one ``train.resume`` names), decided
    without reading any: a task can then skip the weights it would only start from (``model.pretrained``).
    When none turns out usable the trainer refuses to start, so the answer never silently changes."""
    return resume is not False and (resume is not True or bool(list_checkpoints(output_dir)))


def choose_checkpoint(output_dir: Path, resume: Any, on_skip: Callable[[Path, str], None]) -> list[Path]:
    """Candidate checkpoints to resume from, best first (see the module docstring)."""
    if resume is False:
        return []
    own = list(valid_checkpoints(output_dir, on_skip))
    if own or resume is True:
        return own
    named = Path(str(resume))
    folder = named.parent if named.name == "state.pt" else named
    if not folder.exists():
        raise CheckpointLoadError(f"train.resume={str(resume)!r} does not exist; name a checkpoint folder "
                                  "(<run>/checkpoints/step_XXXXXXXX) or a run folder")
    if (folder / "meta.json").exists():
        why = verify(folder)
        if why is not None:
            raise CheckpointLoadError(f"train.resume={str(resume)!r} is not usable: {why}")
        return [folder]
    latest = find_latest(folder, on_skip)  # a run folder: its newest valid checkpoint
    if latest is None:
        found = "damaged or incomplete checkpoints only" if list_checkpoints(folder) else "no checkpoint"
        raise CheckpointLoadError(f"train.resume={str(resume)!r} holds {found}")
    return [latest]


@dataclass(frozen=True)
class Position:
    """Where to continue: the optimizer step in the new run's numbering, the images seen there, and how it
    was derived."""
    step: int
    exact: bool
    note: str
    images: int


def map_position(state: dict, steps_per_epoch: int, total_batch: int) -> Position:
    """The checkpoint's data position, counted in images, mapped onto this run's total batch."""
    old_step = int(state["step"])
    old_spe = int(state.get("steps_per_epoch") or steps_per_epoch)
    old_total = int(state.get("total_batch") or total_batch)
    seen = int(state.get("images", old_step * old_total))  # checkpoints before the count: one geometry
    if (old_spe, old_total) == (steps_per_epoch, total_batch):
        return Position(old_step, True, "", seen)
    epoch, within = divmod(old_step, old_spe)
    images = within * old_total
    new_within = min(images // total_batch, steps_per_epoch)
    step = epoch * steps_per_epoch + new_within
    exact = images % total_batch == 0
    note = (f"the checkpoint was written at step {old_step} with {old_total} images per step; continuing at "
            f"step {step} with {total_batch} images per step (epoch {epoch}, image {images} of the epoch"
            + ("" if exact else f", {images % total_batch} images of the epoch are seen twice") + ")")
    return Position(step, exact, note, seen - images + new_within * total_batch)
