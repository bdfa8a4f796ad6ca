"""What every task needs: its settings, the checked output directories, the model and its cache
identity, and the result it hands back."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig

from uqvlm.cache import file_digest
from uqvlm.devices import device_of, largest_fitting_batch, loader_workers
from uqvlm.paths import ensure_writable
from uqvlm.settings import ModelSettings, PathSettings, RunSettings
from uqvlm.tasks.keys import check_config_keys


@dataclass(frozen=True)
class TaskResult:
    """What every ``tasks/*.run`` returns: its table (None when it writes none), the value a sweeper
    minimises (``task.objective``; None without one), and the run record it wrote (None without one)."""

    table: pd.DataFrame | None = None
    objective: float | None = None
    record: Path | None = None


def load_settings(cfg: DictConfig) -> RunSettings:
    """The run's typed settings: every key and value of ``cfg`` checked, before any compute."""
    check_config_keys(cfg)
    return RunSettings.from_config(cfg)


@dataclass
class RunDirs:
    cache: Path
    results: Path


def prepare_dirs(paths: PathSettings) -> RunDirs:
    """Check, before any compute, that the cache and results directories are writable."""
    return RunDirs(
        cache=ensure_writable(paths.cache_dir, "cache"),
        results=ensure_writable(paths.results_dir, "results"),
    )


def resolve_pretrained(model: ModelSettings, cache_dir: Path) -> str | None:
    """The ``pretrained`` argument for open_clip; ``shapes`` means uqvlm's own cached tiny model."""
    if model.pretrained == "shapes":
        from uqvlm.models.pretrained import ensure_pretrained

        return str(ensure_pretrained(cache_dir, **model.pretrain))
    return None if model.pretrained in (None, "", "none") else model.pretrained


def model_identity(name: str, pretrained: str | None, precision: str) -> dict[str, Any]:
    """What determines a model's outputs: name, checkpoint (by content when it is a file), precision."""
    if pretrained and os.path.isfile(pretrained):
        weights = f"sha256:{file_digest(pretrained)}"
    else:
        weights = pretrained or "random-init"
    return {"name": name, "weights": weights, "precision": precision}


AUTO = "auto"
# model.batch_size=auto on the CPU, where a larger batch buys nothing.
CPU_BATCH = 256


@dataclass
class LoadedModel:
    """The model of this run and how features are extracted with it (batch size, loader workers).

    The model owns the device (``vlm.device``): extraction, fitting and prediction follow it."""

    vlm: Any
    identity: dict[str, Any]
    precision: str
    # model.batch_size: a size, or ``auto``
    batch_setting: int | str
    num_workers: int = 0

    @property
    def device(self) -> torch.device:
        return device_of(self.vlm)

    @cached_property
    def batch_size(self) -> int:
        """The extraction batch: ``auto`` is the largest that fits on CUDA, probed at the first use (a task
        that never extracts never probes), and ``CPU_BATCH`` on the CPU."""
        if self.batch_setting != AUTO:
            return int(self.batch_setting)
        if self.device.type != "cuda":
            return CPU_BATCH
        return largest_fitting_batch(self.vlm.encode_dummy)


def load_model(settings: RunSettings, dirs: RunDirs) -> LoadedModel:
    # Imported here: open_clip takes seconds to import, and `uqvlm run --help` needs none of it.
    from uqvlm.models import load_vlm

    model = settings.model
    pretrained = resolve_pretrained(model, dirs.cache)
    vlm = load_vlm(model.name, pretrained, device=settings.device, precision=model.precision)
    if vlm.device.type == "cuda":
        vlm.channels_last()
    if settings.compile:
        vlm.compile()
    return LoadedModel(
        vlm,
        model_identity(model.name, pretrained, model.precision),
        model.precision,
        model.batch_size,
        loader_workers(settings.num_workers, vlm.device),
    )


def extract_features(model: LoadedModel, dirs: RunDirs, dataset, description: str) -> dict[str, Any]:
    """Cached features of ``dataset`` under this run's model (on its device) and loader settings."""
    from uqvlm.extraction import extract

    return extract(
        model.vlm,
        dataset,
        cache_dir=dirs.cache,
        model_id=model.identity,
        dataset_id=dataset.fingerprint(),
        batch_size=model.batch_size,
        num_workers=model.num_workers,
        precision=model.precision,
        description=description,
    )
