"""fdfast-export: fdfast training checkpoint -> timm folder / official FD file, and its error handling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from fdfast.checkpoint import save_best, save_checkpoint
from fdfast.cli.export import main
from fdfast.config import DataConfig, StudentConfig, config_from_dict, to_dict
from fdfast.constants import CLIP_MEAN, CLIP_STD
from fdfast.interop import loading as L
from fdfast.models.student import build_student
from fdfast.objective import normalize
from pipelines.torchvision import build_transform

BEIT = dict(arch="beit", img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
SWIN = dict(arch="swinv2", img_size=32, patch_size=2, embed_dim=16, depth=[2, 2], num_heads=[2, 4], window_size=4)
ROOT = Path(__file__).resolve().parents[1]


def perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (1.0 if "relative_position_bias_table" in name else 0.1))
    return model.eval()


def images(n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))


def build(fields, num_classes=0, finetune=False):
    """The trainer's student for a ``model.student`` section, with timm's init."""
    cfg = StudentConfig(**fields, drop_path=0.0, num_classes=num_classes)
    return build_student(cfg, finetune=finetune or fields["arch"] == "swinv2", fd_init=False)


def write_fdfast_checkpoint(run: Path, student: nn.Module, projector, fields: dict, *, task="distill",
                            num_classes=0, step=20, data=None, train=None) -> Path:
    """A checkpoint as fdfast-train writes it: state['model'] is the DistillModel state (encoder.* + decoder.*)
    when distilling, the bare student when fine-tuning; the config is resolved through fdfast.config."""
    teacher = {"kind": "esvit"} if fields["arch"] == "swinv2" else {}
    cfg = config_from_dict({"model": {"student": {**fields, "num_classes": num_classes}, "teacher": teacher},
                            "data": {"num_classes": num_classes or 1000, **(data or {})},
                            "train": {"task": task, **(train or {})}})
    model = student.state_dict()
    if task == "distill":
        model = {f"encoder.{k}": v for k, v in model.items()}
        if projector is not None:
            model.update({f"decoder.{k}": v for k, v in projector.state_dict().items()})
    state = {"model": model, "optimizer": {"state": {}, "param_groups": []}, "step": step, "config": to_dict(cfg)}
    return save_checkpoint(run, step, state)


@pytest.fixture
def vit_run(tmp_path):
    student = perturbed(build(BEIT))
    projector = nn.Linear(32, 48)
    folder = write_fdfast_checkpoint(tmp_path / "run", student, projector, BEIT)
    return folder, student, projector


@torch.no_grad()
def test_timm_export_of_a_distilled_vit(vit_run, tmp_path, capsys):
    folder, student, _ = vit_run
    out = tmp_path / "exported"
    assert main([str(folder), "--format", "timm", "--out", str(out)]) == 0
    assert str(out / "model.safetensors") in capsys.readouterr().out
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    assert model.rel_pos_bias is not None  # the distillation architecture, shared bias and final norm
    x = images()
    assert torch.equal(model.forward_features(x), student.forward_features(x))


@pytest.mark.parametrize("fmt, out, folder", [("timm", "blocker/exported", "blocker/exported"),
                                              ("official", "blocker/fd.pth", "blocker")])
def test_an_output_path_through_a_file_is_one_line(vit_run, tmp_path, capsys, fmt, out, folder):
    (tmp_path / "blocker").write_text("a file where the output folder should go")
    assert main([str(vit_run[0]), "--format", fmt, "--out", str(tmp_path / out), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"fdfast-export: error: cannot create the output folder "
                                        f"'{tmp_path / folder}': '{tmp_path / 'blocker'}' is a file, not a "
                                        "folder; choose another output path"]


@torch.no_grad()
def test_finetune_layout_loads_into_a_stock_timm_beit(vit_run, tmp_path):
    folder, student, _ = vit_run
    out = tmp_path / "ft_layout"
    assert main([str(folder), "--format", "timm", "--out", str(out), "--finetune-layout", "-q"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_args"]["use_rel_pos_bias"] and not cfg["model_args"]["use_shared_rel_pos_bias"]
    # a stock fine-tune BEiT with a new 10-class head, as timm's train.py would build it
    model = timm.create_model("beit_base_patch16_224", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
                              **{k: v for k, v in cfg["model_args"].items() if k != "num_classes"}).eval()
    x = images()
    got = F.layer_norm(model.forward_features(x), (32,), student.norm.weight, student.norm.bias, eps=1e-6)
    assert torch.allclose(got, student.forward_features(x), atol=1e-5)


@torch.no_grad()
def test_official_export_of_a_distilled_vit(vit_run, tmp_path):
    folder, student, projector = vit_run
    out = tmp_path / "fd_official.pth"
    assert main([str(folder / "state.pt"), "--format", "official", "--out", str(out)]) == 0
    obj = torch.load(out, weights_only=True)  # plain data: no yacs needed by anyone
    assert torch.equal(obj["model"]["decoder.0.weight"], projector.weight.unsqueeze(-1))
    assert obj["fdfast"]["step"] == 20 and obj["fdfast"]["student"]["embed_dim"] == 32
    again = perturbed(build(BEIT), seed=3)
    L.load_student_weights(again, out, expected_missing=())
    x = images()
    assert torch.equal(again.forward_features(x), student.forward_features(x))


@torch.no_grad()
def test_swin_exports_both_formats(tmp_path):
    student = perturbed(build(SWIN))
    folder = write_fdfast_checkpoint(tmp_path / "run", student, nn.Linear(32, 64), SWIN)
    assert main([str(folder), "--format", "official", "--out", str(tmp_path / "s.pth"), "-q"]) == 0
    assert main([str(folder), "--format", "timm", "--out", str(tmp_path / "s_timm"), "-q"]) == 0
    raw = torch.load(tmp_path / "s.pth", weights_only=True)["model"]
    assert "encoder.layers.0.downsample.reduction.weight" in raw and raw["decoder.0.weight"].shape == (64, 32, 1)
    x = images()
    want = student.forward_features(x)
    fresh = perturbed(build(SWIN), seed=1)
    L.load_student_weights(fresh, tmp_path / "s.pth", expected_missing=())
    assert torch.equal(fresh.forward_features(x), want)
    model = timm.create_model(f"local-dir:{tmp_path / 's_timm'}", pretrained=True).eval()
    assert torch.equal(model.forward_features(x), want)
    assert json.loads((tmp_path / "s_timm" / "config.json").read_text())["architecture"].startswith("swinv2_")


@torch.no_grad()
def test_finetuned_checkpoint_exports_to_timm_only(tmp_path, capsys):
    fields = dict(BEIT)
    ft = perturbed(build(fields, num_classes=5, finetune=True))
    folder = write_fdfast_checkpoint(tmp_path / "run", ft, None, fields, task="finetune", num_classes=5)
    out = tmp_path / "ft.safetensors"
    assert main([str(folder), "--format", "timm", "--out", str(out), "--model-name", "beit_base_patch16_224"]) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    model = timm.create_model("beit_base_patch16_224", checkpoint_path=str(out), **cfg["model_args"]).eval()
    x = images()
    assert torch.equal(model(x), ft(x))

    assert main([str(folder), "--format", "official", "--out", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert "fine-tuned student" in err and "--format timm" in err and "Traceback" not in err
    assert not (tmp_path / "o.pth").exists()


@torch.no_grad()
def test_a_finetune_run_exports_its_best_weights_unless_which_last(tmp_path, capsys):
    fields = dict(BEIT)
    last, best = perturbed(build(fields, 5, True), seed=1), perturbed(build(fields, 5, True), seed=2)
    folder = write_fdfast_checkpoint(tmp_path / "run", last, None, fields, task="finetune", num_classes=5)
    state = torch.load(folder / "state.pt", weights_only=True)
    save_best(tmp_path / "run", {"model": best.state_dict(), "step": 10, "epoch": 1, "best": {"top1": 50.0},
                                 "config": state["config"]}, config=state["config"])
    x = images()

    def exported(*args: str) -> torch.Tensor:
        out = tmp_path / f"export{len(list(tmp_path.glob('export*')))}"
        assert main([*args, "--format", "timm", "--out", str(out), "-q"]) == 0, capsys.readouterr().err
        return timm.create_model(f"local-dir:{out}", pretrained=True).eval()(x)
    run = str(tmp_path / "run")
    for args in ([run], [run, "--which", "best"], [str(tmp_path / "run" / "best")],
                 [str(tmp_path / "run" / "checkpoints"), "--which", "best"]):
        assert torch.equal(exported(*args), best(x)), args
    for args in ([run, "--which", "last"], [str(folder)]):
        assert torch.equal(exported(*args), last(x)), args

    # --which picks within a run; one checkpoint is one checkpoint
    assert main([str(folder), "--which", "last", "--format", "timm", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--which last picks within a run folder" in err
    # damaged best weights: the default says so and takes the newest checkpoint; --which best refuses
    weights = tmp_path / "run" / "best" / "state.pt"
    weights.write_bytes(weights.read_bytes()[:-1] + b"x")
    assert torch.equal(exported(run), last(x))
    assert main([run, "--which", "best", "--format", "timm", "--out", str(tmp_path / "o")]) == 2
    assert "no usable best weights" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_distillation_run_has_no_best_and_help_lists_every_input(vit_run, tmp_path, capsys):
    folder, _, _ = vit_run
    assert main([str(folder.parent.parent), "--which", "best", "--format", "timm", "--out", str(tmp_path / "o")]) == 2
    assert "no best/" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for accepted in ("RUN ", "RUN/checkpoints ", "RUN/checkpoints/step_N", "RUN/best", "state.pt", "--which"):
        assert accepted in text, accepted


def test_bad_inputs_exit_2_with_a_message(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main([str(missing), "--format", "timm", "--out", str(tmp_path / "o")]) == 2
    assert f"{missing}: no such file" in capsys.readouterr().err

    plain = tmp_path / "plain.pth"
    torch.save(build(BEIT).state_dict(), plain)
    assert main([str(plain), "--format", "timm", "--out", str(tmp_path / "o")]) == 2
    assert "not an fdfast training checkpoint" in capsys.readouterr().err

    # a config without the architecture fields cannot rebuild the student
    folder = tmp_path / "step_00000001"
    folder.mkdir()
    torch.save({"format": "fdfast-train", "version": 1, "model": {"encoder.cls_token": torch.zeros(1, 1, 32)},
                "config": {"model": {"student": {"arch": "beit", "img_size": 32}}}}, folder / "state.pt")
    assert main([str(folder), "--format", "timm", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "model.student.patch_size" in err and "model.student.num_heads" in err

    # weights that do not match the config's architecture
    student = build({**BEIT, "embed_dim": 48, "num_heads": 3})
    folder = write_fdfast_checkpoint(tmp_path / "run2", student, nn.Linear(48, 8), BEIT)
    assert main([str(folder), "--format", "official", "--out", str(tmp_path / "o.pth")]) == 2
    err = capsys.readouterr().err
    assert "patch_embed.proj.weight: file (48, 3, 8, 8) vs model (32, 3, 8, 8)" in err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.pth").exists()

    with pytest.raises(SystemExit) as e:  # argparse usage errors keep argparse's exit code
        main([str(folder), "--format", "onnx", "--out", "x"])
    assert e.value.code == 2


def test_module_entry_point_runs_without_traceback(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, "-m", "fdfast.cli.export", str(tmp_path / "missing"), "--format", "timm",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and "fdfast-export: error:" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------------------
# timm alone reproduces the model and its eval preprocessing
# ----------------------------------------------------------------------------------------------
TIMM_ONLY = r"""
import json, sys
import timm, torch
from PIL import Image

folder, image, out, threads = sys.argv[1:5]
torch.set_num_threads(int(threads))
model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
config = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**config)
x = transform(Image.open(image).convert("RGB")).unsqueeze(0)
with torch.no_grad():
    logits = model(x)
assert not any(m == "fdfast" or m.startswith("fdfast.") for m in sys.modules)
torch.save({"x": x, "logits": logits, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
            "transform": repr(transform)}, out)
"""


@torch.no_grad()
def test_timm_alone_gives_identical_logits_and_fdfasts_eval_preprocessing(tmp_path):
    # a fine-tuned ViT at a non-default size (48 px) with a 7-class head, CLIP eval normalisation, and a
    # resize (59) where 48 / 59 as crop_pct would make timm resize to 58
    fields = {**BEIT, "img_size": 48}
    ft = perturbed(build(fields, num_classes=7, finetune=True))
    folder = write_fdfast_checkpoint(tmp_path / "run", ft, None, fields, task="finetune", num_classes=7,
                                     data={"eval_resize": 59}, train={"eval_norm": "clip"})
    out = tmp_path / "ft_timm"
    assert main([str(folder), "--format", "timm", "--out", str(out), "-q"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_classes"] == 7 and cfg["model_args"]["img_size"] == 48
    image = tmp_path / "photo.png"
    g = torch.Generator().manual_seed(3)
    Image.fromarray(torch.randint(0, 256, (70, 90, 3), generator=g, dtype=torch.uint8).numpy()).save(image)

    result = tmp_path / "timm_result.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # timm's process must not see fdfast
    r = subprocess.run([sys.executable, "-c", TIMM_ONLY, str(out), str(image), str(result),
                        str(torch.get_num_threads())], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = torch.load(result, weights_only=True)

    transform = build_transform(DataConfig(eval_resize=59), train=False, img_size=48)
    pixels = transform(Image.open(image).convert("RGB")).unsqueeze(0)
    ours = normalize(pixels, CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(got["x"], ours, atol=2e-6, rtol=0)  # ToTensor + Normalize vs uint8 on the device
    assert torch.equal(got["logits"], ft(got["x"])) and got["logits"].shape == (1, 7)

    config = got["config"]
    assert config["input_size"] == [3, 48, 48] and config["interpolation"] == "bicubic"
    assert config["mean"] == list(CLIP_MEAN) and config["std"] == list(CLIP_STD)
    assert config["crop_mode"] == "center" and abs(config["crop_pct"] - 48 / 59) < 1e-12
    assert "Resize(size=59, interpolation=bicubic" in got["transform"] and "CenterCrop(size=(48, 48))" in got["transform"]


@torch.no_grad()
def test_checkpoint_of_an_earlier_version_still_exports(tmp_path):
    """Configs written before the config sections moved: student depths/heads, compile and logging keys in
    train, a removed data key. The export reads the student section through MOVED_KEYS."""
    student = perturbed(build(SWIN))
    folder = write_fdfast_checkpoint(tmp_path / "run", student, nn.Linear(32, 64), SWIN)
    state = torch.load(folder / "state.pt", weights_only=True)
    old = state["config"]
    s = old["model"]["student"]
    s["depths"], s["heads"] = s.pop("depth"), s.pop("num_heads")
    old["train"]["compile"] = old.pop("compile")["enabled"]
    old["train"]["log_every"] = old.pop("log")["every"]
    old["data"]["generate_if_missing"] = False
    torch.save(state, folder / "state.pt")
    out = tmp_path / "old_timm"
    assert main([str(folder / "state.pt"), "--format", "timm", "--out", str(out), "-q"]) == 0
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = images()
    assert torch.equal(model.forward_features(x), student.forward_features(x))
    assert json.loads((out / "config.json").read_text())["model_args"]["depths"] == SWIN["depth"]
