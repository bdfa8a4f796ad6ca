"""The deterministic model as a posterior with zero variance, so ``posterior=map`` shares the code path."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import LastLayerPosterior

__all__ = ["MAPPosterior"]


class MAPPosterior(LastLayerPosterior):
    """A point mass at the MAP: zero embedding variance, samples equal to the MAP weight.

    ``update`` only counts sources (no Hessians are computed, so no likelihood is needed) and
    ``finalize`` works without any data. It has no Laplace evidence: ``log_evidence`` raises,
    ``optimize_prior_precision`` returns the current ``prior_precision`` unchanged (lambda has no effect
    on a point mass). It has no curvature either: ``with_point`` raises (EPIG's greedy updates need a
    KFAC or diagonal posterior; on a point mass EPIG would be zero).
    """

    structure = "map"
    needs_likelihood = False

    def _init_curvature(self) -> None:
        self._fitted = True  # a point mass needs no data

    def _accumulate(self, a: Tensor, source: Tensor, target: Tensor) -> None:
        return None

    def _with_point(self, a: Tensor, z: Tensor, targets: Tensor, copies: int) -> MAPPosterior:
        raise NotImplementedError("a MAP point estimate has no curvature to add a point to")

    def finalize(self) -> MAPPosterior:
        self._fitted = True
        return self

    def _finalize(self) -> None:
        return None

    def _variance(self, a: Tensor) -> Tensor:
        return a.new_zeros(a.shape[0], self.out_features)

    def sample(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        w = self.mean_weight
        return self._split_samples(w.expand(num_samples, *w.shape).clone())

    def log_evidence(
        self, prior_precision: float | None = None, n: float | None = None, variant: str = "exact"
    ) -> float:
        raise NotImplementedError("a MAP point estimate has no Laplace evidence")

    def optimize_prior_precision(self, method: str = "evidence", **kwargs: Any) -> float:
        if method not in ("evidence", "grid"):
            raise ValueError(f"method must be 'evidence' or 'grid', got {method!r}")
        return self.prior_precision

    def _tensors(self) -> dict[str, Tensor]:
        return {}

    def _load_tensors(self, state: dict[str, Any]) -> None:
        return None
