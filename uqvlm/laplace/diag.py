"""Diagonal last-layer Laplace posterior (method.md §3-4).

GGN_(d,j) = sum_n a_(n,j)^2 H_n[d,d] over the augmented weight [W | b]; precision n * GGN + lambda.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..features import LastLayer
from .base import LastLayerPosterior, _check_tensor
from .evidence import diag_log_evidence
from .likelihoods import Likelihood

__all__ = ["DiagPosterior"]


class DiagPosterior(LastLayerPosterior):
    """Diagonal-GGN Laplace posterior; the GGN diagonal is a [D, p'] float64 matrix."""

    structure = "diag"

    def _init_curvature(self) -> None:
        self._ggn: Tensor | None = None

    @classmethod
    def from_diagonal(
        cls,
        ggn: Tensor,
        num_data: int | None = None,
        *,
        weight: Tensor,
        bias: Tensor | None = None,
        likelihood: Likelihood | None = None,
        n: float = 10.0,
        prior_precision: float = 1.0,
    ) -> DiagPosterior:
        """A fitted posterior from a given GGN diagonal [D, p'] (p' = p (+1 with a bias)).

        ``num_data`` only records how many sources it summed over (the diagonal is not normalised by it).
        ``likelihood``: that of the data behind the diagonal, needed by ``update`` and ``with_point``.
        """
        post = cls(LastLayer(weight, bias), likelihood=likelihood, n=n, prior_precision=prior_precision)
        g = _check_tensor("ggn", ggn, 2)
        shape = (post.out_features, post.augmented_in_features)
        if tuple(g.shape) != shape:
            raise ValueError(f"ggn must have shape {shape} for this last layer, got {tuple(g.shape)}")
        if (g < 0).any():
            raise ValueError("ggn contains negative entries; a GGN diagonal is non-negative")
        if num_data is not None:
            post._set_num_data(num_data)
        post._ggn = g.detach().to(torch.float64).clone()
        post._fitted = True
        return post

    def _accumulate(self, a: Tensor, source: Tensor, target: Tensor) -> None:
        hd = self._require_likelihood().ggn_diagonals(source, target)
        if tuple(hd.shape) != (a.shape[0], self.out_features):
            raise RuntimeError(
                f"Hessian diagonals have shape {tuple(hd.shape)}, expected {(a.shape[0], self.out_features)}"
            )
        if self._ggn is None:
            self._ggn = torch.zeros(
                self.out_features, self.augmented_in_features, dtype=torch.float64, device=a.device
            )
        self._ggn += hd.to(device=self._ggn.device, dtype=torch.float64).T @ a.to(self._ggn.device).square()

    def _finalize(self) -> None:
        # Round-off can leave tiny negative entries in per-source diagonals; the GGN is PSD.
        self._ggn.clamp_(min=0.0)

    def _with_point(self, a: Tensor, z: Tensor, targets: Tensor, copies: int) -> DiagPosterior:
        # GGN += copies * diag(H) (a * a)^T: a plain sum, N + copies recorded where N is known.
        hd = self._require_likelihood().ggn_diagonals(z, targets)[0]
        ggn = self._ggn
        ll = self.last_layer
        return DiagPosterior.from_diagonal(
            ggn + copies * torch.outer(hd.clamp_min(0).to(ggn.device), a.to(ggn.device).square()),
            self._num_data + copies if self._num_data else None,
            weight=ll.weight,
            bias=ll.bias,
            likelihood=self.likelihood,
            n=self.n,
            prior_precision=self.prior_precision,
        )

    @property
    def ggn_diagonal(self) -> Tensor:
        """[D, p'] float64 GGN diagonal, summed over the N sources (not normalised)."""
        self._require_fitted()
        return self._ggn

    def _precision(self, lam: float, n: float) -> Tensor:
        return n * self._ggn + lam

    def _variance(self, a: Tensor) -> Tensor:
        inv = 1.0 / self._precision(self.prior_precision, self.n)
        return a.to(inv.device).square() @ inv.T

    def sample(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        self._require_fitted()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        std = self._precision(self.prior_precision, self.n).rsqrt()
        eps = torch.randn(
            (num_samples, *std.shape), generator=generator, dtype=torch.float64, device=std.device
        )
        return self._split_samples(self.mean_weight.to(std.device) + eps * std)

    def log_evidence(
        self, prior_precision: float | None = None, n: float | None = None, variant: str = "exact"
    ) -> float:
        """-0.5 lambda ||W||^2 + 0.5 P log lambda - 0.5 sum log(n GGN + lambda); O(P) per call."""
        self._require_fitted()
        if variant != "exact":
            raise ValueError(f"variant {variant!r} exists only for KFAC; the diagonal evidence is 'exact'")
        lam, nn = self._resolve(prior_precision, n)
        return diag_log_evidence(self._ggn, self.weight_sq_norm, lam, nn)

    def _tensors(self) -> dict[str, Tensor]:
        return {"ggn": self._ggn}

    def _load_tensors(self, state: dict[str, Any]) -> None:
        if "ggn" not in state:
            raise ValueError("diag state is missing 'ggn'")
        shape = (self.out_features, self.augmented_in_features)
        if tuple(state["ggn"].shape) != shape:
            raise ValueError(f"diag state 'ggn' has shape {tuple(state['ggn'].shape)}, expected {shape}")
        self._ggn = state["ggn"].to(torch.float64)
