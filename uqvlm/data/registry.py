"""Build datasets from config sections (``cfg.dataset`` / ``cfg.hessian_data``) by their ``kind``.

Each kind maps to a constructor; config keys are passed by name. A section may also carry the keys the
tasks read (the fields of its settings in :mod:`uqvlm.data.sections`); any other key is refused as a
typo, with the closest known key, so ``domian: photo`` cannot silently run on the default domain. A
value the constructor refuses (a ValueError) is reported as a :class:`~uqvlm.errors.ConfigError` of the
section.

A labelled dataset section may further hold, whatever its kind (:data:`SELECTION_KEYS`):

- ``protocol`` / ``protocols``: the evaluation protocols the dataset offers (``bayesvlm``: the published
  BayesVLM splits; ``clip_benchmark``: CLIP_benchmark's) and the one chosen; the chosen entry's keys are
  merged over the section (:func:`uqvlm.data.sections.apply_protocol`).
- ``subset``: a published seeded cut of the source's items (:mod:`uqvlm.data.sources.splits`), applied
  before the ``n`` cap.
- ``class_ids``: each class's identity across datasets (``imagenet1k``, ``imagenet-r``, ``imagenet-a``: the
  WordNet ids of :mod:`uqvlm.data.sources.imagenet` by label; ``folders``: an image folder's class folder
  names; or a list), by which active-learning domains are aligned.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from uqvlm.config_utils import require_set, to_plain
from uqvlm.data.base import PairDataset, ZeroShotDataset
from uqvlm.data.hub_shards import hub_shard_pairs
from uqvlm.data.sections import (
    PROTOCOL_KEY,
    PROTOCOLS_KEY,
    DatasetSettings,
    PairDataSettings,
    PublishedFactorsSettings,
    apply_protocol,
    task_keys,
)
from uqvlm.data.shapes import ShapesPairs, ShapesZeroShot
from uqvlm.data.shapes_proxy import ShapesProxyPairs
from uqvlm.data.sources import (
    HFPairs,
    HFZeroShot,
    ImageFolderZeroShot,
    ImageNetRFolder,
    WebDatasetPairs,
    ZhouSplitZeroShot,
)
from uqvlm.data.sources.imagenet import CLASS_ID_LISTS
from uqvlm.data.sources.splits import select_subset
from uqvlm.data.templates import resolve_templates
from uqvlm.errors import ConfigError, DatasetFormatError, UqvlmError
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
    "imagenet-r-folder": ImageNetRFolder,
    "zhou": ZhouSplitZeroShot,
    "shapes": _shapes_zeroshot,
}
# Keys of every labelled dataset section that the registry reads itself (module docstring).
SUBSET_KEY, CLASS_IDS_KEY = "subset", "class_ids"
SELECTION_KEYS = frozenset({PROTOCOL_KEY, PROTOCOLS_KEY, SUBSET_KEY, CLASS_IDS_KEY})
PAIR_KINDS: dict[str, Callable[..., PairDataset]] = {
    "wds": WebDatasetPairs,
    "hf": HFPairs,
    "hf_wds": hub_shard_pairs,
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
    return _kind_keys(kind, ZEROSHOT_KINDS, DATASET_TASK_KEYS | SELECTION_KEYS, "dataset")


def protocol_kinds(section: Mapping) -> list[Any]:
    """The kinds a dataset section may build: its own and those of its ``protocols`` entries."""
    kinds = [section.get("kind")] if section.get("kind") is not None else []
    for entry in (section.get(PROTOCOLS_KEY) or {}).values():
        if isinstance(entry, Mapping) and entry.get("kind") is not None and entry["kind"] not in kinds:
            kinds.append(entry["kind"])
    return kinds or [None]


def dataset_section_keys(section: Mapping) -> frozenset[str] | None:
    """Every key a ``dataset`` section may hold: its kind's, or with ``protocols`` those of any protocol's
    kind (None: any)."""
    allowed: frozenset[str] = frozenset()
    for kind in protocol_kinds(section):
        keys = zeroshot_dataset_keys(kind)
        if keys is None:
            return None
        allowed |= keys
    return allowed


def pair_dataset_keys(kind: Any) -> frozenset[str] | None:
    """Every key a ``hessian_data`` section of ``kind`` may hold (None: any)."""
    if kind in FACTOR_KINDS:
        return FACTOR_KINDS[kind]
    if kind not in PAIR_KINDS:
        known = ", ".join(sorted([*PAIR_KINDS, *FACTOR_KINDS]))
        raise ConfigError(f"unknown pair dataset kind {kind!r}; known kinds: {known}")
    return _kind_keys(kind, PAIR_KINDS, PAIR_TASK_KEYS, "pair dataset")


def _build(
    kw: dict[str, Any],
    kinds: Mapping[str, Callable[..., Any]],
    task_keys: frozenset[str],
    what: str,
    section: str,
) -> Any:
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


def _chosen_protocol(kw: dict[str, Any], section: str) -> dict[str, Any]:
    """The section of its chosen protocol; the shared keys that protocol's kind does not read must be
    unset (a split file given to the protocol that reads none is a mistake, not a no-op) and are dropped."""
    if kw.get(PROTOCOLS_KEY) is None and kw.get(PROTOCOL_KEY) is None:
        return kw
    kw = apply_protocol(kw, section)  # a no-op on a section already resolved (DatasetSettings.section)
    allowed = zeroshot_dataset_keys(kw.get("kind"))
    if allowed is None:
        return kw
    for key in [k for k in kw if k not in allowed]:
        if kw[key] is not None:
            raise ConfigError(
                f"{section}.{key} is not read by {section}.{PROTOCOL_KEY}={kw.get(PROTOCOL_KEY)} "
                f"(kind {kw.get('kind')}); unset it or choose the protocol that reads it"
            )
        del kw[key]
    return kw


def _attach_class_ids(ds: ZeroShotDataset, spec: Any, section: str) -> None:
    if spec is None:
        return
    if spec == "folders":
        ids = getattr(ds, "folders", None)
        if ids is None:
            raise ConfigError(f"{section}.{CLASS_IDS_KEY}=folders needs an image-folder dataset")
    elif isinstance(spec, str):
        if spec not in CLASS_ID_LISTS:
            known = ", ".join([*CLASS_ID_LISTS, "folders"])
            raise ConfigError(f"{section}.{CLASS_IDS_KEY} must be one of {known} or a list, got {spec!r}")
        ids = CLASS_ID_LISTS[spec]
    else:
        ids = [str(c) for c in spec]
    if len(ids) != len(ds.classnames):
        raise DatasetFormatError(
            f"{section}: {CLASS_IDS_KEY} gives {len(ids)} class ids for the {len(ds.classnames)} classes of "
            f"{ds.name!r}"
        )
    ds.class_ids = list(ids)


def build_zeroshot_dataset(cfg: Mapping, section: str = "dataset") -> ZeroShotDataset:
    """The labelled dataset a ``dataset`` config section describes (``kind``: hf | imagefolder | zhou |
    imagenet-r-folder | shapes), its protocol applied: its ``subset`` cut, then the ``n`` cap.

    ``section`` names the section in errors (an unknown key, a mandatory value left unset).
    """
    kw = _chosen_protocol(dict(to_plain(cfg, section)), section)
    require_set(kw, section)  # the chosen protocol's own keys too
    kw.pop(PROTOCOL_KEY, None)
    subset, class_ids = kw.pop(SUBSET_KEY, None), kw.pop(CLASS_IDS_KEY, None)
    n = seed = None
    if subset:  # the protocol's cut is made on every item; the cap then applies to the cut
        n, seed = kw.pop("n", None), kw.pop("seed", 0)
    ds = _build(kw, ZEROSHOT_KINDS, DATASET_TASK_KEYS, "dataset", section)
    _attach_class_ids(ds, to_plain(class_ids), section)
    if subset:
        try:
            ds = select_subset(ds, subset, n, seed or 0)
        except ConfigError as err:
            raise ConfigError(f"{section}: {err}") from None
    return ds


def build_pair_dataset(cfg: Mapping, section: str = "hessian_data") -> PairDataset:
    """The image-caption pairs a ``hessian_data`` config section describes (``kind``: wds | hf | shapes)."""
    return _build(dict(to_plain(cfg, section)), PAIR_KINDS, PAIR_TASK_KEYS, "pair dataset", section)
