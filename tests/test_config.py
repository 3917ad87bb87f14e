import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fdfast.cli import train as train_cli
from fdfast.config import ConfigError, FDConfig, dump_config, load_config
from fdfast.config.load import resolve_config

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "configs" / "pretrain"


def test_unknown_key_names_key_and_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.bas_lr.*did you mean 'optim\.base_lr'"):
        load_config(None, ["optim.bas_lr=1e-3"])
    f = tmp_path / "c.yaml"
    f.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"'trian'.*did you mean 'train'"):
        load_config(f)


def test_bad_type_and_bad_choice():
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        load_config(None, ["train.epochs=ten"])
    with pytest.raises(ConfigError, match=r"model\.teacher\.kind: 'clp'.*did you mean 'clip'"):
        load_config(None, ["model.teacher.kind=clp"])
    with pytest.raises(ConfigError, match=r"compile\.enabled: expected true/false"):
        load_config(None, ["compile.enabled=3"])


def test_impossible_combinations():
    with pytest.raises(ConfigError, match="needs model.student.arch='swinv2'"):
        load_config(None, ["model.teacher.kind=esvit"])
    with pytest.raises(ConfigError, match="not a multiple of patch_size"):
        load_config(None, ["model.student.img_size=100"])
    with pytest.raises(ConfigError, match=r"data\.backend='ffcv' reads \.beton"):
        load_config(None, ["data.backend=ffcv", "data.train=imagenet/train"])


def test_a_distillation_refuses_pretrained_weights_it_would_never_read():
    with pytest.raises(ConfigError, match=r"model\.pretrained='runs/x' is read by train\.task='finetune'.*train\.resume"):
        load_config(None, ["model.pretrained=runs/x"])
    assert load_config(None, ["train.task=finetune", "model.student.num_classes=1000",
                              "model.pretrained=runs/x"]).model.pretrained == "runs/x"


def test_broken_yaml_is_one_line_naming_file_line_and_column(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  student: {img_size: 64\ntrain: {}\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(err.value) == f"{f}: not valid YAML: line 3, column 6: expected ',' or '}}', but got ':'"


def test_overrides_parse_yaml_values_and_round_trip(tmp_path):
    cfg = load_config(PRETRAIN / "demo_cpu.yaml", ["optim.betas=[0.9, 0.95]", "optim.clip_grad=null",
                                                   "train.max_steps=7"])
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.clip_grad is None and cfg.train.max_steps == 7
    dump_config(cfg, tmp_path / "resolved.yaml")
    again = load_config(tmp_path / "resolved.yaml")
    assert again == cfg


def test_cli_exits_nonzero_naming_the_key():
    r = subprocess.run([sys.executable, "-m", "fdfast.cli.train", "-c", str(PRETRAIN / "demo_cpu.yaml"),
                        "--set", "train.epoch=3"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "train.epoch" in r.stderr and "train.epochs" in r.stderr
    assert "Traceback" not in r.stderr


# spec §1.7: (drop path, epochs, warmup, base / warmup / min LR, min_scale)
SPEC = {
    "fd_clip_vit_base_100ep": (0.1, 100, 10, 3e-4, 5e-7, 5e-6, 0.67),
    "fd_clip_vit_base_300ep": (0.2, 300, 10, 3e-4, 5e-7, 5e-6, 0.08),
    "fd_clip_vit_large_300ep": (0.3, 300, 10, 3e-4, 5e-7, 5e-6, 0.08),
    "fd_dino_vit_base_300ep": (0.3, 300, 10, 3e-4, 5e-7, 5e-6, 0.08),
    "fd_deit_vit_base_300ep": (0.3, 300, 10, 3e-4, 5e-7, 5e-6, 0.08),
    "fd_esvit_swin_base_300ep": (0.3, 300, 10, 2e-4, 1e-6, 1e-5, 0.08),
}


@pytest.mark.parametrize("name", sorted(SPEC))
def test_pretrain_configs_match_spec(name):
    cfg: FDConfig = load_config(PRETRAIN / f"{name}.yaml")
    dpr, epochs, warmup, lr, wlr, mlr, min_scale = SPEC[name]
    assert cfg.model.student.drop_path == dpr
    assert (cfg.train.epochs, cfg.optim.warmup_epochs) == (epochs, warmup)
    assert (cfg.optim.base_lr, cfg.optim.warmup_lr, cfg.optim.min_lr) == (lr, wlr, mlr)
    assert cfg.data.min_scale == min_scale and cfg.data.max_scale == 1.0
    assert cfg.optim.weight_decay == 0.05 and cfg.optim.clip_grad == 3.0
    assert cfg.train.batch_size == 128 and cfg.model.student.img_size == 224
    assert cfg.data.interpolation == "bilinear" and cfg.model.loss_beta == 2.0
    if "large" in name:
        s = cfg.model.student
        assert (s.patch_size, s.embed_dim, s.depth, s.num_heads) == (14, 1024, 24, 16)
    if "esvit" in name:
        assert cfg.model.student.arch == "swinv2" and cfg.model.student.window_size == 14
        assert cfg.model.teacher.model_kwargs == {"window_size": 14}


def test_resolved_config_yaml_is_plain():
    data = yaml.safe_load(yaml.safe_dump(__import__("dataclasses").asdict(load_config(None))))
    assert data["train"]["task"] == "distill"


def test_moved_key_names_its_new_home():
    with pytest.raises(ConfigError, match=r"'train\.compile' has moved: use 'compile\.enabled'"):
        load_config(None, ["train.compile=true"])
    with pytest.raises(ConfigError, match=r"'model\.student\.depths' has moved: use 'model\.student\.depth'"):
        load_config(None, ["model.student.depths=[2, 2]"])


@pytest.mark.parametrize("override, key", [
    ("optim.base_lr=-1e-3", "optim.base_lr"), ("optim.base_lr=.nan", "optim.base_lr"),
    ("optim.min_lr=-1", "optim.min_lr"), ("optim.clip_grad=-1", "optim.clip_grad"),
    ("optim.weight_decay=-0.05", "optim.weight_decay"), ("checkpoint.keep=0", "checkpoint.keep"),
    ("train.output_dir=''", "train.output_dir"), ("train.batch_size=0", "train.batch_size"),
    ("log.every=0", "log.every"), ("augment.re_prob=1.5", "augment.re_prob"),
    ("data.num_workers=-1", "data.num_workers must be >= 0 (0 = load in the main process), got -1"),
    ("data.prefetch=0", "data.prefetch must be >= 1, got 0"),
])
def test_values_that_are_never_meaningful_are_refused(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(None, [override])


def test_sections_check_themselves_when_built_in_python():
    from fdfast.config import CheckpointConfig, StudentConfig
    with pytest.raises(ConfigError, match=r"checkpoint\.keep"):
        CheckpointConfig(keep=0)
    with pytest.raises(ConfigError, match="per-stage lists"):
        StudentConfig(arch="swinv2", depth=12, num_heads=12)
    s = StudentConfig(arch="swinv2", img_size=224, patch_size=4, depth=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])
    assert s.num_blocks == 24 and s.num_tokens == 49


# --- configs shipped with the package, by name ----------------------------------------------------
CONFIGS = ROOT / "configs"


def test_bare_and_relative_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: only the shipped copy can answer
    by_path = load_config(PRETRAIN / "fd_clip_vit_base_300ep.yaml")
    for name in ("fd_clip_vit_base_300ep", "fd_clip_vit_base_300ep.yaml", "pretrain/fd_clip_vit_base_300ep",
                 "configs/pretrain/fd_clip_vit_base_300ep.yaml"):
        assert resolve_config(name) == CONFIGS / "pretrain" / "fd_clip_vit_base_300ep.yaml", name
        assert load_config(name) == by_path, name
    assert resolve_config("clip_vit_large_300ep") == CONFIGS / "finetune" / "clip_vit_large_300ep.yaml"
    assert load_config("finetune/demo_cpu").train.task == "finetune"  # its base: include resolved too


def test_an_existing_file_wins_over_a_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fd_clip_vit_base_300ep.yaml").write_text("train: {epochs: 7}\n")
    assert load_config("fd_clip_vit_base_300ep.yaml").train.epochs == 7
    assert load_config("fd_clip_vit_base_300ep").train.epochs == 300  # no file of that exact name here


def test_ambiguous_and_unknown_names_say_what_to_pass():
    with pytest.raises(ConfigError, match=r"'demo_cpu' is ambiguous.*pretrain/demo_cpu, finetune/demo_cpu"):
        load_config("demo_cpu")
    with pytest.raises(ConfigError, match=r"did you mean 'fd_dino_vit_base_300ep'.*--list-configs"):
        load_config("fd_dino_vit_base_300")
    with pytest.raises(ConfigError, match=r"'pretrain/nope.yaml' is neither a file nor"):
        load_config("pretrain/nope.yaml")


def test_list_configs_names_every_runnable_config_once(capsys):
    assert train_cli.main(["--list-configs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert str(CONFIGS) in out[0]
    listed = {line.split()[0]: line.split(maxsplit=1)[1] for line in out[1:]}
    files = sorted(p for p in CONFIGS.rglob("*.yaml") if not p.name.startswith("_"))
    assert len(listed) == len(files) == 26
    assert sorted(resolve_config(name) for name in listed) == files  # every listed name runs that file
    assert listed["fd_clip_vit_base_100ep"] == "CLIP ViT-B/16 -> ViT-B/16, 100 epochs."
    assert "pretrain/demo_cpu" in listed and "finetune/demo_cpu" in listed


def test_cli_needs_a_config_unless_listing(capsys):
    with pytest.raises(SystemExit) as exit_:
        train_cli.main([])
    assert exit_.value.code == 2 and "--list-configs" in capsys.readouterr().err
