"""fdfast-convert: ImageFolder -> FFCV .beton (labels, bad inputs, atomic output, interruptions)."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import ffcv.writer  # noqa: F401 - a missing FFCV must fail this file, not skip it
from ffcv.reader import Reader

from _loader_helpers import hang_guard, hide_package, make_mixed_folder
from fdfast.cli import convert as C
from pipelines import ffcv_writer as W
from pipelines.generate import make_image_folder

REPO = Path(__file__).resolve().parents[1]


def run(argv, capsys) -> tuple[int, str, str]:
    rc = C.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def leftovers(folder: Path) -> list[str]:
    """Temporary files of unfinished outputs (``atomic_write`` names them ``.<name>.<pid>.<token>.tmp``)."""
    return sorted(p.name for p in Path(folder).glob(".*.tmp")) if Path(folder).exists() else []


def field(reader: Reader, name: str) -> np.ndarray:
    """Per-sample metadata of one field (FFCV stores them as f0, f1, ... in field order)."""
    return reader.metadata[f"f{reader.field_names.index(name)}"]


def sample_bytes(path: Path) -> list[bytes]:
    """The stored bytes of every sample, in sample order (independent of the file's page layout)."""
    r = Reader(str(path))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    table = r.alloc_table
    return [b"".join(bytes(data[int(p):int(p) + int(s)]) for p, s in
                     zip(table["ptr"][table["sample_id"] == i], table["size"][table["sample_id"] == i]))
            for i in range(int(r.num_samples))]


@pytest.fixture(scope="module")
def split_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert-src")
    make_mixed_folder(root / "train", corrupt=1)
    (root / "train" / "class_001" / "notes.txt").write_text("not an image, and not named like one")
    (root / "train" / "class_002" / "text.jpg").write_bytes(b"named like a JPEG, but text")
    make_image_folder(root / "val", num_classes=4, per_class=3, sizes=((80, 60),), seed=1)
    return root


@pytest.fixture(scope="module")
def converted(split_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("convert-out")
    with contextlib.redirect_stdout(io.StringIO()) as stdout, contextlib.redirect_stderr(io.StringIO()) as stderr:
        rc = C.main([str(split_root), str(out), "--num-workers", "2"])
    return rc, out, stdout.getvalue(), stderr.getvalue()


def test_splits_get_imagefolder_labels_and_bad_files_are_listed(split_root, converted):
    from torchvision.datasets import ImageFolder

    rc, out_dir, out, err = converted
    assert rc == 0
    bad = {str(split_root / "train/class_000/corrupt_0.jpg"), str(split_root / "train/class_002/text.jpg")}
    for path in bad:
        assert f"skipped {path}" in err
    assert leftovers(out_dir) == []

    good = [(p, y) for p, y in ImageFolder(split_root / "train").samples if p not in bad]
    r = Reader(str(out_dir / "train.beton"))
    assert int(r.num_samples) == len(good) == 40
    np.testing.assert_array_equal(field(r, "label"), [y for _, y in good])
    # the stored sizes identify the source files, sample by sample (grayscale / RGBA / PNG included)
    stored = list(zip(field(r, "image")["width"].tolist(), field(r, "image")["height"].tolist()))
    assert stored == [Image.open(p).size for p, _ in good]
    modes = field(r, "image")["mode"]          # proportion mode: JPEG (0) and raw (1) both present
    assert 0 < int(modes.sum()) < len(modes)

    val = Reader(str(out_dir / "val.beton"))
    np.testing.assert_array_equal(field(val, "label"), [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])


def test_summary_and_same_bytes_whatever_the_worker_count(split_root, converted, tmp_path, capsys):
    out_dir = converted[1]
    rc, out, err = run([split_root, tmp_path, "--splits", "train", "--num-workers", "1"], capsys)
    assert rc == 0
    assert "train.beton: 40 images, 4 classes" in out
    assert "skipped 2 unreadable" in out and "ignored 1 non-image files" in out
    # the proportion-mode JPEG coin is seeded per image: 1 or 2 workers write the same samples
    assert sample_bytes(tmp_path / "train.beton") == sample_bytes(out_dir / "train.beton")
    rc, _, err = run([split_root, tmp_path, "--splits", "train"], capsys)
    assert rc == 2 and "already exists; pass --overwrite" in err


def test_strict_stops_at_the_bad_file(split_root, tmp_path, capsys):
    rc, out, err = run([split_root / "train", tmp_path / "t.beton", "--strict", "--num-workers", "1"], capsys)
    assert rc == 2
    assert "corrupt_0.jpg" in err or "text.jpg" in err
    assert "--strict" in err and "Traceback" not in err
    assert not (tmp_path / "t.beton").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("case", ["missing", "empty", "no_images", "all_bad"])
def test_unusable_source_is_one_clear_line(case, tmp_path, capsys):
    src = tmp_path / "src"
    if case != "missing":
        src.mkdir()
    if case == "no_images":
        (src / "cat").mkdir()
        (src / "cat" / "readme.txt").write_text("x")
    if case == "all_bad":
        (src / "cat").mkdir()
        (src / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rc, out, err = run([src, tmp_path / "o.beton", "--num-workers", "1"], capsys)
    expected = {"missing": "does not exist", "empty": "has no class sub-folders",
                "no_images": "holds no images", "all_bad": "none of the 1 images"}[case]
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("fdfast-convert: error:")]
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err and not (tmp_path / "o.beton").exists()


@pytest.mark.parametrize("out", ["blocker", "blocker/train.beton"])
def test_an_output_path_through_a_file_is_one_line_before_any_decoding(split_root, tmp_path, capsys, out):
    (tmp_path / "blocker").write_text("a file where the output folder should go")
    rc, _, err = run([split_root / "train", tmp_path / out], capsys)
    assert rc == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fdfast-convert: error:")]
    assert lines == [f"fdfast-convert: error: cannot create the output folder '{tmp_path / 'blocker'}': "
                     f"'{tmp_path / 'blocker'}' is a file, not a folder; choose another output path"], err
    assert "check train" not in err  # refused before decoding the whole folder


def test_console_script_exit_status_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fdfast.cli.convert", str(tmp_path / "nope"), str(tmp_path / "o")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"fdfast-convert: error: source folder '{tmp_path / 'nope'}' "
                                                "does not exist"]


def test_check_only_lists_unreadable_files(split_root, tmp_path, capsys):
    rc, out, err = run(["--check-only", split_root, "--num-workers", "2"], capsys)
    assert rc == 1
    assert "corrupt_0.jpg" in err and "text.jpg" in err
    assert "40 readable images, 2 unreadable" in out and "12 readable images, 0 unreadable" in out
    assert not list(tmp_path.iterdir())


def test_max_images_takes_a_spread_deterministic_subset(split_root, tmp_path, capsys):
    for name in ("a.beton", "b.beton"):
        rc, out, _ = run([split_root / "val", tmp_path / name, "--max-images", "6", "--num-workers", "1"], capsys)
        assert rc == 0 and "6 images, 4 classes" in out
    # round-robin over the classes: first file of each class, then the second of classes 0 and 1
    np.testing.assert_array_equal(field(Reader(str(tmp_path / "a.beton")), "label"), [0, 0, 1, 1, 2, 3])
    assert sample_bytes(tmp_path / "a.beton") == sample_bytes(tmp_path / "b.beton")
    samples = [(f"c{c}/{i}", c) for c in range(3) for i in range(4)]
    assert W.spread_subset(samples, 4) == [("c0/0", 0), ("c0/1", 0), ("c1/0", 1), ("c2/0", 2)]


def test_interrupt_while_writing_removes_the_partial_file(split_root, tmp_path, capsys, monkeypatch):
    def interrupted(self, allocations):
        assert Path(self.fname).exists() and self.fname.endswith(".tmp")   # all pages written, header not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(ffcv.writer.DatasetWriter, "finalize", interrupted)
    rc, out, err = run([split_root / "val", tmp_path / "v.beton", "--num-workers", "2"], capsys)
    assert rc == 130 and "interrupted" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_dying_writer_worker_fails_the_run_instead_of_hanging(split_root, tmp_path, monkeypatch):
    original = W.FolderSamples.__getitem__

    def crash(self, index):
        if index == 3:
            os._exit(7)             # a hard crash: no exception, no allocation table sent back
        return original(self, index)

    monkeypatch.setattr(W.FolderSamples, "__getitem__", crash)
    with hang_guard("the conversion hung after its worker died", seconds=60):
        with pytest.raises(RuntimeError, match="writer worker died"):
            W.convert_folder(split_root / "val", tmp_path / "v.beton", num_workers=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _big_folder(root: Path, n: int = 16, side: int = 1600) -> Path:
    """Large smooth JPEGs (copies of one file): slow enough to decode that a run can be killed mid-write."""
    yy, xx = np.mgrid[0:side, 0:side]
    img = np.stack([xx * 255 // side, yy * 255 // side, (xx + yy) * 127 // side], -1).astype(np.uint8)
    first = root / "a" / "0.jpg"
    first.parent.mkdir(parents=True)
    Image.fromarray(img).save(first, quality=90)
    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(exist_ok=True)
        if not (d / f"{i}.jpg").exists():
            (d / f"{i}.jpg").write_bytes(first.read_bytes())
    return root


def _start_and_kill_mid_write(src: Path, out: Path, sig: int) -> tuple[subprocess.CompletedProcess, int]:
    proc = subprocess.Popen([sys.executable, "-m", "fdfast.cli.convert", str(src), str(out), "--num-workers", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not leftovers(out.parent):
        assert proc.poll() is None, f"finished before it could be interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline, "the temporary file never appeared"
        time.sleep(0.01)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), proc.pid


def test_killed_conversion_leaves_no_beton(tmp_path, capsys):
    src = _big_folder(tmp_path / "big")
    out = tmp_path / "out" / "big.beton"
    out.parent.mkdir()

    term, _ = _start_and_kill_mid_write(src, out, signal.SIGTERM)
    assert term.returncode == 130, term.stderr
    assert "interrupted" in term.stderr
    assert list(out.parent.iterdir()) == []          # the temporary file was removed

    kill, pid = _start_and_kill_mid_write(src, out, signal.SIGKILL)
    assert kill.returncode == -signal.SIGKILL
    assert not out.exists()                          # only the killed run's temporary file remains: never a .beton
    remains = [p.name for p in out.parent.iterdir()]
    assert len(remains) == 1 and remains[0].startswith(f".big.beton.{pid}.") and remains[0].endswith(".tmp")

    # the next run removes the dead run's temporary file and writes a complete one
    rc, _, _ = run([src, out, "--max-images", "2", "--num-workers", "1"], capsys)
    assert rc == 0 and [p.name for p in out.parent.iterdir()] == ["big.beton"]
    assert int(Reader(str(out)).num_samples) == 2


def test_missing_ffcv_is_one_line_with_the_install_command(split_root, tmp_path, capsys, monkeypatch):
    hide_package(monkeypatch, "ffcv")
    rc, _, err = run([split_root / "val", tmp_path / "v.beton"], capsys)
    assert rc == 2 and "install_optional_deps.sh" in err and "Traceback" not in err


def test_a_stop_request_is_acted_on_at_check_points():
    """SIGTERM / Ctrl-C only set a flag: a KeyboardInterrupt raised by the handler could land in code run by
    exec() of a string, which makes CPython exit with SIGINT (-2) although the CLI handled it and returned 130."""
    previous = signal.getsignal(signal.SIGTERM)
    with W.stop_on_signals():
        W.check_stop()                               # nothing requested yet
        os.kill(os.getpid(), signal.SIGTERM)
        exec("x = sum(range(100000))", {})           # the handler runs here, and must not raise
        with pytest.raises(W.Interrupted):
            W.check_stop()
        with pytest.raises(KeyboardInterrupt):       # a second request does not wait for a check point
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is previous
    W.check_stop()                                   # the request ends with its conversion


def test_check_only_and_convert_never_open_a_fifo_or_decode_a_bomb(tmp_path, capsys):
    src = make_image_folder(tmp_path / "src", num_classes=2, per_class=2, sizes=((40, 30),))
    os.mkfifo(src / "class_000" / "fifo.jpg")
    bomb = src / "class_001" / "bomb.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (20000).to_bytes(2, "big") * 2  # the header says 20000 x 20000
    bomb.write_bytes(bytes(data))
    with hang_guard("fdfast-convert hung on a FIFO", seconds=120):
        rc, out, err = run(["--check-only", src, "--num-workers", "1"], capsys)
        assert rc == 1 and "4 readable images, 2 unreadable" in out, out
        assert "fifo.jpg: not a regular file: a FIFO" in err and "over the limit of 89,478,485 pixels" in err, err
        rc, out, err = run([src, tmp_path / "out" / "s.beton", "--num-workers", "1"], capsys)
        assert rc == 0 and "4 images" in out and "skipped 2 unreadable" in out, (out, err)
        rc, _, err = run([src, tmp_path / "out" / "t.beton", "--num-workers", "1", "--strict"], capsys)
    assert rc == 2 and "fifo.jpg" in err and "--strict" in err


def test_a_refused_conversion_leaves_no_output_folder(split_root, tmp_path, capsys):
    rc, _, err = run([split_root / "train", tmp_path / "new" / "deeper" / "t.beton", "--strict", "--num-workers",
                      "1"], capsys)
    assert rc == 2 and "--strict" in err
    assert not (tmp_path / "new").exists()  # the folders it created for the output are gone again


HANGING_CHECK = """
import sys, time
from pathlib import Path
import pipelines.folder as F

def hang(path):  # a worker stuck on a file (a network filesystem that does not answer)
    Path(sys.argv[1]).touch()
    time.sleep(3600)

F.check_image = hang
from fdfast.cli.convert import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_stops_the_converter_while_a_worker_hangs(split_root, tmp_path):
    started = tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", HANGING_CHECK, str(started), "--check-only",
                             str(split_root / "val"), "--num-workers", "1"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # once, as `timeout` sends it
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in err, err
