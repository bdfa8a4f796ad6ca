"""The keys each config group may hold, declared once; any other key is a typo and stops the run.

``check_config_keys`` walks the model, dataset, hessian_data, posterior and task sections of a composed
config before any compute. Dataset sections take their constructor's arguments plus the keys the tasks
read (``uqvlm.data.registry``); ``task.methods`` entries take their ``_target_``'s constructor
arguments; every other section is declared here. A key added to a shipped YAML must be declared here
too (tests/test_configs.py checks every shipped option).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from enum import Enum
from typing import Any

from omegaconf import DictConfig, OmegaConf

from uqvlm.data.registry import constructor_keys, pair_dataset_keys, zeroshot_dataset_keys
from uqvlm.errors import UqvlmError
from uqvlm.validation import check_keys

MODEL_KEYS = frozenset({"name", "pretrained", "precision", "batch_size", "pretrain"})
POSTERIOR_KEYS = frozenset(
    {"structures", "n", "prior_precision", "evidence_variant", "predictive", "mc_samples"}
)
# (dotted path, the section, the keys it may hold: None for any)
Section = tuple[str, DictConfig, frozenset[str] | None]
# Hydra's instantiate keys, allowed in every ``_target_`` spec.
INSTANTIATE_KEYS = frozenset({"_target_", "_args_", "_recursive_", "_convert_", "_partial_"})


class Schema(Enum):
    """Sections whose keys are not listed here."""

    DATASET = "a dataset section: its kind's constructor arguments plus the tasks' keys"
    METHODS = "method name -> a _target_ spec: its constructor's arguments"
    DOMAINS = "domain name -> a dataset section merged over task.data.common"


_SPLITS = {"train": None, "val": None, "test": None}
# A nested dict is a section with its own keys; None is a value of any type.
TASK_KEYS: dict[str, dict[str, Any]] = {
    "zeroshot": {"name": None, "ece_bins": None, "methods": Schema.METHODS, "plots": None, "objective": None},
    "hessian": {"name": None},
    "active_learning": {
        "name": None,
        "data": {
            "name": None,
            "root": None,
            "target": None,
            "common": Schema.DATASET,  # before the domains, which inherit its kind
            "domains": Schema.DOMAINS,
            "pool": None,
            "include_target_in_pool": None,
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


def _kind_keys(
    path: str, kind: Any, keys_of: Callable[[Any], frozenset[str] | None]
) -> frozenset[str] | None:
    try:
        return keys_of(kind)
    except ValueError as err:
        raise UqvlmError(f"{path}.kind: {err}") from None


def _walk(path: str, node: DictConfig, spec: dict[str, Any]) -> Iterator[Section]:
    yield path, node, frozenset(spec)
    for key, sub in spec.items():
        child = _child(node, key)
        if child is None or sub is None:
            continue
        here = f"{path}.{key}"
        if isinstance(sub, dict):
            yield from _walk(here, child, sub)
        elif sub is Schema.DATASET:
            yield here, child, _kind_keys(here, child.get("kind"), zeroshot_dataset_keys)
        elif sub is Schema.METHODS:
            yield here, child, None
            for name in child:
                if (entry := _child(child, name)) is not None:
                    yield f"{here}.{name}", entry, _target_keys(f"{here}.{name}", entry)
        elif sub is Schema.DOMAINS:
            yield here, child, None
            common = _child(node, "common")
            default_kind = common.get("kind") if common is not None else None
            for name in child:
                if (entry := _child(child, name)) is not None:
                    kind = entry.get("kind", default_kind)
                    yield f"{here}.{name}", entry, _kind_keys(f"{here}.{name}", kind, zeroshot_dataset_keys)


def config_sections(cfg: DictConfig) -> Iterator[Section]:
    """(path, section, the keys it may hold or None for any) of every checked section of ``cfg``."""
    yield "model", cfg.model, MODEL_KEYS
    yield "dataset", cfg.dataset, _kind_keys("dataset", cfg.dataset.get("kind"), zeroshot_dataset_keys)
    yield (
        "hessian_data",
        cfg.hessian_data,
        _kind_keys("hessian_data", cfg.hessian_data.get("kind"), pair_dataset_keys),
    )
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
