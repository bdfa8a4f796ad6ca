"""Where caches and results go, and an early check that we can write there."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from uqvlm.errors import UqvlmError


class UnwritableDirectoryError(UqvlmError):
    """A configured output directory cannot be created or written."""


def default_cache_dir() -> Path:
    """``$UQVLM_CACHE`` if set, else ``~/.cache/uqvlm``."""
    env = os.environ.get("UQVLM_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/uqvlm").expanduser()


def ensure_writable(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` and prove it writable by writing a probe file; raise a clear error if not."""
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-probe-"):
            pass
    except OSError as err:
        raise UnwritableDirectoryError(
            f"The {what} directory {str(path)!r} is not writable ({err.strerror or err}). "
            f"Choose another with paths.{what}_dir=/some/dir"
            + (" or the UQVLM_CACHE environment variable." if what == "cache" else ".")
        ) from None
    return path
