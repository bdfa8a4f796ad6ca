"""ProbVLM's adapters for ``task=zeroshot``, trained on the Hessian data's image-caption pairs and cached.

Not a task of its own: the sibling of :func:`uqvlm.tasks.hessian.fit_posteriors`. The pairs' features come
from the same feature cache the posteriors are estimated from, and each fitted pair of adapters is cached
under a key of everything that determines it (model, pair data, every training setting, the cross-modal
weight, and which pairs: all, or those not held out), like the posteriors.
"""

from __future__ import annotations

import dataclasses
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from uqvlm.cache import FORMAT_VERSION, cache_key, get_or_build
from uqvlm.console import console
from uqvlm.data.registry import build_pair_dataset
from uqvlm.data.sections import HessianDataSettings, PublishedFactorsSettings
from uqvlm.devices import resolve_device
from uqvlm.errors import ConfigError, UqvlmError
from uqvlm.methods import AdapterFit
from uqvlm.probvlm import STATE_VERSION, ProbVLMAdapters, fit_probvlm
from uqvlm.tasks.common import LoadedModel, RunDirs
from uqvlm.tasks.hessian import pair_features

__all__ = ["CachedPairAdapters", "heldout_split"]

SUBSETS = ("train", "all")


def heldout_split(n: int, holdout: float, seed: int) -> tuple[Tensor, Tensor]:
    """(kept, held-out) pair indices, each sorted: a seeded permutation, ``round(holdout n)`` held out."""
    held = round(holdout * n)
    if held < 2 or n - held < 1:
        raise UqvlmError(
            f"ProbVLM's holdout of {holdout:g} leaves {held} of {n} image-caption pairs to choose the "
            "cross-modal weight by: use more Hessian pairs, a larger holdout, or one cross_modal value"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[held:].sort().values, perm[:held].sort().values


class CachedPairAdapters:
    """:class:`uqvlm.methods.PairAdapters` of one training setting on the run's Hessian pairs."""

    def __init__(self, hessian_data: HessianDataSettings, model: LoadedModel, dirs: RunDirs, fit: AdapterFit):
        if isinstance(hessian_data, PublishedFactorsSettings):
            raise ConfigError(
                "ProbVLM trains on image-caption pairs, which hessian_data=published does not have: use "
                "Hessian data (e.g. hessian_data=laion400m) or drop the row (~task.methods.probvlm)"
            )
        self.hessian_data, self.model, self.dirs, self.settings = hessian_data, model, dirs, fit
        self.device = resolve_device(model.device)
        self._fitted: dict[tuple[float, str], ProbVLMAdapters] = {}

    @cached_property
    def _pairs(self) -> tuple[Tensor, Tensor, str]:
        pairs = build_pair_dataset(self.hessian_data.section)
        feats = pair_features(pairs, self.hessian_data, self.model, self.dirs)
        return feats["image"].embeddings, feats["text"].embeddings, pairs.fingerprint()

    @cached_property
    def _split(self) -> tuple[Tensor, Tensor]:
        return heldout_split(len(self._pairs[0]), self.settings.holdout, self.settings.seed)

    def heldout(self) -> tuple[Tensor, Tensor]:
        image, text, _ = self._pairs
        rows = self._split[1]
        return image[rows], text[rows]

    def fit(self, cross_modal: float, subset: Literal["train", "all"]) -> ProbVLMAdapters:
        if subset not in SUBSETS:
            raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}")
        if (cross_modal, subset) not in self._fitted:
            self._fitted[cross_modal, subset] = self._load_or_fit(float(cross_modal), subset)
        return self._fitted[cross_modal, subset]

    def _load_or_fit(self, cross_modal: float, subset: str) -> ProbVLMAdapters:
        image, text, fingerprint = self._pairs
        fit = self.settings
        ident = {
            "model": self.model.identity,
            "data": fingerprint,
            "n_pairs": len(image),
            "fit": dataclasses.asdict(fit),
            "cross_modal": cross_modal,
            # The pairs not held out depend on the holdout and seed (both in ``fit``).
            "subset": subset,
            "device": self.device.type,
            "format": FORMAT_VERSION,
            "state_version": STATE_VERSION,
        }
        key = cache_key(**ident)
        path = Path(self.dirs.cache) / "probvlm" / f"probvlm-{key}.pt"
        rows = self._split[0] if subset == "train" else torch.arange(len(image))

        def build() -> dict:
            console.print(
                f"fitting ProbVLM adapters: cross_modal={cross_modal:g}, {len(rows)} pairs ({subset}), "
                f"{fit.epochs} epochs"
            )
            adapters, history = fit_probvlm(
                image[rows],
                text[rows],
                hidden=fit.hidden,
                layers=fit.layers,
                dropout=fit.dropout,
                lr=fit.lr,
                epochs=fit.epochs,
                batch_size=fit.batch_size,
                cross_modal=cross_modal,
                generator=torch.Generator().manual_seed(fit.seed),
                device=self.device,
            )
            return {"meta": {"key": key}, "ident": ident, "adapters": adapters.state_dict(), "loss": history}

        entry = get_or_build(path, build, {"key": key})
        try:
            return ProbVLMAdapters.from_state_dict(entry["adapters"]).to(self.device)
        except (KeyError, ValueError) as err:  # an entry another uqvlm version wrote
            raise UqvlmError(
                f"the cached ProbVLM adapters {path} cannot be read ({err}); delete it (or the cache "
                "directory) and run again"
            ) from err
