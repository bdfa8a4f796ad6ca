"""What every task needs: the checked output directories, the model, and its cache identity."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from uqvlm.cache import file_digest
from uqvlm.paths import ensure_writable


@dataclass
class RunDirs:
    cache: Path
    results: Path


def prepare_dirs(cfg: DictConfig) -> RunDirs:
    """Check, before any compute, that the cache and results directories are writable."""
    return RunDirs(
        cache=ensure_writable(cfg.paths.cache_dir, "cache"),
        results=ensure_writable(cfg.paths.results_dir, "results"),
    )


def resolve_pretrained(model_cfg: DictConfig, cache_dir: Path) -> str | None:
    """The ``pretrained`` argument for open_clip; ``shapes`` means uqvlm's own cached tiny model."""
    pretrained = model_cfg.get("pretrained")
    if pretrained == "shapes":
        from uqvlm.models.pretrained import ensure_pretrained

        return str(ensure_pretrained(cache_dir, **(model_cfg.get("pretrain") or {})))
    return None if pretrained in (None, "", "none") else str(pretrained)


def model_identity(name: str, pretrained: str | None, precision: str) -> dict[str, Any]:
    """What determines a model's outputs: name, checkpoint (by content when it is a file), precision."""
    if pretrained and os.path.isfile(pretrained):
        weights = f"sha256:{file_digest(pretrained)}"
    else:
        weights = pretrained or "random-init"
    return {"name": name, "weights": weights, "precision": precision}


@dataclass
class LoadedModel:
    vlm: Any
    identity: dict[str, Any]
    precision: str
    batch_size: int


def load_model(cfg: DictConfig, dirs: RunDirs) -> LoadedModel:
    from uqvlm.extraction import resolve_device
    from uqvlm.models.adapter import load_vlm

    pretrained = resolve_pretrained(cfg.model, dirs.cache)
    precision = cfg.model.get("precision", "fp32")
    vlm = load_vlm(cfg.model.name, pretrained, device=str(resolve_device(cfg.device)), precision=precision)
    return LoadedModel(
        vlm,
        model_identity(cfg.model.name, pretrained, precision),
        precision,
        int(cfg.model.get("batch_size", 256)),
    )
