"""Teacher release files are verified against published hashes and their SHA-256 is recorded, computed once.

The tiny OpenAI-layout archive stands in for ``ViT-B-16.pt``; the table of published hashes is patched to
the tiny file's own hash (match) or to another one (mismatch).
"""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

import _release_files as RF
from fdfast.config import TeacherConfig
from fdfast.models import release_hashes
from fdfast.models.teacher_files import TeacherLoadError
from fdfast.models.teachers import build_teacher

CLIP_KW = dict(patch_size=8, embed_dim=128, depth=2, num_heads=2)  # the geometry write_openai_clip uses


def _clip_cfg(path) -> TeacherConfig:
    return TeacherConfig(kind="clip", model="vit_base_patch16_clip_quickgelu_224", model_kwargs=CLIP_KW,
                         weights=str(path))


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def release_named_clip(tmp_path):
    return RF.write_openai_clip(tmp_path / "ViT-B-16.pt")


def test_a_release_file_with_the_published_hash_is_accepted(release_named_clip, monkeypatch):
    digest = _sha256(release_named_clip)
    monkeypatch.setitem(release_hashes.KNOWN_SHA256, "ViT-B-16.pt", digest)
    teacher = build_teacher(_clip_cfg(release_named_clip), 32)
    assert teacher.sha256 == digest and teacher.weights == str(release_named_clip)


def test_a_release_file_with_another_hash_is_refused(release_named_clip, monkeypatch):
    expected = "0" * 64
    monkeypatch.setitem(release_hashes.KNOWN_SHA256, "ViT-B-16.pt", expected)
    with pytest.raises(TeacherLoadError) as e:
        build_teacher(_clip_cfg(release_named_clip), 32)
    msg = str(e.value)
    assert str(release_named_clip) in msg and expected in msg and _sha256(release_named_clip) in msg
    assert "Download the file again" in msg and "rename it" in msg

    other = release_named_clip.rename(release_named_clip.with_name("my-clip-b16.pt"))  # the documented fix
    assert build_teacher(_clip_cfg(other), 32).sha256 == _sha256(other)


def test_every_teacher_records_its_file_hash_and_random_has_none(tmp_path):
    path = tmp_path / "dino_vitbase16_pretrain.pth"
    torch.save(RF.dino_state_dict(), path)
    cfg = TeacherConfig(kind="dino", model="vit_base_patch16_224", weights=str(path),
                        model_kwargs=dict(patch_size=8, embed_dim=128, depth=2, num_heads=2))
    assert build_teacher(cfg, 32).sha256 == _sha256(path)
    assert build_teacher(TeacherConfig(kind="dino", model="vit_base_patch16_224", model_kwargs=cfg.model_kwargs),
                         32).sha256 is None


def test_hash_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    calls = []
    real = release_hashes.hash_file
    monkeypatch.setattr(release_hashes, "hash_file", lambda p: calls.append(p) or real(p))
    path = tmp_path / "weights.pt"
    path.write_bytes(b"x" * (3 << 20))  # several chunks
    want = _sha256(path)

    assert release_hashes.file_sha256(path) == want and len(calls) == 1
    assert release_hashes.file_sha256(path) == want and len(calls) == 1  # from the cache, not re-read
    entry = json.loads((tmp_path / "cache" / "fdfast" / "sha256.json").read_text())[str(path.resolve())]
    assert entry["sha256"] == want and entry["size"] == 3 << 20

    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: the file may have changed
    assert release_hashes.file_sha256(path) == want and len(calls) == 2
    path.write_bytes(b"y" * 10)
    assert release_hashes.file_sha256(path) == hashlib.sha256(b"y" * 10).hexdigest() and len(calls) == 3


def test_an_unwritable_cache_never_fails(tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    path = tmp_path / "weights.pt"
    path.write_bytes(b"abc")
    for _ in range(2):  # computed again each time, never an error
        assert release_hashes.file_sha256(path) == hashlib.sha256(b"abc").hexdigest()
    assert blocker.read_text().startswith("a file")
