"""The keys each config group may hold: the fields of its settings (``uqvlm.settings``); any other key
is a typo and stops the run.

``check_config_keys`` walks the model, dataset, hessian_data, posterior and task sections of a composed
config before any compute. Dataset sections take their constructor's arguments plus the keys the tasks
read (``uqvlm.data.registry``; with ``protocols``, the arguments of any protocol's kind); ``task.methods`` entries take their ``_target_``'s constructor
arguments; every other section takes the fields of its settings class, a dataclass field being a
sub-section (tests/test_configs.py checks every shipped option).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import fields, is_dataclass
from functools import cache
from typing import Any, get_type_hints

from omegaconf import DictConfig, OmegaConf

from uqvlm.data.registry import (
    PROTOCOLS_KEY,
    constructor_keys,
    dataset_section_keys,
    pair_dataset_keys,
    zeroshot_dataset_keys,
)
from uqvlm.errors import UqvlmError
from uqvlm.settings import TASK_SETTINGS, ModelSettings, PosteriorSettings, Schema
from uqvlm.validation import check_keys

# (dotted path, the section, the keys it may hold: None for any)
Section = tuple[str, DictConfig, frozenset[str] | None]
# Keys that moved to the one task that reads them: where they are now.
MOVED_KEYS = {
    "posterior.predictive": "task.predictive (task=active_learning; zero-shot: task.methods.<name>.predictive)",
    "posterior.mc_samples": "task.mc_samples (task=active_learning; zero-shot: task.methods.<name>.samples)",
}
# Hydra's instantiate keys, allowed in every ``_target_`` spec.
INSTANTIATE_KEYS = frozenset({"_target_", "_args_", "_recursive_", "_convert_", "_partial_"})


@cache
def settings_keys(cls: type) -> dict[str, Any]:
    """The keys of a section typed by the dataclass ``cls``: key -> None (a value of any type), the keys
    of its sub-section (a dataclass field), or a ``Schema`` (keys declared elsewhere)."""
    hints = get_type_hints(cls)
    spec: dict[str, Any] = {}
    for f in fields(cls):
        if f.metadata.get("whole_section"):
            continue
        hint = hints[f.name]
        spec[f.name] = f.metadata.get("schema") or (settings_keys(hint) if is_dataclass(hint) else None)
    return spec


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


def _dataset_sections(path: str, node: DictConfig) -> Iterator[Section]:
    """A labelled dataset section, and each entry of its ``protocols`` with the keys of that entry's kind."""
    try:
        yield path, node, dataset_section_keys(node)
    except ValueError as err:
        raise UqvlmError(f"{path}.kind: {err}") from None
    protocols = _child(node, PROTOCOLS_KEY)
    for name in protocols or ():
        if (entry := _child(protocols, name)) is not None:
            here = f"{path}.{PROTOCOLS_KEY}.{name}"
            yield here, entry, _kind_keys(here, entry.get("kind", node.get("kind")), zeroshot_dataset_keys)


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
            yield from _dataset_sections(here, child)
        elif sub is Schema.PAIR_DATA:
            yield here, child, _kind_keys(here, child.get("kind"), pair_dataset_keys)
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
    yield "model", cfg.model, frozenset(settings_keys(ModelSettings))
    yield from _dataset_sections("dataset", cfg.dataset)
    yield (
        "hessian_data",
        cfg.hessian_data,
        _kind_keys("hessian_data", cfg.hessian_data.get("kind"), pair_dataset_keys),
    )
    yield "posterior", cfg.posterior, frozenset(settings_keys(PosteriorSettings))
    task = TASK_SETTINGS.get(cfg.task.get("name"))
    if task is not None:  # an unknown task is reported with the settings
        yield from _walk("task", cfg.task, settings_keys(task))


def moved_key_message(path: str) -> str | None:
    """Where the key at the dotted ``path`` is now, if it moved; else None."""
    return f"{path} is now {MOVED_KEYS[path]}" if path in MOVED_KEYS else None


def check_config_keys(cfg: DictConfig) -> None:
    """Stop on any key nothing reads, naming it and the closest known key (or where it moved)."""
    for path, node, allowed in config_sections(cfg):
        if allowed is not None:
            for key in node.keys():
                if key not in allowed and (moved := moved_key_message(f"{path}.{key}")):
                    raise UqvlmError(moved)
            check_keys(path, node.keys(), allowed)


def allowed_keys(cfg: DictConfig, path: str) -> frozenset[str] | None:
    """The keys the section at ``path`` may hold; None when it is not checked (any key)."""
    for section, _node, allowed in config_sections(cfg):
        if section == path:
            return allowed
    return None
