"""Build datasets from config sections (``cfg.dataset`` / ``cfg.hessian_data``) by their ``kind``.

Each kind maps to a constructor; config keys are passed by name. A section may also carry the keys the
tasks read (the fields of its settings in :mod:`uqvlm.data.sections`); any other key is refused as a
typo, with the closest known key, so ``domian: photo`` cannot silently run on the default domain. A
value the constructor refuses (a ValueError) is reported as a :class:`~uqvlm.errors.ConfigError` of the
section.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from uqvlm.config_utils import to_plain
from uqvlm.data.base import PairDataset, ZeroShotDataset
from uqvlm.data.sections import DatasetSettings, PairDataSettings, PublishedFactorsSettings, task_keys
from uqvlm.data.shapes import ShapesPairs, ShapesZeroShot
from uqvlm.data.shapes_proxy import ShapesProxyPairs
from uqvlm.data.sources import HFPairs, HFZeroShot, ImageFolderZeroShot, WebDatasetPairs
from uqvlm.data.templates import resolve_templates
from uqvlm.errors import ConfigError, UqvlmError
from uqvlm.validation import check_keys

# Keys a section carries for the tasks beside its constructor's arguments (``kind`` picks the
# constructor); passed on only where the constructor takes them too.
DATASET_TASK_KEYS = task_keys(DatasetSettings)
PAIR_TASK_KEYS = task_keys(PairDataSettings)
# hessian_data kinds read by tasks/hessian.py that are not pair datasets: their keys.
FACTOR_KINDS: dict[str, frozenset[str]] = {PublishedFactorsSettings.KIND: task_keys(PublishedFactorsSettings)}


def _shapes_zeroshot(**kw: Any) -> ZeroShotDataset:
    spec = kw.pop("templates", None)
    # "default" means the shapes world's own prompts; a named set or a list replaces them.
    kw["templates"] = None if spec in (None, "default") else resolve_templates(spec)
    return ShapesZeroShot(**kw)


def _shapes_pairs(**kw: Any) -> PairDataset:
    return ShapesPairs(**kw)


ZEROSHOT_KINDS: dict[str, Callable[..., ZeroShotDataset]] = {
    "hf": HFZeroShot,
    "imagefolder": ImageFolderZeroShot,
    "shapes": _shapes_zeroshot,
}
PAIR_KINDS: dict[str, Callable[..., PairDataset]] = {
    "wds": WebDatasetPairs,
    "hf": HFPairs,
    "shapes": _shapes_pairs,
    "shapes-proxy": ShapesProxyPairs,
}
# The wrappers take the keys of the classes they build.
for _wrapper, _cls in ((_shapes_zeroshot, ShapesZeroShot), (_shapes_pairs, ShapesPairs)):
    _wrapper.__signature__ = inspect.signature(_cls)  # type: ignore[attr-defined]


def constructor_keys(factory: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword arguments ``factory`` takes; None when it takes any (``**kwargs``)."""
    params = inspect.signature(factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is not inspect.Parameter.VAR_POSITIONAL)


def _kind_keys(
    kind: Any, kinds: Mapping[str, Callable[..., Any]], task_keys: frozenset[str], what: str
) -> frozenset[str] | None:
    if kind not in kinds:
        raise ConfigError(f"unknown {what} kind {kind!r}; known kinds: {', '.join(sorted(kinds))}")
    params = constructor_keys(kinds[kind])
    return None if params is None else params | task_keys


def zeroshot_dataset_keys(kind: Any) -> frozenset[str] | None:
    """Every key a ``dataset`` section of ``kind`` may hold (None: any)."""
    return _kind_keys(kind, ZEROSHOT_KINDS, DATASET_TASK_KEYS, "dataset")


def pair_dataset_keys(kind: Any) -> frozenset[str] | None:
    """Every key a ``hessian_data`` section of ``kind`` may hold (None: any)."""
    if kind in FACTOR_KINDS:
        return FACTOR_KINDS[kind]
    if kind not in PAIR_KINDS:
        known = ", ".join(sorted([*PAIR_KINDS, *FACTOR_KINDS]))
        raise ConfigError(f"unknown pair dataset kind {kind!r}; known kinds: {known}")
    return _kind_keys(kind, PAIR_KINDS, PAIR_TASK_KEYS, "pair dataset")


def _build(
    cfg: Mapping,
    kinds: Mapping[str, Callable[..., Any]],
    task_keys: frozenset[str],
    what: str,
    section: str,
) -> Any:
    kw = dict(to_plain(cfg, section))
    kind = kw.pop("kind", None)
    allowed = _kind_keys(kind, kinds, task_keys, what)
    if allowed is not None:
        check_keys(section, kw, allowed)
    factory = kinds[kind]
    params = constructor_keys(factory)
    try:
        return factory(**{k: v for k, v in kw.items() if params is None or k in params})
    except UqvlmError:
        raise
    except ValueError as err:  # a value the constructor refuses (an unknown domain, a bad template)
        raise ConfigError(f"{section}: {err}") from err


def build_zeroshot_dataset(cfg: Mapping, section: str = "dataset") -> ZeroShotDataset:
    """The labelled dataset a ``dataset`` config section describes (``kind``: hf | imagefolder | shapes).

    ``section`` names the section in errors (an unknown key, a mandatory value left unset).
    """
    return _build(cfg, ZEROSHOT_KINDS, DATASET_TASK_KEYS, "dataset", section)


def build_pair_dataset(cfg: Mapping, section: str = "hessian_data") -> PairDataset:
    """The image-caption pairs a ``hessian_data`` config section describes (``kind``: wds | hf | shapes)."""
    return _build(cfg, PAIR_KINDS, PAIR_TASK_KEYS, "pair dataset", section)
