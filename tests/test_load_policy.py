"""The one load policy: files whose unpickling would run code are refused wherever fdfast reads them.

The payload is a pickle whose ``__reduce__`` calls ``io.open(marker, "w")``: a global torch's weights-only
loader has no rule of its own for, so a refusal proves the policy refused it (and a trusted load proves the
file really creates the marker). TorchScript archives are read without ``torch.jit.load``.
"""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import _release_files as RF
from conftest import tiny_dict
from fdfast.checkpoint import find_latest, load_checkpoint, save_checkpoint
from fdfast.cli import analyze as analyze_cli
from fdfast.cli import eval as eval_cli
from fdfast.cli import export as export_cli
from fdfast.cli import train as train_cli
from fdfast.config import ConfigError, config_from_dict, load_config
from fdfast.interop.reading import (CheckpointReadError, UnsafePickleError, load_torch_file,
                                    read_torchscript_state_dict)
from fdfast.trainer import train
from pipelines.generate import make_image_folder

ROOT = Path(__file__).resolve().parents[1]


class CreatesMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (io.open, (self.marker, "w"))


def evil_file(path: Path, marker: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(2)}, "extra": CreatesMarker(marker)}, path)
    return path


def test_a_trusted_load_really_runs_the_payload(tmp_path):
    marker = tmp_path / "marker"
    path = evil_file(tmp_path / "evil.pth", marker)
    with pytest.raises(UnsafePickleError) as e:
        load_torch_file(path)
    assert not marker.exists()
    assert str(path) in str(e.value) and "io.open" in str(e.value)
    assert "--trust-pickle to the command" in str(e.value) and "--set" not in str(e.value)
    with pytest.warns(UserWarning, match=r"io\.open.*weights_only=False.*runs code"):
        obj = load_torch_file(path, trust_pickle=True)
    obj["extra"].close()
    assert marker.exists()  # the control: this file does run code when fully unpickled


def test_fdfast_checkpoints_have_no_opt_in(tmp_path):
    marker = tmp_path / "marker"
    path = evil_file(tmp_path / "state.pt", marker)
    with pytest.raises(UnsafePickleError, match="not written by fdfast-train") as e:
        load_torch_file(path, trust_pickle=True, opt_in=None)
    assert "trust_pickle" not in str(e.value) and not marker.exists()


def _train(cfg_file: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "fdfast.cli.train", "--config", str(cfg_file)]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.Popen(cmd, env=env, cwd=cfg_file.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
def test_cli_refuses_the_file_as_teacher_pretrained_and_resume_checkpoint(tmp_path):
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(tiny_dict(tmp_path)))
    markers = {case: tmp_path / f"marker_{case}" for case in ("teacher", "pretrained", "resume")}
    teacher = evil_file(tmp_path / "teacher.pth", markers["teacher"])
    pretrained = evil_file(tmp_path / "pretrained.pth", markers["pretrained"])
    # a complete checkpoint folder (meta.json with sizes) whose state.pt carries the payload
    resume_run = tmp_path / "resume_run"
    folder = save_checkpoint(resume_run, 4, {"model": {}, "step": 4, "extra": CreatesMarker(markers["resume"])})
    runs = {  # started together: three interpreters importing torch are the slow part
        "teacher": _train(cfg_file, f"model.teacher.weights={teacher}", f"train.output_dir={tmp_path / 'r1'}"),
        "pretrained": _train(cfg_file, "train.task=finetune", "model.student.num_classes=4",
                             f"model.pretrained={pretrained}", f"train.output_dir={tmp_path / 'r2'}"),
        "resume": _train(cfg_file, f"train.output_dir={resume_run}"),
    }
    files = {"teacher": teacher, "pretrained": pretrained, "resume": folder / "state.pt"}
    for case, proc in runs.items():
        out, err = proc.communicate(timeout=600)
        lines = [line for line in err.splitlines() if line.startswith("fdfast-train:")]
        assert proc.returncode == 2, (case, out, err)
        assert "Traceback" not in err and len(lines) == 1, (case, err)
        # a refused resume checkpoint is skipped like a damaged one; with none left the run refuses to
        # start again from step 0, naming each skipped checkpoint and why
        kind = "CheckpointLoadError" if case == "resume" else "UnsafePickleError"
        assert lines[0].startswith(f"fdfast-train: {kind}:") and "io.open" in lines[0], lines
        assert str(files[case]) in lines[0]
        assert ("--trust-pickle" in lines[0]) == (case != "resume") and "--set" not in lines[0], lines
        assert not markers[case].exists(), case


# ----------------------------------------------------------------------------------------------
# Only the command line grants trust: never a config, its base: chain, a checkpoint or a run folder
# ----------------------------------------------------------------------------------------------
def _one_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}:")]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def test_a_config_that_grants_trust_is_refused_naming_the_switch(tmp_path, capsys):
    marker = tmp_path / "marker"
    teacher = evil_file(tmp_path / "teacher.pth", marker)
    cfg = tiny_dict(tmp_path, model={"teacher": {"weights": str(teacher)}})
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({**cfg, "model": {**cfg["model"], "trust_pickle": True}}))
    child = tmp_path / "child.yaml"
    child.write_text(yaml.safe_dump({"base": "base.yaml", "train": {"max_steps": 1}}))
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(cfg))
    for path, overrides in ((base, []), (child, []), (plain, ["model.trust_pickle=true"]),
                            (plain, ["model.pretrained_trust_pickle=false"])):
        with pytest.raises(ConfigError, match="only the command line") as e:
            load_config(path, overrides)
        assert "--trust-pickle" in str(e.value) and "trust_pickle" in str(e.value)
        assert train_cli.main(["--config", str(path), *[a for o in overrides for a in ("--set", o)]]) == 2
        line = _one_line(capsys, "fdfast-train")
        assert "--trust-pickle" in line and "refused" in line, line
    assert not marker.exists() and not (tmp_path / "run").exists()
    assert not hasattr(config_from_dict(cfg).model, "trust_pickle")


def _plant(src_run: Path, dst_run: Path, **model_keys) -> Path:
    """A copy of ``src_run``'s newest checkpoint (and its config.yaml) whose saved config sets ``model_keys``,
    as an earlier version wrote them or as someone sharing the folder planted them."""
    state, _ = load_checkpoint(find_latest(src_run))
    config = state["config"]
    for key, value in model_keys.items():
        node = config["model"]
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    config["train"]["output_dir"] = str(dst_run)
    body = {k: v for k, v in state.items() if k not in ("format", "version")}
    save_checkpoint(dst_run, int(state["step"]), body, config=config)
    (dst_run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dst_run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trust")
    train(config_from_dict(tiny_dict(tmp, train={"max_steps": 2})))
    return tmp / "run"


def test_a_run_folder_cannot_grant_itself_trust(tiny_run, tmp_path, capsys):
    marker = tmp_path / "marker"
    teacher = evil_file(tmp_path / "teacher.pth", marker)
    evil = _plant(tiny_run, tmp_path / "evil", **{"trust_pickle": True, "teacher.weights": str(teacher)})
    analyze = [str(evil), "--synthetic", "--num-images", "2", "--batch-size", "2", "--no-landscape", "-q"]
    # fdfast-analyze rebuilds the run's teacher from the saved config: refused, naming its own switch
    assert analyze_cli.main([*analyze, "--out", str(tmp_path / "a1")]) == 2
    line = _one_line(capsys, "fdfast-analyze")
    assert str(teacher) in line and "--trust-pickle" in line and "--set" not in line, line
    assert not marker.exists()
    # fdfast-eval and fdfast-export read the checkpoint (the key is ignored) and build no teacher
    assert eval_cli.main([str(evil), "--data", str(tmp_path), "--workers", "0"]) == 2
    assert "no classifier head" in _one_line(capsys, "fdfast-eval")
    assert export_cli.main([str(evil), "--format", "timm", "--out", str(tmp_path / "exported"), "-q"]) == 0
    assert not marker.exists()
    # resuming with the run's own config.yaml: the config is refused before anything is built or written
    before = sorted(p.name for p in evil.iterdir())
    assert train_cli.main(["--config", str(evil / "config.yaml")]) == 2
    assert "--trust-pickle" in _one_line(capsys, "fdfast-train")
    # resuming with a clean config that names the same teacher: refused as any untrusted teacher is
    clean = yaml.safe_load((evil / "config.yaml").read_text())
    del clean["model"]["trust_pickle"]
    (tmp_path / "clean.yaml").write_text(yaml.safe_dump(clean))
    assert train_cli.main(["--config", str(tmp_path / "clean.yaml")]) == 2
    assert "UnsafePickleError" in _one_line(capsys, "fdfast-train")
    assert not marker.exists() and sorted(p.name for p in evil.iterdir()) == before
    # the control: the person at the keyboard can grant it, and then the planted file does run
    assert analyze_cli.main([*analyze, "--out", str(tmp_path / "a2"), "--trust-pickle"]) == 2
    assert marker.exists()


def test_old_run_folders_with_the_key_still_load_and_resume(tiny_run, tmp_path, capsys):
    old = _plant(tiny_run, tmp_path / "old", trust_pickle=False)
    assert export_cli.main([str(old), "--format", "timm", "--out", str(tmp_path / "exported"), "-q"]) == 0
    assert analyze_cli.main([str(old), "--synthetic", "--num-images", "2", "--batch-size", "2", "--no-landscape",
                             "-q", "--out", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    del cfg["model"]["trust_pickle"]
    cfg["train"]["max_steps"] = 3
    summary = train(config_from_dict(cfg))
    assert summary["step"] == 3
    assert "model.trust_pickle" not in capsys.readouterr().err  # not even reported as a change
    assert "trust_pickle" not in (old / "config.yaml").read_text()


def test_each_command_names_its_own_switch(tmp_path, capsys):
    marker = tmp_path / "marker"
    weights = evil_file(tmp_path / "student.pth", marker)
    make_image_folder(tmp_path / "val", num_classes=2, per_class=1, sizes=((32, 32),))
    assert eval_cli.main([str(weights), "--data", str(tmp_path / "val"), "--workers", "0",
                          "--json", str(tmp_path / "new" / "r.json")]) == 2
    line = _one_line(capsys, "fdfast-eval")
    assert "--trust-pickle" in line and "--set" not in line, line
    assert not (tmp_path / "new").exists()  # a refused command leaves no empty output folder
    assert analyze_cli.main([str(weights), "--synthetic", "--out", str(tmp_path / "a"), "-q"]) == 2
    line = _one_line(capsys, "fdfast-analyze")
    assert "--trust-pickle" in line and "--set" not in line, line
    assert analyze_cli.main(["--teacher", str(weights), "--synthetic", "--out", str(tmp_path / "a"), "-q"]) == 2
    line = _one_line(capsys, "fdfast-analyze")
    assert "--trust-pickle" in line and "--set" not in line, line
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# TorchScript archives without torch.jit.load
# ----------------------------------------------------------------------------------------------
def test_torchscript_reader_equals_jit_state_dict(tmp_path):
    path = RF.write_openai_clip(tmp_path / "ViT-tiny.pt")
    ours = read_torchscript_state_dict(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch >= 2.9 marks torch.jit as deprecated
        ref = torch.jit.load(str(path), map_location="cpu").state_dict()
    assert list(ours) == list(ref) and len(ours) > 30  # visual.*, the text tower, input_resolution, ...
    for k, v in ref.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape and torch.equal(ours[k], v), k
    assert ours["visual.conv1.weight"].dtype == torch.float16 and ours["input_resolution"].item() == 32
    assert load_torch_file(path).keys() == ours.keys()  # the policy dispatches archives to this reader


class ScriptedWithLists(torch.nn.Module):
    """Scripted (not traced): list and dict attributes make TorchScript pickle its type-tag helpers."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 2)
        self.register_buffer("scale", torch.arange(2.0))
        self.sizes: list[int] = [1, 2, 3]
        self.weights: list[float] = [0.5]
        self.names: dict[str, int] = {"a": 1}

    def forward(self, x):
        return self.proj(x) * self.scale * self.sizes[0] * self.weights[0] * self.names["a"]


def test_torchscript_reader_reads_scripted_modules_with_list_attributes(tmp_path):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(ScriptedWithLists()), str(path))
        ref = torch.jit.load(str(path)).state_dict()
    with zipfile.ZipFile(path) as zf:  # the case this test is about
        assert b"restore_type_tag" in zf.read("scripted/data.pkl")
    ours = read_torchscript_state_dict(path)
    assert list(ours) == list(ref) and set(ref) == {"scale", "proj.weight", "proj.bias"}
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def _archive_with_data_pkl(src: Path, dst: Path, data_pkl: bytes) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            raw = data_pkl if info.filename.endswith("/data.pkl") else zin.read(info.filename)
            zout.writestr(info, raw)
    return dst


def test_torchscript_archive_with_a_foreign_global_is_refused(tmp_path):
    marker = tmp_path / "marker"
    src = RF.write_openai_clip(tmp_path / "clip.pt")
    bad = _archive_with_data_pkl(src, tmp_path / "bad.pt", pickle.dumps(CreatesMarker(marker), protocol=2))
    with pytest.raises(UnsafePickleError) as e:
        read_torchscript_state_dict(bad)
    assert "io.open" in str(e.value) and str(bad) in str(e.value) and not marker.exists()

    broken = _archive_with_data_pkl(src, tmp_path / "truncated.pt", b"\x80\x02}q\x00(")  # a pickle cut short
    with pytest.raises(CheckpointReadError, match="cannot read this TorchScript archive"):
        read_torchscript_state_dict(broken)
