"""uqvlm's own pretrained checkpoints: the tiny CLIP trained on the shapes world, cached by recipe."""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import Any

from filelock import FileLock

from uqvlm.cache import atomic_write, cache_key, file_digest
from uqvlm.console import console
from uqvlm.errors import ConfigError

# Bump when the shapes world or the training recipe changes: old checkpoints then no longer match.
RECIPE_VERSION = 1
# Arguments of pretrain_tiny that do not change the checkpoint.
NON_RECIPE_ARGS = ("progress",)


def _recipe_fingerprint() -> str:
    """The code that determines the checkpoint: the shapes renderer and the training recipe."""
    from uqvlm.data import shapes
    from uqvlm.models import tiny

    h = hashlib.sha256()
    for module in (shapes, tiny):
        h.update(Path(module.__file__).read_bytes())
    h.update((Path(tiny.CONFIG_DIR) / f"{tiny.MODEL_NAME}.json").read_bytes())
    return h.hexdigest()[:16]


def ensure_pretrained(cache_dir: str | Path, **recipe: Any) -> Path:
    """The path of the shapes-pretrained tiny CLIP for ``recipe`` (e.g. seed), training it if missing.

    The checkpoint is a plain open_clip state dict (so ``open_clip.create_model(..., pretrained=path)``
    loads it) with a ``.sha256`` sidecar; a checkpoint whose bytes fail the sidecar is retrained.
    """
    from uqvlm.models.tiny import MODEL_NAME, pretrain_tiny

    # The full recipe, defaults filled in, so {} and {"seed": 0} name the same checkpoint.
    defaults = {
        name: p.default
        for name, p in inspect.signature(pretrain_tiny).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in NON_RECIPE_ARGS
    }
    unknown = set(recipe) - set(defaults)
    if unknown:
        raise ConfigError(f"model.pretrain has unknown keys {sorted(unknown)}; known: {sorted(defaults)}")
    recipe = {**defaults, **recipe}
    key = cache_key(model=MODEL_NAME, recipe=recipe, version=RECIPE_VERSION, code=_recipe_fingerprint())
    path = Path(cache_dir) / "models" / f"{MODEL_NAME}-shapes-{key}.pt"
    sidecar = path.with_name(path.name + ".sha256")

    def valid() -> bool:
        return path.exists() and sidecar.exists() and sidecar.read_text().strip() == file_digest(path)

    if valid():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if valid():
            return path
        console.print(f"pretraining {MODEL_NAME} on the shapes world (once; cached at {path})")
        pretrain_tiny(path, **recipe)
        with atomic_write(sidecar, "w") as f:
            f.write(file_digest(path))
    return path
