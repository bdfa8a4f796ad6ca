"""Kronecker-factored (KFAC) last-layer Laplace posterior, the paper's structure (method.md §3-4).

Precision of the augmented weight [W | b] (shape [D, p']):
    A~ (x) B~,  A~ = sqrt(n) A + sqrt(lambda) I_p',  B~ = sqrt(n) B + sqrt(lambda) I_D,
i.e. Cov[W_dj, W_ek] = [B~^-1]_de [A~^-1]_jk. A and B are eigendecomposed once in ``finalize``; every
later (lambda, n) only rescales the eigenvalues.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..features import LastLayer
from .base import _ROW_CHUNK, LastLayerPosterior, _check_tensor
from .evidence import kfac_log_evidence
from .likelihoods import Likelihood

__all__ = ["KFACPosterior"]


def _sym_eigh(name: str, m: Tensor) -> tuple[Tensor, Tensor]:
    m = m.to(torch.float64)
    m = 0.5 * (m + m.T)
    evals, evecs = torch.linalg.eigh(m)
    # A and B are PSD sums; negative eigenvalues are round-off (the published fp32 B factors reach
    # -4.9e-4 against a largest eigenvalue of 437); only clearly indefinite input is an error.
    tol = 1e-4 * max(float(evals.abs().max()), 1e-300)
    if float(evals.min()) < -tol:
        raise ValueError(f"{name} is not positive semi-definite (min eigenvalue {float(evals.min()):.4g})")
    return evals.clamp_min(0.0), evecs


class KFACPosterior(LastLayerPosterior):
    """KFAC Laplace posterior: A = sum a a^T / sqrt(N), B = sum_n H_n / sqrt(N) (float64)."""

    structure = "kfac"

    def _init_curvature(self) -> None:
        self._sum_aa: Tensor | None = None
        self._sum_h: Tensor | None = None
        self._A: Tensor | None = None
        self._B: Tensor | None = None
        self._eig_A: Tensor | None = None
        self._vec_A: Tensor | None = None
        self._eig_B: Tensor | None = None
        self._vec_B: Tensor | None = None
        self._vec_B_sq: Tensor | None = None

    # ---------------------------------------------------------------------------- building
    @classmethod
    def from_factors(
        cls,
        A: Tensor,
        B: Tensor,
        num_data: int | None = None,
        *,
        weight: Tensor,
        bias: Tensor | None = None,
        likelihood: Likelihood | None = None,
        n: float = 10.0,
        prior_precision: float = 1.0,
    ) -> KFACPosterior:
        """A fitted posterior from given (already 1/sqrt(N)-normalised) factors, e.g. the published ones.

        A: [p', p'] with p' = p (+1 with a bias); B: [D, D]; weight: [D, p] (z = a @ weight.T + bias).
        With ``num_data`` (N) the sums are recovered, so further ``update`` and ``with_point`` calls
        extend the same data set; without it, they are refused. ``likelihood``: that of the data behind
        the factors (the model's), needed by ``update`` and ``with_point``.
        """
        post = cls(LastLayer(weight, bias), likelihood=likelihood, n=n, prior_precision=prior_precision)
        A = _check_tensor("A", A, 2)
        B = _check_tensor("B", B, 2)
        p = post.augmented_in_features
        if A.shape != (p, p):
            raise ValueError(f"A must have shape ({p}, {p}) for this last layer, got {tuple(A.shape)}")
        d = post.out_features
        if B.shape != (d, d):
            raise ValueError(f"B must have shape ({d}, {d}) for this last layer, got {tuple(B.shape)}")
        if num_data is not None:
            post._set_num_data(num_data)
            root = math.sqrt(num_data)
            post._sum_aa = A.detach().to(torch.float64) * root
            post._sum_h = B.detach().to(torch.float64) * root
        post._set_factors(A.detach(), B.detach())
        post._fitted = True
        return post

    def _accumulate(self, a: Tensor, source: Tensor, target: Tensor) -> None:
        if self._A is not None and self._sum_aa is None:
            raise RuntimeError("this posterior was built from factors without num_data; it cannot be updated")
        h = self._require_likelihood().ggn(source, target).to(device=a.device, dtype=torch.float64)
        if self._sum_aa is None:
            d, p = self.out_features, self.augmented_in_features
            self._sum_aa = torch.zeros(p, p, dtype=torch.float64, device=a.device)
            self._sum_h = torch.zeros(d, d, dtype=torch.float64, device=a.device)
        self._sum_aa += a.T @ a.to(self._sum_aa.device)
        self._sum_h += h.to(self._sum_h.device)

    def _finalize(self) -> None:
        root = math.sqrt(self._num_data)
        self._set_factors(self._sum_aa / root, self._sum_h / root)

    def _with_point(self, a: Tensor, z: Tensor, targets: Tensor, copies: int) -> KFACPosterior:
        # A = (sqrt(N) A + copies a a^T) / sqrt(N + copies), B likewise with the point's H: the sums are
        # recovered from the normalised factors, extended, and renormalised by the new count. N grows by
        # `copies`, not 1: A (x) B = (sum a a^T) (x) (sum H) / N is KFAC's expectation approximation over one
        # multiset of data, and the copies belong to the sums and to N alike.
        n_data = self._num_data
        if not n_data:
            raise ValueError(
                "this KFAC posterior does not record num_data (the Hessian-data size); build it with "
                "from_factors(..., num_data=N)"
            )
        h = self._require_likelihood().ggn(z, targets)
        root, new_root = math.sqrt(n_data), math.sqrt(n_data + copies)
        a = a.to(self._A.device)
        ll = self.last_layer
        return KFACPosterior.from_factors(
            (root * self._A + copies * torch.outer(a, a)) / new_root,
            (root * self._B + copies * h.to(self._B.device)) / new_root,
            n_data + copies,
            weight=ll.weight,
            bias=ll.bias,
            likelihood=self.likelihood,
            n=self.n,
            prior_precision=self.prior_precision,
        )

    def _set_factors(self, A: Tensor, B: Tensor) -> None:
        A = A.to(torch.float64)
        B = B.to(torch.float64)
        self._A = 0.5 * (A + A.T)
        self._B = 0.5 * (B + B.T)
        self._eig_A, self._vec_A = _sym_eigh("A", self._A)
        self._eig_B, self._vec_B = _sym_eigh("B", self._B)
        self._vec_B_sq = self._vec_B.square()

    # ---------------------------------------------------------------------------- accessors
    @property
    def A(self) -> Tensor:
        """The symmetrised, 1/sqrt(N)-normalised input factor [p', p'] (float64)."""
        self._require_fitted()
        return self._A

    @property
    def B(self) -> Tensor:
        """The symmetrised, 1/sqrt(N)-normalised output factor [D, D] (float64)."""
        self._require_fitted()
        return self._B

    @property
    def eig_A(self) -> Tensor:
        self._require_fitted()
        return self._eig_A

    @property
    def eig_B(self) -> Tensor:
        self._require_fitted()
        return self._eig_B

    def _damped(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues of A~ and B~ at the current (lambda, n): O(p + q)."""
        sn, sl = math.sqrt(self.n), math.sqrt(self.prior_precision)
        return sn * self._eig_A + sl, sn * self._eig_B + sl

    # ----------------------------------------------------------------------------- inference
    def _variance(self, a: Tensor) -> Tensor:
        quad, b_diag = self._variance_factors(a)
        return quad[:, None] * b_diag[None, :]

    def _variance_factors(self, a: Tensor) -> tuple[Tensor, Tensor]:
        ea, eb = self._damped()
        proj = a.to(self._vec_A.device) @ self._vec_A  # a in the eigenbasis of A
        quad = proj.square() @ (1.0 / ea)  # a^T A~^-1 a, [N]
        b_diag = self._vec_B_sq @ (1.0 / eb)  # [B~^-1]_dd, [D]
        return quad, b_diag

    def variance_factors(self, activations: Tensor) -> tuple[Tensor, Tensor]:
        """The KFAC embedding variance is rank one: ``embedding_variance(a) == quad[:, None] * b_diag``.

        Returns quad = a^T A~^-1 a [N] and b_diag = diag(B~^-1) [D] (float64), so predictions need no
        [N, D] variance (see :func:`uqvlm.probcosine.probcosine_rank1`).
        """
        self._require_fitted()
        a_in = _check_tensor("activations", activations, 2)
        quads = [
            self._variance_factors(self._augment(a_in[s : s + _ROW_CHUNK]))[0]
            for s in range(0, a_in.shape[0], _ROW_CHUNK)
        ]
        _, b_diag = self._variance_factors(self._augment(a_in[:1]))
        return (torch.cat(quads) if quads else a_in.new_zeros(0, dtype=torch.float64)), b_diag

    def sample(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        self._require_fitted()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        ea, eb = self._damped()
        dev = self._vec_A.device
        eps = torch.randn(
            (num_samples, self.out_features, self.augmented_in_features),
            generator=generator,
            dtype=torch.float64,
            device=dev,
        )
        # Matrix normal: W = M + B~^-1/2 E A~^-1/2 has Cov[W_dj, W_ek] = [B~^-1]_de [A~^-1]_jk.
        b_half = (self._vec_B * eb.rsqrt()) @ self._vec_B.T
        a_half = (self._vec_A * ea.rsqrt()) @ self._vec_A.T
        w = self.mean_weight.to(dev) + b_half @ eps @ a_half
        return self._split_samples(w)

    # ------------------------------------------------------------------------------ evidence
    def log_evidence(
        self, prior_precision: float | None = None, n: float | None = None, variant: str = "exact"
    ) -> float:
        """KFAC log-evidence (see ``evidence.kfac_log_evidence``); O(p + q) per call."""
        self._require_fitted()
        lam, nn = self._resolve(prior_precision, n)
        return kfac_log_evidence(self._eig_A, self._eig_B, self.weight_sq_norm, lam, nn, variant=variant)

    # ------------------------------------------------------------------------------ caching
    def _tensors(self) -> dict[str, Tensor]:
        return {
            "A": self._A,
            "B": self._B,
            "eig_A": self._eig_A,
            "vec_A": self._vec_A,
            "eig_B": self._eig_B,
            "vec_B": self._vec_B,
        }

    def _load_tensors(self, state: dict[str, Any]) -> None:
        for key in ("A", "B", "eig_A", "vec_A", "eig_B", "vec_B"):
            if key not in state:
                raise ValueError(f"KFAC state is missing {key!r}")
        p, d = self.augmented_in_features, self.out_features
        for key, shape in (
            ("A", (p, p)),
            ("vec_A", (p, p)),
            ("eig_A", (p,)),
            ("B", (d, d)),
            ("vec_B", (d, d)),
            ("eig_B", (d,)),
        ):
            if tuple(state[key].shape) != shape:
                raise ValueError(f"KFAC state {key!r} has shape {tuple(state[key].shape)}, expected {shape}")
        self._A = state["A"].to(torch.float64)
        self._B = state["B"].to(torch.float64)
        self._eig_A = state["eig_A"].to(torch.float64)
        self._vec_A = state["vec_A"].to(torch.float64)
        self._eig_B = state["eig_B"].to(torch.float64)
        self._vec_B = state["vec_B"].to(torch.float64)
        self._vec_B_sq = self._vec_B.square()
        if self._num_data > 0:
            root = math.sqrt(self._num_data)
            self._sum_aa = self._A * root
            self._sum_h = self._B * root
