#!/usr/bin/env python
"""Wheels carried to the GPU box, in parts when a wheel is larger than one transfer (bench/README.md).

    python bench/wheels.py pack .whl/dl    # here: check, split and group the wheels into .whl/calls/NN/
    python bench/wheels.py stash           # there: move what this call carried to .whl/stash/
    python bench/wheels.py install --target /tmp/site --record OUT/wheels.json

A part is named ``<wheel file name>.part-XX``, as ``split -b 60M W W.part-`` names them. ``pack`` checks every
wheel of a folder against ``bench/wheels.sha256``, splits those larger than ``--max-mib`` into parts and
groups the files into one folder per transfer (``.whl/calls/01``, ``02``, ...: each at most ``--max-mib``).
``stash`` moves the files of ``.whl/parts/`` and ``.whl/calls/*/`` into ``.whl/stash/``, which no transfer
names. ``install`` stashes what the last call carried, reassembles each wheel from its parts in name order,
checks every wheel (whole or reassembled, in ``.whl/`` or the stash) against its listed sha256, installs
those that match with ``pip install --no-index --no-deps --target`` and records, per wheel, its parts, size,
sha256 and why it was not installed. A wheel without a listed sha256 is never installed.

Environment: ``WHEEL_DIR`` (default ``<repo>/.whl``), ``WHEELS_SHA256`` (default ``bench/wheels.sha256``).
Uses only the standard library and pip (it runs before anything else on a bare box).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = Path(os.environ.get("WHEEL_DIR") or REPO / ".whl")
SHA256_FILE = Path(os.environ.get("WHEELS_SHA256") or REPO / "bench" / "wheels.sha256")
PART = ".part-"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sha256_file(path: Path) -> dict[str, str]:
    """``sha256sum`` format: '<hex>  <file name>' per line; '#' starts a comment."""
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        line = line.split("#", 1)[0].strip()
        if line:
            digest, name = line.split(maxsplit=1)
            out[name.lstrip("*")] = digest.lower()
    return out


def pack(src: Path, max_bytes: int, wheel_dir: Path = WHEEL_DIR, sha_file: Path = SHA256_FILE) -> list[Path]:
    """Split and group the wheels of ``src`` into ``wheel_dir/calls/NN/`` folders of at most ``max_bytes``
    (largest first, first fit); refuses a wheel whose sha256 is not the listed one."""
    expected = read_sha256_file(sha_file)
    pieces: list[tuple[str, bytes | Path]] = []
    for w in sorted(src.glob("*.whl")):
        if expected.get(w.name) != sha256(w):
            raise SystemExit(f"{w}: sha256 {sha256(w)} is not the one listed in {sha_file} "
                             f"({expected.get(w.name)}); download it again or update the list")
        if w.stat().st_size <= max_bytes:
            pieces.append((w.name, w))
            continue
        with open(w, "rb") as f:
            for i, chunk in enumerate(iter(lambda: f.read(max_bytes), b"")):
                pieces.append((f"{w.name}{PART}{chr(97 + i // 26)}{chr(97 + i % 26)}", chunk))
    size = {name: (len(x) if isinstance(x, bytes) else x.stat().st_size) for name, x in pieces}
    calls: list[list[str]] = []
    for name in sorted(size, key=lambda n: -size[n]):
        room = next((c for c in calls if sum(size[n] for n in c) + size[name] <= max_bytes), None)
        if room is None:
            calls.append(room := [])
        room.append(name)
    shutil.rmtree(wheel_dir / "calls", ignore_errors=True)
    folders = []
    content = dict(pieces)
    for i, names in enumerate(calls, 1):
        folder = wheel_dir / "calls" / f"{i:02d}"
        folder.mkdir(parents=True)
        for name in names:
            x = content[name]
            (folder / name).write_bytes(x) if isinstance(x, bytes) else shutil.copy2(x, folder / name)
        folders.append(folder)
        print(f"[wheels] {folder.relative_to(wheel_dir.parent)}: {', '.join(sorted(names))} "
              f"({sum(size[n] for n in names) / 2 ** 20:.1f} MiB)", flush=True)
    return folders


def stash(wheel_dir: Path = WHEEL_DIR) -> list[Path]:
    """Move every carried file of ``parts/`` and ``calls/*/`` into ``stash/``, which no transfer names, so
    the next transfer (which replaces the carried folder) cannot remove it."""
    dst = wheel_dir / "stash"
    dst.mkdir(parents=True, exist_ok=True)
    moved = []
    carried = [wheel_dir / "parts", *sorted((wheel_dir / "calls").glob("*"))]
    for f in sorted(f for d in carried if d.is_dir() for f in d.iterdir()):
        if f.is_file():
            to = Path(shutil.move(str(f), dst / f.name))
            moved.append(to)
            print(f"[wheels] stashed {to.name} ({to.stat().st_size} bytes, sha256 {sha256(to)})", flush=True)
    return moved


def assemble(wheel_dir: Path = WHEEL_DIR) -> list[dict[str, Any]]:
    """Every wheel on offer: whole files in ``.whl/`` and the stash, and wheels reassembled from stashed
    parts into ``built/``; each with its parts, size and sha256."""
    stash_dir, built = wheel_dir / "stash", wheel_dir / "built"
    groups: dict[str, list[Path]] = {}
    wheels: list[dict[str, Any]] = []
    for folder in (wheel_dir, stash_dir):
        for f in sorted(folder.glob("*")) if folder.is_dir() else []:
            if f.is_file() and f.name.endswith(".whl"):
                wheels.append({"name": f.name, "path": f, "parts": []})
            elif f.is_file() and PART in f.name:
                groups.setdefault(f.name.split(PART)[0], []).append(f)
    for name, parts in sorted(groups.items()):
        built.mkdir(parents=True, exist_ok=True)
        out = built / name
        with open(out, "wb") as w:
            for p in sorted(parts):
                with open(p, "rb") as r:
                    shutil.copyfileobj(r, w, 1 << 22)
        wheels.append({"name": name, "path": out, "parts": [p.name.split(PART)[1] for p in sorted(parts)]})
    for w in wheels:
        w.update(bytes=w["path"].stat().st_size, sha256=sha256(w["path"]))
    return wheels


def install(target: Path, record: Path, wheel_dir: Path = WHEEL_DIR, sha_file: Path = SHA256_FILE) -> int:
    """Check and install every wheel on offer; 0 when each of them was installed (or none was carried)."""
    stash(wheel_dir)
    expected = read_sha256_file(sha_file)
    wheels = assemble(wheel_dir)
    for w in wheels:
        want = expected.get(w["name"])
        w["expected"] = want
        w["ok"] = want == w["sha256"]
        if want is None:
            w["reason"] = f"no sha256 listed in {sha_file.name}: not installed"
        elif not w["ok"]:
            w["reason"] = (f"sha256 mismatch after reassembling parts {w['parts']} ({w['bytes']} bytes): a part "
                           "is missing or damaged" if w["parts"] else "sha256 mismatch")
    good = [w for w in wheels if w["ok"]]
    rec: dict[str, Any] = {"sha256_file": str(sha_file), "target": str(target), "wheels": wheels, "pip_rc": None}
    if good:
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
               *[str(w["path"]) for w in good]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        rec["pip_rc"] = proc.returncode
        rec["pip_output"] = (proc.stdout + proc.stderr)[-2000:]
    for w in wheels:
        w["installed"] = w["ok"] and rec["pip_rc"] == 0
        w["path"] = str(w["path"])
        print(f"[wheels] {w['name']}: " + ("installed" if w["installed"] else w.get("reason", "pip failed")),
              flush=True)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(rec, indent=2))
    return 0 if all(w["installed"] for w in wheels) else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/wheels.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    pk = sub.add_parser("pack", help="check, split and group the wheels of a folder into .whl/calls/NN/")
    pk.add_argument("src", type=Path)
    pk.add_argument("--max-mib", type=float, default=60.0, help="most MiB one transfer carries (default 60)")
    sub.add_parser("stash", help="move .whl/parts/* and .whl/calls/*/* to .whl/stash/")
    ins = sub.add_parser("install", help="stash, reassemble, check sha256, install")
    ins.add_argument("--target", required=True, type=Path)
    ins.add_argument("--record", required=True, type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        pack(args.src, int(args.max_mib * 2 ** 20))
        return 0
    if args.cmd == "stash":
        stash()
        return 0
    return install(args.target, args.record)


if __name__ == "__main__":
    sys.exit(main())
