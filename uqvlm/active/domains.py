"""Pool and target sets from datasets with domains (OfficeHome, ImageNet-A / -R / -Sketch, the shapes world).

The pool is the labelled train split of every pool domain (the target domain only when
``include_target_in_pool``); the target is the test split of the target domain, and its val split is used
for model selection.

Classes (``align``):

- ``names``: only the class names present in every used domain are kept (matched case-, underscore- and
  whitespace-insensitively), and each domain's labels are mapped through its own class names.
- ``class_ids``: the classes are the target's; every domain's labels are mapped through its ``class_ids``
  (ImageNet's WordNet ids), and items of classes the target lacks are dropped. OpenAI's ImageNet names
  repeat ("missile" is both n03773504 and n04008634), so ImageNet domains must be aligned this way.

Splits (``splits.by``):

- ``native``: the dataset's own train/val/test splits (the shapes world).
- ``seeded``: each domain's images split by a seeded permutation into ``splits.fractions``.
- ``published``: BayesVLM's active-learning protocol (bayesvlm/data/homeoffice_da.py, imagenet_da.py
  @ 855be8b). Each domain, restricted first to the target's classes (imagenet_da.py filters by the
  target's wnid folders), is split as :func:`uqvlm.data.sources.splits.published_domain_split` (path-sorted
  items, ``random.seed(42); random.shuffle``, int(0.8 n) train+val then int(0.8 m) train: 64/16/20), and
  the pool is ordered as the published code shuffles it (:func:`~uqvlm.data.sources.splits.published_pool_order`).
  The published ImageNet code labels each domain by its own sorted wnid list, which shifts the labels of a
  domain that lacks some of the target's wnids (ImageNet-A holds 86 of ImageNet-R's 200); here every
  domain is labelled through its wnids (``align: class_ids``), so no label is shifted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from uqvlm.config_utils import to_plain
from uqvlm.data.base import ZeroShotDataset, fingerprint_of
from uqvlm.data.registry import build_zeroshot_dataset
from uqvlm.data.sources.splits import SubsetView, published_domain_split, published_pool_order
from uqvlm.errors import ConfigError, DatasetFormatError
from uqvlm.features import Features
from uqvlm.validation import check_choice

__all__ = [
    "ALIGN_MODES",
    "DomainData",
    "SPLIT_MODES",
    "align_mode",
    "build_domain_data",
    "normalise_name",
    "pool_domains",
    "split_mode",
]

SPLITS = ("train", "val", "test")
SPLIT_MODES = ("native", "seeded", "published")
ALIGN_MODES = ("names", "class_ids")
# extract(dataset, description) -> (features, labels in the dataset's own class indices)
Extractor = Callable[[ZeroShotDataset, str], tuple[Features, Tensor]]


@dataclass
class DomainData:
    """Features and labels (in the shared class space) of the pool, the target test and val splits."""

    classnames: list[str]
    templates: list[str]
    pool: Features
    pool_labels: Tensor
    pool_domain: Tensor  # index into pool_domains per pool point
    pool_domains: list[str]
    target: Features
    target_labels: Tensor
    val: Features
    val_labels: Tensor
    fingerprint: str
    class_ids: list[str] | None = None  # of the shared classes, when aligned by class ids


def normalise_name(name: str) -> str:
    """Class names are matched case-, underscore- and whitespace-insensitively."""
    return " ".join(name.replace("_", " ").lower().split())


def pool_domains(spec: Mapping[str, Any]) -> list[str]:
    """The pool's domains: ``pool`` if given, else every domain; minus the target unless included."""
    domains = list(spec["domains"])
    target = spec["target"]
    if target not in domains:
        raise ConfigError(f"task.data.target: target domain {target!r} is not one of the domains {domains}")
    chosen = list(spec.get("pool") or domains)
    if unknown := [d for d in chosen if d not in domains]:
        raise ConfigError(f"task.data.pool: pool domains {unknown} are not among the domains {domains}")
    if spec.get("include_target_in_pool", False):
        return chosen if target in chosen else [*chosen, target]
    return [d for d in chosen if d != target]


def split_mode(spec: Mapping[str, Any]) -> str:
    """How each domain is split (``splits.by``): one of ``SPLIT_MODES``, ``native`` by default."""
    return check_choice(
        "task.data.splits.by", (spec.get("splits") or {}).get("by", "native"), SPLIT_MODES, ConfigError
    )


def align_mode(spec: Mapping[str, Any]) -> str:
    """How classes are matched across domains (``align``): one of ``ALIGN_MODES``, ``names`` by default."""
    return check_choice("task.data.align", spec.get("align") or "names", ALIGN_MODES, ConfigError)


def _seeded_split(n: int, fractions: Mapping[str, float], seed: int, domain: str) -> dict[str, np.ndarray]:
    total = sum(float(fractions[s]) for s in SPLITS)
    digest = int(fingerprint_of("al-split", seed, domain), 16)
    perm = np.random.default_rng(digest).permutation(n)
    bounds = np.cumsum([0] + [round(n * float(fractions[s]) / total) for s in SPLITS])
    bounds[-1] = n
    return {s: np.sort(perm[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}


def _select(feats: Features, rows: np.ndarray | Tensor | list[int]) -> Features:
    rows = torch.as_tensor(rows, dtype=torch.long)
    res = None if feats.residuals is None else feats.residuals[rows]
    return Features(feats.activations[rows], feats.embeddings[rows], res)


class _ClassSpace:
    """The shared classes and, per domain, its label -> shared label map (-1: not shared)."""

    def __init__(self, align: str, target: str, datasets: Mapping[str, ZeroShotDataset]):
        self.align = align
        tds = datasets[target]
        if align == "class_ids":
            for d, ds in datasets.items():
                if ds.class_ids is None:
                    raise ConfigError(
                        f"task.data.align=class_ids: domain {d!r} has no class ids; set its class_ids "
                        "(imagenet1k | imagenet-r | imagenet-a | folders)"
                    )
            self.classnames, self.class_ids = list(tds.classnames), list(tds.class_ids or [])
            index = {c: i for i, c in enumerate(self.class_ids)}
            self.remap = {
                d: torch.tensor([index.get(c, -1) for c in ds.class_ids or []], dtype=torch.long)
                for d, ds in datasets.items()
            }
        else:
            names = {d: {normalise_name(c) for c in ds.classnames} for d, ds in datasets.items()}
            self.classnames = [
                c for c in tds.classnames if all(normalise_name(c) in n for n in names.values())
            ]
            self.class_ids = None
            index = {normalise_name(c): i for i, c in enumerate(self.classnames)}
            self.remap = {
                d: torch.tensor([index.get(normalise_name(c), -1) for c in ds.classnames], dtype=torch.long)
                for d, ds in datasets.items()
            }
        if not self.classnames:
            raise DatasetFormatError(f"the domains {list(datasets)} share no classes (align: {align})")

    def labels(self, domain: str, labels: Tensor, split: str) -> Tensor:
        """``labels`` of ``domain`` in the shared class space (-1: a class not shared)."""
        remap = self.remap[domain]
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(remap)):
            raise DatasetFormatError(
                f"domain {domain!r} ({split}) has labels outside its {len(remap)} classes"
            )
        return remap[labels]


def _native_parts(spec, used, needed, extract) -> tuple[dict, dict]:
    """(features, labels) per (domain, split) from each domain's own splits."""
    sizes, common = spec.get("sizes") or {}, spec.get("common") or {}
    raw, datasets = {}, {}
    for d in used:
        dcfg = {**common, **(spec["domains"][d] or {})}
        for split in needed[d]:
            cap = {"n": sizes[split]} if sizes.get(split) is not None else {}
            ds = build_zeroshot_dataset({**dcfg, "split": split, **cap}, section=f"task.data.domains.{d}")
            raw[d, split] = extract(ds, f"{d} {split}")
            datasets[d] = ds
    return raw, datasets


def _whole_domains(spec, used) -> dict[str, ZeroShotDataset]:
    common = spec.get("common") or {}
    return {
        d: build_zeroshot_dataset({**common, **(spec["domains"][d] or {})}, section=f"task.data.domains.{d}")
        for d in used
    }


def _seeded_parts(spec, datasets, needed, extract) -> dict:
    sizes = spec.get("sizes") or {}
    raw = {}
    for d, ds in datasets.items():
        feats, labels = extract(ds, d)
        parts = _seeded_split(len(labels), spec["splits"]["fractions"], int(spec["splits"].get("seed", 0)), d)
        for split in needed[d]:
            rows = parts[split][: sizes.get(split)]
            raw[d, split] = (_select(feats, rows), labels[torch.as_tensor(rows, dtype=torch.long)])
    return raw


def _published_parts(spec, datasets, needed, space: _ClassSpace, extract) -> tuple[dict, dict[str, int]]:
    """Each domain restricted to the shared classes and split as published (only the needed parts are
    extracted); also each domain's item count after the restriction."""
    sizes = spec.get("sizes") or {}
    raw, counts = {}, {}
    for d, ds in datasets.items():
        labels = torch.as_tensor(ds.labels(), dtype=torch.long)
        kept = (space.labels(d, labels, "all") >= 0).nonzero().squeeze(1).numpy()  # path order kept
        parts = published_domain_split(len(kept))
        for split in needed[d]:
            rows = kept[np.asarray(parts[split], dtype=np.int64)][: sizes.get(split)]
            view = SubsetView(ds, rows, what={"al-published": split})
            raw[d, split] = extract(view, f"{d} {split}")
        counts[d] = len(kept)
    return raw, counts


def build_domain_data(spec: Mapping[str, Any], extract: Extractor) -> DomainData:
    """Load (through ``extract``, which caches features) the splits the pool and target need."""
    spec = to_plain(spec)
    target = spec["target"]
    pool_names = pool_domains(spec)
    used = [target, *[d for d in pool_names if d != target]]
    by, align = split_mode(spec), align_mode(spec)
    needed = {
        d: (["train"] if d in pool_names else []) + (["val", "test"] if d == target else []) for d in used
    }
    if by == "native":
        raw, datasets = _native_parts(spec, used, needed, extract)
        space = _ClassSpace(align, target, datasets)
    else:
        datasets = _whole_domains(spec, used)
        space = _ClassSpace(align, target, datasets)
        if by == "seeded":
            raw = _seeded_parts(spec, datasets, needed, extract)
        else:
            raw, counts = _published_parts(spec, datasets, needed, space, extract)

    def aligned(d: str, split: str) -> tuple[Features, Tensor]:
        feats, labels = raw[d, split]
        new = space.labels(d, labels, split)
        keep = (new >= 0).nonzero().squeeze(1)
        return _select(feats, keep), new[keep]

    pool_parts = [aligned(d, "train") for d in pool_names]
    pool = Features.cat([p[0] for p in pool_parts])
    pool_labels = torch.cat([p[1] for p in pool_parts])
    pool_domain = torch.cat([torch.full((len(p[1]),), i, dtype=torch.long) for i, p in enumerate(pool_parts)])
    if by == "published" and len(pool_labels):
        # The published pool: the train splits concatenated in domain order, then shuffled by the RNG the
        # last domain's seed(42) + shuffle left behind.
        last = [d for d in spec["domains"] if d in datasets][-1]
        order = published_pool_order(counts[last], len(pool_labels))
        pool, pool_labels, pool_domain = _select(pool, order), pool_labels[order], pool_domain[order]
    target_f, target_y = aligned(target, "test")
    val_f, val_y = aligned(target, "val")
    for what, n in (
        ("pool", len(pool)),
        ("target test split", len(target_y)),
        ("target val split", len(val_y)),
    ):
        if n == 0:
            raise DatasetFormatError(f"the active-learning {what} is empty")
    return DomainData(
        classnames=space.classnames,
        templates=list(datasets[target].templates),
        pool=pool,
        pool_labels=pool_labels,
        pool_domain=pool_domain,
        pool_domains=pool_names,
        target=target_f,
        target_labels=target_y,
        val=val_f,
        val_labels=val_y,
        fingerprint=fingerprint_of("al-domains", spec),
        class_ids=space.class_ids,
    )
