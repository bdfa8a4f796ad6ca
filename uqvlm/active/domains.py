"""Pool and target sets from datasets with domains (OfficeHome, ImageNet-R / -Sketch, the shapes world).

The pool is the labelled train split of every pool domain (the target domain only when
``include_target_in_pool``); the target is the test split of the target domain, and its val split is used
for model selection. Classes are aligned BY NAME: only names present in every used domain are kept, and
each domain's labels are mapped through its own class names (never by per-domain index).

Splits: ``native`` (the dataset has train/val/test splits, e.g. the shapes world) or ``seeded`` (each
domain's images are split by a seeded permutation into the given fractions).
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
from uqvlm.errors import ConfigError, DatasetFormatError
from uqvlm.features import Features
from uqvlm.validation import check_choice

__all__ = ["DomainData", "SPLIT_MODES", "build_domain_data", "pool_domains", "split_mode", "normalise_name"]

SPLITS = ("train", "val", "test")
SPLIT_MODES = ("native", "seeded")
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


def _seeded_split(n: int, fractions: Mapping[str, float], seed: int, domain: str) -> dict[str, np.ndarray]:
    total = sum(float(fractions[s]) for s in SPLITS)
    digest = int(fingerprint_of("al-split", seed, domain), 16)
    perm = np.random.default_rng(digest).permutation(n)
    bounds = np.cumsum([0] + [round(n * float(fractions[s]) / total) for s in SPLITS])
    bounds[-1] = n
    return {s: np.sort(perm[bounds[i] : bounds[i + 1]]) for i, s in enumerate(SPLITS)}


def _select(feats: Features, rows: np.ndarray | Tensor) -> Features:
    rows = torch.as_tensor(rows, dtype=torch.long)
    res = None if feats.residuals is None else feats.residuals[rows]
    return Features(feats.activations[rows], feats.embeddings[rows], res)


def build_domain_data(spec: Mapping[str, Any], extract: Extractor) -> DomainData:
    """Load (through ``extract``, which caches features) the splits the pool and target need."""
    spec = to_plain(spec)
    target = spec["target"]
    pool_names = pool_domains(spec)
    used = [target, *[d for d in pool_names if d != target]]
    by = split_mode(spec)
    sizes = spec.get("sizes") or {}
    common = spec.get("common") or {}
    needed = {
        d: (["train"] if d in pool_names else []) + (["val", "test"] if d == target else []) for d in used
    }

    raw: dict[tuple[str, str], tuple[Features, Tensor]] = {}
    names: dict[str, list[str]] = {}
    templates: list[str] = []
    for d in used:
        dcfg = {**common, **(spec["domains"][d] or {})}
        if by == "native":
            for split in needed[d]:
                cap = {"n": sizes[split]} if sizes.get(split) is not None else {}
                ds = build_zeroshot_dataset({**dcfg, "split": split, **cap}, section=f"task.data.domains.{d}")
                raw[d, split] = extract(ds, f"{d} {split}")
                names[d] = ds.classnames
        else:  # seeded
            ds = build_zeroshot_dataset(dcfg, section=f"task.data.domains.{d}")
            feats, labels = extract(ds, d)
            parts = _seeded_split(
                len(labels), spec["splits"]["fractions"], int(spec["splits"].get("seed", 0)), d
            )
            for split in needed[d]:
                rows = parts[split][: sizes.get(split)]
                raw[d, split] = (_select(feats, rows), labels[torch.as_tensor(rows, dtype=torch.long)])
            names[d] = ds.classnames
        if d == target:
            templates = ds.templates

    shared = [
        c
        for c in names[target]
        if all(normalise_name(c) in {normalise_name(x) for x in names[d]} for d in used)
    ]
    if not shared:
        raise DatasetFormatError(f"the domains {used} share no class names")
    index = {normalise_name(c): i for i, c in enumerate(shared)}

    def aligned(d: str, split: str) -> tuple[Features, Tensor]:
        feats, labels = raw[d, split]
        remap = torch.tensor([index.get(normalise_name(c), -1) for c in names[d]], dtype=torch.long)
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(remap)):
            raise DatasetFormatError(
                f"domain {d!r} ({split}) has labels outside its {len(remap)} class names"
            )
        new = remap[labels]
        keep = (new >= 0).nonzero().squeeze(1)
        return _select(feats, keep), new[keep]

    pool_parts = [aligned(d, "train") for d in pool_names]
    target_f, target_y = aligned(target, "test")
    val_f, val_y = aligned(target, "val")
    pool = Features.cat([p[0] for p in pool_parts])
    for what, n in (
        ("pool", len(pool)),
        ("target test split", len(target_y)),
        ("target val split", len(val_y)),
    ):
        if n == 0:
            raise DatasetFormatError(f"the active-learning {what} is empty")
    return DomainData(
        classnames=shared,
        templates=list(templates),
        pool=pool,
        pool_labels=torch.cat([p[1] for p in pool_parts]),
        pool_domain=torch.cat(
            [torch.full((len(p[1]),), i, dtype=torch.long) for i, p in enumerate(pool_parts)]
        ),
        pool_domains=pool_names,
        target=target_f,
        target_labels=target_y,
        val=val_f,
        val_labels=val_y,
        fingerprint=fingerprint_of("al-domains", spec),
    )
