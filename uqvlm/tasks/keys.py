"""The keys each config group may hold, declared once; any other key is a typo and stops the run.

``check_config_keys`` walks the model, dataset, hessian_data, posterior and task sections of a composed
config before any compute. Dataset sections take their constructor's arguments plus the keys the tasks
read (``uqvlm.data.registry``); ``task.methods`` entries take their ``_target_``'s constructor
arguments; every other section is declared here. A key added to a shipped YAML must be declared here
too (tests/test_configs.py checks every shipped option).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, OmegaConf

from uqvlm.data.registry import constructor_keys, pair_dataset_keys, zeroshot_dataset_keys
from uqvlm.errors import UqvlmError
from uqvlm.validation import check_keys

MODEL_KEYS = frozenset({"name", "pretrained", "precision", "batch_size", "pretrain"})
POSTERIOR_KEYS = frozenset(
    {"structures", "n", "prior_precision", "evidence_variant", "predictive", "mc_samples"}
)
# Hydra's instantiate keys, allowed in every ``_target_`` spec.
INSTANTIATE_KEYS = frozenset({"_target_", "_args_", "_recursive_", "_convert_", "_partial_"})


class _Sections:
    """A mapping of free names (task.methods, task.data.domains) whose values share one schema."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


METHODS = _Sections("method")  # name -> a _target_ spec
DOMAINS = _Sections("dataset")  # domain -> dataset settings merged over task.data.common
DATASET = object()  # a dataset section (task.data.common)

_SPLITS = {"train": None, "val": None, "test": None}
# A nested dict is a section with its own keys; None is a value of any type.
TASK_KEYS: dict[str, dict[str, Any]] = {
    "zeroshot": {"name": None, "ece_bins": None, "methods": METHODS, "plots": None, "objective": None},
    "hessian": {"name": None},
    "active_learning": {
        "name": None,
        "data": {
            "name": None,
            "root": None,
            "target": None,
            "domains": DOMAINS,
            "pool": None,
            "include_target_in_pool": None,
            "common": DATASET,
            "splits": {"by": None, "seed": None, "fractions": _SPLITS},
            "sizes": _SPLITS,
        },
        "strategies": None,
        "budgets": None,
        "seeds": None,
        "structure": None,
        "samples": None,
        "k_nearest": None,
        "distance": None,
        "epig": {"candidates": None, "lazy": None, "batch": None, "update_scale": None, "dtype": None},
        "finetune": {"lr": None, "weight_decay": None, "epochs": None, "batch_size": None},
        "ece_bins": None,
    },
}


def _child(node: DictConfig, key: str) -> Any:
    """A sub-section, or None when the key is absent, unset (``???``) or not a section."""
    if key not in node or OmegaConf.is_missing(node, key):
        return None
    value = node._get_node(key)  # the node itself: its values may interpolate unset keys
    return value if isinstance(value, DictConfig) and not value._is_none() else None


def _target_keys(path: str, spec: DictConfig) -> frozenset[str] | None:
    target = spec.get("_target_")
    if target is None:
        raise UqvlmError(f"{path} needs a _target_ (the class to build, e.g. uqvlm.methods.MAP)")
    module, _, name = str(target).rpartition(".")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise UqvlmError(f"{path}._target_={target!r} cannot be imported ({err})") from None
    params = constructor_keys(factory)
    return None if params is None else params | INSTANTIATE_KEYS


def _walk(
    path: str, node: DictConfig, spec: dict[str, Any]
) -> Iterator[tuple[str, DictConfig, frozenset | None]]:
    yield path, node, frozenset(spec)
    for key, sub in spec.items():
        child = _child(node, key)
        if child is None or sub is None:
            continue
        if isinstance(sub, dict):
            yield from _walk(f"{path}.{key}", child, sub)
        elif sub is DATASET:
            yield f"{path}.{key}", child, zeroshot_dataset_keys(child.get("kind"))
        elif sub is METHODS:
            yield f"{path}.{key}", child, None
            for name in child:
                entry = _child(child, name)
                if entry is not None:
                    yield f"{path}.{key}.{name}", entry, _target_keys(f"{path}.{key}.{name}", entry)
        elif sub is DOMAINS:
            yield f"{path}.{key}", child, None
            common = _child(node, "common")
            default_kind = common.get("kind") if common is not None else None
            for name in child:
                entry = _child(child, name)
                if entry is not None:
                    kind = entry.get("kind", default_kind)
                    yield f"{path}.{key}.{name}", entry, zeroshot_dataset_keys(kind)


def config_sections(cfg: DictConfig) -> Iterator[tuple[str, DictConfig, frozenset[str] | None]]:
    """(path, section, the keys it may hold or None for any) of every checked section of ``cfg``."""

    def kind_keys(section: str, keys_of) -> frozenset[str] | None:
        try:
            return keys_of(cfg[section].get("kind"))
        except ValueError as err:
            raise UqvlmError(f"{section}.kind: {err}") from None

    yield "model", cfg.model, MODEL_KEYS
    yield "dataset", cfg.dataset, kind_keys("dataset", zeroshot_dataset_keys)
    yield "hessian_data", cfg.hessian_data, kind_keys("hessian_data", pair_dataset_keys)
    yield "posterior", cfg.posterior, POSTERIOR_KEYS
    spec = TASK_KEYS.get(cfg.task.get("name"))
    if spec is not None:  # an unknown task is reported by the CLI
        yield from _walk("task", cfg.task, spec)


def check_config_keys(cfg: DictConfig) -> None:
    """Stop on any key nothing reads, naming it and the closest known key."""
    for path, node, allowed in config_sections(cfg):
        if allowed is not None:
            check_keys(path, node.keys(), allowed)


def allowed_keys(cfg: DictConfig, path: str) -> frozenset[str] | None:
    """The keys the section at ``path`` may hold; None when it is not checked (any key)."""
    for section, _node, allowed in config_sections(cfg):
        if section == path:
            return allowed
    return None
