"""The README's Python examples run as written (each block in a fresh interpreter, in a folder holding
the files they name)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fdfast.config import StudentConfig
from fdfast.interop.export import export_official
from fdfast.models.student import build_student

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def _official_vit_b16(path: Path) -> None:
    """A distilled ViT-B/16 in the official FD layout, as the second example loads."""
    export_official(build_student(StudentConfig()), None, path, "beit")


FILES = {"fd_clip_vit_base.pth": _official_vit_b16}


def test_the_readme_has_python_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_example_runs(tmp_path, index):
    code = BLOCKS[index]
    for name, make in FILES.items():
        if f'"{name}"' in code:
            make(tmp_path / name)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, f"README example {index + 1} failed:\n{code}\n{r.stderr[-3000:]}"
