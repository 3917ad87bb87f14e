"""SHA-256 of teacher files: the hashes their publishers state, and each file's own, computed once.

OpenAI puts the SHA-256 of every CLIP release into its download URL (``clip/clip.py``, ``_MODELS``) and the
official FD loader checks it; :data:`KNOWN_SHA256` holds the two that FD distils from. Hashing a file reads it in
chunks, and the result is cached in ``$XDG_CACHE_HOME/fdfast/sha256.json`` (``~/.cache/fdfast/`` without
``XDG_CACHE_HOME``), keyed by absolute path, size and mtime, so a run re-reads a file only when it changed.
The cache is an optimisation only: when it cannot be read or written, the hash is computed again.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..files import atomic_write

log = logging.getLogger(__name__)

# From the URLs openaipublic.azureedge.net/clip/models/<sha256>/<name> in openai/CLIP clip/clip.py.
KNOWN_SHA256 = {
    "ViT-B-16.pt": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L-14.pt": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
}
_CHUNK = 1 << 20


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "fdfast" / "sha256.json"


def hash_file(path: Path) -> str:
    """SHA-256 of the file's bytes, read in 1 MiB chunks (release files are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(cache: dict) -> None:
    try:
        atomic_write(cache_path(), lambda tmp: tmp.write_text(json.dumps(cache, indent=1, sort_keys=True)))
    except OSError as e:
        log.debug("sha256 cache %s not written (%s); the hash will be computed again next time", cache_path(), e)


def file_sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256, from the cache when path, size and mtime are unchanged."""
    path = Path(path).resolve()
    before = path.stat()
    key = str(path)
    entry = _read_cache().get(key)
    if (isinstance(entry, dict) and entry.get("size") == before.st_size
            and entry.get("mtime_ns") == before.st_mtime_ns and isinstance(entry.get("sha256"), str)):
        return entry["sha256"]
    digest = hash_file(path)
    after = path.stat()
    if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):  # not rewritten meanwhile
        cache = _read_cache()  # re-read: another process may have added entries while this one hashed
        cache[key] = {"size": after.st_size, "mtime_ns": after.st_mtime_ns, "sha256": digest}
        _write_cache(cache)
    return digest
