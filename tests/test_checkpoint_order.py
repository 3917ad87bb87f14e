"""Which checkpoint is the newest: by write sequence, then images seen, never by the step in its name (a
step is another number of images once the world size changes); checkpoints of earlier versions, named
``step_XXXXXXXX`` with a meta.json without either, are still found, ordered and resumed."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from fdfast import checkpoint as ckpt
from fdfast.trainer import train


def _state(step: int, total_batch: int, steps_per_epoch: int, images: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "step": step, "total_batch": total_batch,
            "steps_per_epoch": steps_per_epoch, "images": images}


def _make_legacy(folder: Path, *, world_size: int | None = None, batch_size: int | None = None) -> None:
    """Rewrite a checkpoint as earlier versions wrote it: no write sequence, images, geometry or metrics step
    (state.pt rewritten without them, its size and hash updated in meta.json)."""
    meta = ckpt.read_meta(folder)
    state = torch.load(folder / "state.pt", weights_only=True)
    for key in ("images", "metrics_step"):
        state.pop(key, None)
    torch.save(state, folder / "state.pt")
    meta["files"]["state.pt"] = {"size": (folder / "state.pt").stat().st_size,
                                 "sha256": ckpt.file_sha256(folder / "state.pt")}
    for key in ("seq", "images", "total_batch", "steps_per_epoch"):
        meta.pop(key, None)
    if world_size is not None:
        meta["world_size"] = world_size
    if batch_size is not None:
        meta["config"] = {"train": {"batch_size": batch_size, "accum_steps": 1}}
    (folder / "meta.json").write_text(json.dumps(meta))
    assert ckpt.verify(folder) is None


def test_a_checkpoint_of_another_geometry_is_never_overwritten(tmp_path):
    # 1 process: step 8 = image 64; then 2 processes (16 images per step): step 8 = image 128
    one = ckpt.save_checkpoint(tmp_path, 8, _state(8, 8, 8, 64), keep=5)
    two = ckpt.save_checkpoint(tmp_path, 8, _state(8, 16, 4, 128), keep=5)
    assert one.name == "step_00000008" and two.name == "step_00000008_img128"
    assert ckpt.verify(one) is None and ckpt.verify(two) is None
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == [one.name, two.name]
    assert ckpt.find_latest(tmp_path) == two
    # the same position of the same geometry (a stop right after a periodic save) replaces its folder
    again = ckpt.save_checkpoint(tmp_path, 8, _state(8, 16, 4, 128), keep=5)
    assert again == two and len(ckpt.list_checkpoints(tmp_path)) == 2


def test_the_newest_is_the_last_written_not_the_highest_step(tmp_path):
    """1 process to step 12 (image 96), resumed on 2 processes at step 6: their step 8 is image 128."""
    for step in (4, 8, 12):
        ckpt.save_checkpoint(tmp_path, step, _state(step, 8, 16, step * 8), keep=3)
    newest = ckpt.save_checkpoint(tmp_path, 8, _state(8, 16, 8, 128), keep=3)
    assert ckpt.find_latest(tmp_path) == newest
    # pruning keeps the newest three: the 1-process step 4 (image 32) goes, step 12 (image 96) stays
    assert [(s, ckpt.read_meta(p)["images"]) for s, p in ckpt.list_checkpoints(tmp_path)] == [(8, 64), (12, 96),
                                                                                              (8, 128)]


def test_checkpoints_of_earlier_versions_are_ordered_by_the_images_their_meta_implies(tmp_path):
    """What an earlier version left after 1 -> 2 processes: step_00000020 of 1 process (image 160) and a later
    step_00000015 of 2 (image 240). The newest is step 15, and a new checkpoint is newer than both."""
    a = ckpt.save_checkpoint(tmp_path, 20, {"model": {}, "step": 20})
    b = ckpt.save_checkpoint(tmp_path, 15, {"model": {}, "step": 15})
    _make_legacy(a, world_size=1, batch_size=8)
    _make_legacy(b, world_size=2, batch_size=8)
    assert [p.name for _, p in ckpt.list_checkpoints(tmp_path)] == ["step_00000020", "step_00000015"]
    assert ckpt.find_latest(tmp_path) == b
    c = ckpt.save_checkpoint(tmp_path, 16, _state(16, 16, 8, 256), keep=5)
    assert ckpt.find_latest(tmp_path) == c and ckpt.read_meta(c)["seq"] == 1


def _records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_resumes_from_the_step_folders_of_earlier_versions(tiny_cfg, tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    train(tiny_cfg(train={"output_dir": str(full)}))
    train(tiny_cfg(train={"output_dir": str(part), "max_steps": 6}, checkpoint={"every": 3}))
    for _, folder in ckpt.list_checkpoints(part):
        _make_legacy(folder)
    capsys.readouterr()
    summary = train(tiny_cfg(train={"output_dir": str(part)}, checkpoint={"every": 3}))
    assert f"resumed from {ckpt.ckpt_root(part) / 'step_00000006'} at step 6" in capsys.readouterr().out
    assert summary["step"] == 16 and summary["images"] == 16 * 8
    losses = [(r["step"], r["loss"]) for r in _records(part) if "kind" not in r]
    assert losses == [(r["step"], r["loss"]) for r in _records(full) if "kind" not in r]
    assert [r["images"] for r in _records(part)] == [8 * s for s in range(1, 17)]
    assert ckpt.read_meta(ckpt.find_latest(part))["images"] == 128


def test_a_resume_drops_the_records_logged_after_its_checkpoint(tmp_path):
    from fdfast.records import truncate_metrics
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "kind": "eval", "top1": 3.0},
             {"step": 3, "loss": 0.8}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')  # a line cut by a kill
    truncate_metrics(path, 2, drop_eval_at_step=True)  # the evaluation at step 2 is done again
    assert _records(tmp_path) == lines[:2]


def test_pruning_leaves_a_folder_whose_meta_cannot_be_read(tmp_path):
    """Such a folder is never resumed from, but an unreadable meta.json may be a passing file-system error:
    deleting what might be the newest checkpoint is not pruning's call."""
    first = ckpt.save_checkpoint(tmp_path, 1, _state(1, 8, 16, 8), keep=1)
    garbled = ckpt.ckpt_root(tmp_path) / "step_00000009"
    garbled.mkdir()
    (garbled / "meta.json").write_text("{")
    newest = ckpt.save_checkpoint(tmp_path, 2, _state(2, 8, 16, 16), keep=1)
    assert not first.exists() and garbled.exists() and ckpt.find_latest(tmp_path) == newest
