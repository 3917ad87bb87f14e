"""What a user outside the repository gets: the wheel (modules, configs, entry points, extras), the
install commands the README and the error hints give, and the conda environment that builds FFCV."""
import email
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib
import yaml

import pipelines.dali
import pipelines.ffcv
from fdfast.config import dump_config, load_config
from fdfast.tracking import WANDB_INSTALL

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPT = (ROOT / "scripts" / "install_optional_deps.sh").read_text()
FFCV_VERSION = re.search(r"^FFCV_VERSION=(\S+)$", SCRIPT, re.MULTILINE).group(1)
FFCV_NO_DEPS = f"pip install --no-deps ffcv=={FFCV_VERSION}"


def name_of(requirement: str) -> str:
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def code_blocks(markdown: str) -> list[list[str]]:
    """The lines of each fenced code block, comments stripped."""
    blocks = re.findall(r"```\w*\n(.*?)```", markdown, re.DOTALL)
    return [[line.split("#")[0].strip() for line in b.splitlines() if line.split("#")[0].strip()] for b in blocks]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """Build the wheel from a copy of the sources (the build writes build/ and *.egg-info beside them)
    with this environment's setuptools, offline; return (wheel file, unzipped folder)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("fdfast", "pipelines", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                    "-q", str(src), "-w", str(tmp / "dist")], check=True, capture_output=True, timeout=300)
    (whl,) = (tmp / "dist").glob("fdfast-*.whl")
    unzipped = tmp / "site"
    with zipfile.ZipFile(whl) as z:
        z.extractall(unzipped)
    return whl, unzipped


def test_wheel_holds_every_module_every_config_and_the_commands(wheel):
    _, site = wheel
    in_wheel = {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()}
    # a package folder missing from pyproject's explicit list would be silently left out
    for package in ("fdfast", "pipelines"):
        for f in (ROOT / package).rglob("*.py"):
            assert f.relative_to(ROOT).as_posix() in in_wheel, f"{f} is not in the wheel: add its package to pyproject"
    shipped = {p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml")}
    assert {f.removeprefix("fdfast/configs/") for f in in_wheel if f.startswith("fdfast/configs/")} == shipped
    dist_info = next(site.glob("fdfast-*.dist-info"))
    entry_points = (dist_info / "entry_points.txt").read_text()
    for command in ("fdfast-train = fdfast.cli.train:main", "fdfast-convert = fdfast.cli.convert:main",
                    "fdfast-export = fdfast.cli.export:main", "fdfast-eval = fdfast.cli.eval:main",
                    "fdfast-analyze = fdfast.cli.analyze:main"):
        assert command in entry_points


def test_installed_copy_runs_shipped_configs_by_name_outside_the_repository(wheel, tmp_path):
    _, site = wheel
    # what `fdfast-train ...` runs (the entry point checked above), from a folder with no configs/ in it
    script = ("import sys, fdfast.tracking as t; from fdfast.cli.train import main; print(t.__file__); "
              "print(t.run_environment()['git_commit']); main(['--list-configs']); "
              "main(['--config', 'fd_clip_vit_base_300ep', '--print-config']); print('-' * 10); "
              "main(['--config', 'configs/finetune/clip_vit_base_300ep.yaml', '--print-config'])")
    env = {**os.environ, "PYTHONPATH": str(site)}
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    module, commit, header, *rest = r.stdout.split("\n")
    assert Path(module).is_relative_to(site)
    assert commit == "None"  # an installed copy is not a checkout: no commit, and no error
    assert f"({site / 'fdfast' / 'configs'})" in header
    listing = "\n".join(rest)
    assert "fd_clip_vit_base_300ep" in listing and "pretrain/demo_cpu" in listing
    printed = listing[listing.index("model:"):].split("-" * 10 + "\n")
    for text, name in zip(printed, ("pretrain/fd_clip_vit_base_300ep", "finetune/clip_vit_base_300ep")):
        dump_config(load_config(ROOT / "configs" / f"{name}.yaml"), tmp_path / "expected.yaml")
        assert yaml.safe_load(text) == yaml.safe_load((tmp_path / "expected.yaml").read_text()), name


def test_wheel_metadata_core_and_extras(wheel):
    whl, _ = wheel
    with zipfile.ZipFile(whl) as z:
        meta = email.message_from_bytes(z.read(next(n for n in z.namelist() if n.endswith("METADATA"))))
    requires = meta.get_all("Requires-Dist")
    core = {name_of(r) for r in requires if "extra ==" not in r}
    assert {"torch", "timm", "rich", "tensorboard"} <= core  # tensorboard: the default tracking works
    extras = {}
    for r in requires:
        if m := re.search(r'extra == "(\w+)"', r):
            extras.setdefault(m.group(1), set()).add(name_of(r))
    assert set(meta.get_all("Provides-Extra")) == {"ffcv", "dali", "wandb", "analyze", "test"}
    assert extras["wandb"] == {"wandb"} and extras["dali"] == {"nvidia-dali-cuda120"}
    assert extras["analyze"] == {"matplotlib"}
    # ffcv's own requirements, with the headless OpenCV in place of its GUI pin, and never ffcv itself
    ffcv_requires = {name_of(r) for r in importlib.metadata.requires("ffcv")}
    assert extras["ffcv"] == (ffcv_requires - {"opencv-python"}) | {"opencv-python-headless", "setuptools"}
    # the repository's install script installs the same list
    script_deps = re.search(r"^FFCV_DEPS=\((.*)\)$", SCRIPT, re.MULTILINE).group(1).split()
    assert {name_of(d) for d in script_deps} == extras["ffcv"]


def test_readme_and_error_hints_give_the_same_wheel_install_commands():
    commands = {line for block in code_blocks(README) for line in block}
    assert {"pip install 'fdfast[ffcv]'", FFCV_NO_DEPS, "pip install 'fdfast[dali]'", WANDB_INSTALL} <= commands
    assert f"`pip install 'fdfast[ffcv]' && {FFCV_NO_DEPS}`" in pipelines.ffcv.INSTALL_HINT
    assert "`pip install 'fdfast[dali]'`" in pipelines.dali.INSTALL_HINT
    # the system libraries the compile needs are named where the command is given
    for package in ("pkg-config", "libturbojpeg0-dev", "libopencv-dev"):
        assert package in README


def conda_plan(env: dict) -> tuple[list[str], list[str]]:
    """What `conda env create -f environment.yml` runs: the conda-forge packages, and the lines conda
    writes to a requirements file for `pip install -r` (where per-package --no-deps is not allowed)."""
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    return conda, pip


def test_environment_yml_builds_ffcv_with_conda_forge_tools_and_headless_opencv():
    text = (ROOT / "environment.yml").read_text()
    env = yaml.safe_load(text)
    assert env["channels"] == ["conda-forge", "nodefaults"]
    conda, pip = conda_plan(env)
    names = {re.split(r"[=<> ]", c)[0] for c in conda}
    assert {"c-compiler", "cxx-compiler", "pkg-config", "libjpeg-turbo", "libopencv", "pip"} <= names
    assert "libopencv=*=*headless*" in conda  # the build without Qt/GTK
    assert not any(name_of(line) in {"ffcv", "opencv-python", "opencv"} for line in pip)
    (editable,) = [line for line in pip if line.startswith("-e .[")]
    assert "ffcv" in editable[len("-e .["):-1].split(",")  # ffcv's Python deps, headless OpenCV included
    # the commands after the environment exists: the same in the file's header and in the README
    header = [line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#   ")]
    assert header == ["conda env create -f environment.yml", "conda activate fdfast", FFCV_NO_DEPS]
    assert header in code_blocks(README)
