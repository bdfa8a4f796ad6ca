"""Build datasets from config sections (``cfg.dataset`` / ``cfg.hessian_data``) by their ``kind``.

Each kind maps to a constructor; config keys are passed by name, and keys a constructor does not take
(``kind``, ``val_split``, ``class_batch``, ...) are left for the tasks that read them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Mapping
from typing import Any

from uqvlm.config_utils import to_plain
from uqvlm.data.base import PairDataset, ZeroShotDataset
from uqvlm.data.shapes import ShapesPairs, ShapesZeroShot
from uqvlm.data.sources import HFPairs, HFZeroShot, ImageFolderZeroShot, WebDatasetPairs
from uqvlm.data.templates import resolve_templates

log = logging.getLogger(__name__)


def _shapes_zeroshot(**kw: Any) -> ZeroShotDataset:
    spec = kw.pop("templates", None)
    # "default" means the shapes world's own prompts; a named set or a list replaces them.
    kw["templates"] = None if spec in (None, "default") else resolve_templates(spec)
    return _call(ShapesZeroShot, kw)


def _shapes_pairs(**kw: Any) -> PairDataset:
    return _call(ShapesPairs, kw)


ZEROSHOT_KINDS: dict[str, Callable[..., ZeroShotDataset]] = {
    "hf": HFZeroShot,
    "imagefolder": ImageFolderZeroShot,
    "shapes": _shapes_zeroshot,
}
PAIR_KINDS: dict[str, Callable[..., PairDataset]] = {
    "wds": WebDatasetPairs,
    "hf": HFPairs,
    "shapes": _shapes_pairs,
}


def _call(factory: Callable[..., Any], kw: Mapping[str, Any]) -> Any:
    """Call ``factory`` with the keys it accepts (all of them when it takes ``**kwargs``)."""
    params = inspect.signature(factory).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**kw)
    accepted = {k: v for k, v in kw.items() if k in params}
    ignored = sorted(set(kw) - set(accepted))
    if ignored:
        log.debug("%s ignores config keys %s", getattr(factory, "__name__", factory), ignored)
    return factory(**accepted)


def _build(cfg: Mapping, kinds: Mapping[str, Callable[..., Any]], what: str, section: str) -> Any:
    kw = dict(to_plain(cfg, section))
    kind = kw.pop("kind", None)
    if kind not in kinds:
        raise ValueError(f"unknown {what} kind {kind!r}; known kinds: {', '.join(sorted(kinds))}")
    return _call(kinds[kind], kw)


def build_zeroshot_dataset(cfg: Mapping) -> ZeroShotDataset:
    """The labelled dataset a ``dataset`` config section describes (``kind``: hf | imagefolder | shapes)."""
    return _build(cfg, ZEROSHOT_KINDS, "dataset", "dataset")


def build_pair_dataset(cfg: Mapping) -> PairDataset:
    """The image-caption pairs a ``hessian_data`` config section describes (``kind``: wds | hf | shapes)."""
    return _build(cfg, PAIR_KINDS, "pair dataset", "hessian_data")
