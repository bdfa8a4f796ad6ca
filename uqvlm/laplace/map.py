"""The deterministic model as a posterior with zero variance, so ``posterior=map`` shares the code path."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..features import LastLayer
from .base import LastLayerPosterior

__all__ = ["MAPPosterior"]


class MAPPosterior(LastLayerPosterior):
    """A point mass at the MAP: zero embedding variance, samples equal to the MAP weight.

    ``update`` only counts sources (no Hessians are computed) and ``finalize`` works without any data.
    It has no Laplace evidence: ``log_evidence`` raises, ``optimize_prior_precision`` returns the
    current ``prior_precision`` unchanged (lambda has no effect on a point mass).
    """

    structure = "map"

    def __init__(self, last_layer: LastLayer, n: float = 10.0, prior_precision: float = 1.0) -> None:
        super().__init__(last_layer, n=n, prior_precision=prior_precision)
        self._fitted = True

    def _accumulate(
        self,
        a: Tensor,
        source: Tensor,
        target: Tensor,
        logit_scale: float,
        logit_bias: float | None,
        likelihood: str,
    ) -> None:
        return None

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
