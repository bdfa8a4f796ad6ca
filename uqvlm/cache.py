"""On-disk caches: atomic, checksummed, keyed by everything that determines their content.

A cache entry is one file: a magic line, the SHA-256 of the payload, then the ``torch.save`` payload.
It is written to a temporary file in the same directory and moved into place with ``os.replace``, so
readers never see a partial file; a truncated or altered file fails the checksum and is rebuilt.
Concurrent builders of the same key serialise on a file lock next to the entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from filelock import FileLock

from uqvlm.console import console

MAGIC = b"UQVLM-CACHE-1\n"
FORMAT_VERSION = 1

T = TypeVar("T")


class CacheCorruptError(Exception):
    """A cache file exists but fails its checksum, magic or key check."""


def cache_key(**parts: Any) -> str:
    """A stable hex key of JSON-serialisable parts (the cache format version included)."""
    blob = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (for keying caches on checkpoint contents)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[io.IOBase]:
    """Open a temporary sibling of ``path``; on success fsync and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_entry(path: str | os.PathLike, obj: Any) -> None:
    """Serialise ``obj`` (tensors, dicts, lists, numbers, strings) atomically with a checksum."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    with atomic_write(path) as f:
        f.write(MAGIC)
        f.write(hashlib.sha256(payload).hexdigest().encode() + b"\n")
        f.write(payload)


def load_entry(path: str | os.PathLike) -> Any:
    """Load a cache entry written by :func:`save_entry`, verifying its checksum."""
    data = Path(path).read_bytes()
    if not data.startswith(MAGIC):
        raise CacheCorruptError(f"{path}: not a uqvlm cache file")
    digest, _, payload = data[len(MAGIC) :].partition(b"\n")
    if hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CacheCorruptError(f"{path}: checksum mismatch (truncated or altered)")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def load_verified(path: str | os.PathLike, expected_meta: dict[str, Any] | None = None) -> Any | None:
    """The entry at ``path``, or None when it is absent, corrupt or was built for other inputs."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        entry = load_entry(path)
    except (CacheCorruptError, EOFError, RuntimeError, OSError) as err:
        console.print(f"[yellow]cache: discarding unreadable entry ({err}); rebuilding[/]")
        return None
    if expected_meta is not None:
        meta = entry.get("meta", {}) if isinstance(entry, dict) else {}
        diff = {k: (meta.get(k), v) for k, v in expected_meta.items() if meta.get(k) != v}
        if diff:
            console.print(f"[yellow]cache: {path.name} was built for other inputs {diff}; rebuilding[/]")
            return None
    return entry


def get_or_build(
    path: str | os.PathLike,
    build: Callable[[], T],
    expected_meta: dict[str, Any] | None = None,
) -> T:
    """Load a verified entry, or build and save it under a file lock (one builder per key)."""
    path = Path(path)
    entry = load_verified(path, expected_meta)
    if entry is not None:
        return entry
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        # Another process may have finished it while we waited for the lock.
        entry = load_verified(path, expected_meta)
        if entry is not None:
            return entry
        entry = build()
        save_entry(path, entry)
        return entry
