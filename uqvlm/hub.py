"""Offline-first access to the Hugging Face hub, for model weights and tokenizers as for datasets.

huggingface_hub and datasets read ``HF_HUB_OFFLINE`` / ``HF_HOME`` once, at import; a machine without
internet and without ``HF_HUB_OFFLINE=1`` then spends ~25 s in retry loops before failing. These helpers
read the environment at call time, probe the endpoint once per process (a few seconds at most), and
serve files from the local cache first, so a missing file fails fast with a clear message.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

_TRUE = {"1", "on", "yes", "true"}
PROBE_TIMEOUT_S = 3.0


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def hub_cache_dir() -> str:
    """The hub cache directory as the environment says now (``HF_HUB_CACHE`` > ``HF_HOME/hub``)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def datasets_cache_dir() -> str | None:
    """``HF_DATASETS_CACHE`` > ``HF_HOME/datasets`` as set now; None means the datasets default."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return os.path.expanduser(os.environ["HF_DATASETS_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "datasets")
    return None


@functools.lru_cache(maxsize=16)
def reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the URL's host opens within a few seconds (cached per process)."""
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def is_offline() -> bool:
    """True when the hub must not be contacted: offline mode is set, or the endpoint cannot be reached."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        return True
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    return not reachable(os.environ.get("HF_ENDPOINT") or constants.ENDPOINT)


@contextlib.contextmanager
def offline_mode(enabled: bool = True) -> Iterator[None]:
    """Make huggingface_hub and datasets behave as under ``HF_HUB_OFFLINE=1`` (cache only, no retries)."""
    if not enabled:
        yield
        return
    from huggingface_hub import constants

    saved = [(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)]
    constants.HF_HUB_OFFLINE = True
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        for attr in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
            if hasattr(ds_config, attr):
                saved.append((ds_config, attr, getattr(ds_config, attr)))
                setattr(ds_config, attr, True)
    try:
        yield
    finally:
        for mod, attr, value in saved:
            setattr(mod, attr, value)


def cached_file(
    repo_id: str,
    filename: str,
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> str | None:
    """Path of ``filename`` from ``repo_id`` in the local hub cache, or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(
            repo_id, filename, cache_dir=cache_dir or hub_cache_dir(), revision=revision, repo_type=repo_type
        )
    except Exception:  # malformed repo ids and the like simply mean "not cached"
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def fetch_file(
    repo_id: str,
    filename: str,
    *,
    repo_type: str | None = None,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> str | None:
    """``filename`` from the cache, else downloaded when the hub is reachable; None when unavailable."""
    path = cached_file(repo_id, filename, repo_type=repo_type, revision=revision, cache_dir=cache_dir)
    if path is not None or is_offline():
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(
            repo_id,
            filename,
            repo_type=repo_type,
            revision=revision,
            cache_dir=cache_dir or hub_cache_dir(),
        )
    except Exception:
        return None


def cached_snapshot(
    repo_id: str, *, repo_type: str | None = None, revision: str | None = None, cache_dir: str | None = None
) -> Path | None:
    """The local snapshot folder of a repo in the hub cache (the one ``revision`` or ``main`` points to)."""
    kind = {None: "models", "model": "models", "dataset": "datasets", "space": "spaces"}[repo_type]
    root = Path(cache_dir or hub_cache_dir()) / f"{kind}--{repo_id.replace('/', '--')}"
    snapshots = root / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = root / "refs" / (revision or "main")
    if ref.is_file():
        snap = snapshots / ref.read_text().strip()
        if snap.is_dir():
            return snap
    if revision and (snapshots / revision).is_dir():
        return snapshots / revision
    candidates = sorted((p for p in snapshots.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


HOW_TO_POPULATE_CACHE = (
    "populate the Hugging Face cache on a machine with internet (`huggingface-cli download {repo}{flag}`, "
    "or `hf download {repo}{flag}`) and copy it here, pointing HF_HOME (or HF_HUB_CACHE) at it"
)


def how_to_populate(repo_id: str, repo_type: str | None = None) -> str:
    flag = " --repo-type dataset" if repo_type == "dataset" else ""
    return HOW_TO_POPULATE_CACHE.format(repo=repo_id, flag=flag)
