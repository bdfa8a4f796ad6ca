"""Laplace log-evidence as a function of the prior precision lambda, and 1-D optimisers for lambda.

All evidences drop the terms that do not depend on lambda (the MAP log-likelihood and 2*pi
constants), so only differences and argmaxima over lambda are meaningful.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from ..validation import check_positive

__all__ = [
    "EVIDENCE_VARIANTS",
    "kfac_log_evidence",
    "diag_log_evidence",
    "maximise_evidence",
    "grid_search_prior",
]

EVIDENCE_VARIANTS = ("exact", "reference")

_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


def _eigvals(name: str, eig: Tensor) -> Tensor:
    if not isinstance(eig, Tensor) or eig.ndim != 1 or eig.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of eigenvalues")
    if not torch.isfinite(eig).all():
        raise ValueError(f"{name} contains NaN or Inf")
    # Tiny negative eigenvalues are round-off of a PSD factor.
    return eig.to(torch.float64).clamp_min(0.0)


def kfac_log_evidence(
    eig_A: Tensor,
    eig_B: Tensor,
    weight_sq_norm: float,
    prior_precision: float,
    n: float,
    variant: str = "exact",
) -> float:
    """Log-evidence of the KFAC Laplace posterior with precision A~ (x) B~, A~ = sqrt(n) A + sqrt(lambda) I.

    ``exact``:     -0.5 lambda ||W||^2 + 0.5 P log lambda - 0.5 (q logdet A~ + p logdet B~)
    ``reference``: -0.5 lambda ||W||^2 + 0.5 P log lambda - (p logdet A~ + q logdet B~)

    with p = len(eig_A), q = len(eig_B), P = p q. ``reference`` is the published BayesVLM code's formula
    (logdets weighted the wrong way round and without the 0.5); it exists only to reproduce the published
    lambda values and is not a Laplace evidence. Costs O(p + q).
    """
    if variant not in EVIDENCE_VARIANTS:
        raise ValueError(f"variant must be one of {EVIDENCE_VARIANTS}, got {variant!r}")
    ea = _eigvals("eig_A", eig_A)
    eb = _eigvals("eig_B", eig_B)
    lam = check_positive("prior_precision", prior_precision)
    n = check_positive("n", n)
    w2 = float(weight_sq_norm)
    if not math.isfinite(w2) or w2 < 0:
        raise ValueError(f"weight_sq_norm must be finite and >= 0, got {weight_sq_norm!r}")
    p, q = ea.numel(), eb.numel()
    sn, sl = math.sqrt(n), math.sqrt(lam)
    logdet_a = torch.log(sn * ea + sl).sum().item()
    logdet_b = torch.log(sn * eb + sl).sum().item()
    prior = -0.5 * lam * w2 + 0.5 * p * q * math.log(lam)
    if variant == "exact":
        return prior - 0.5 * (q * logdet_a + p * logdet_b)
    return prior - (p * logdet_a + q * logdet_b)


def diag_log_evidence(ggn_diag: Tensor, weight_sq_norm: float, prior_precision: float, n: float) -> float:
    """Log-evidence of the diagonal Laplace posterior with precision n * GGN_diag + lambda.

    -0.5 lambda ||W||^2 + 0.5 P log lambda - 0.5 sum log(n GGN + lambda), P = ggn_diag.numel().
    """
    if not isinstance(ggn_diag, Tensor) or ggn_diag.numel() == 0:
        raise ValueError("ggn_diag must be a non-empty tensor")
    if not torch.isfinite(ggn_diag).all():
        raise ValueError("ggn_diag contains NaN or Inf")
    lam = check_positive("prior_precision", prior_precision)
    n = check_positive("n", n)
    w2 = float(weight_sq_norm)
    if not math.isfinite(w2) or w2 < 0:
        raise ValueError(f"weight_sq_norm must be finite and >= 0, got {weight_sq_norm!r}")
    g = ggn_diag.to(torch.float64).clamp_min(0.0)
    logdet = torch.log(n * g + lam).sum().item()
    return -0.5 * lam * w2 + 0.5 * g.numel() * math.log(lam) - 0.5 * logdet


def maximise_evidence(
    fn: Callable[[float], float],
    init: float | None = None,
    bounds: tuple[float, float] = (1e-4, 1e8),
    grid_points: int = 121,
    tol: float = 1e-10,
) -> float:
    """Maximise ``fn(lambda)`` over log lambda in ``bounds``; deterministic.

    A coarse log-spaced grid (plus ``init`` if given) locates the best bracket, so a non-concave
    evidence cannot trap a local search started in the wrong place; golden-section search then refines
    within the two neighbouring grid cells to ``tol`` in log lambda. Non-finite values of ``fn`` count
    as -inf. Warns when the optimum sits on a bound.
    """
    lo, hi = check_positive("bounds[0]", bounds[0]), check_positive("bounds[1]", bounds[1])
    if not lo < hi:
        raise ValueError(f"bounds must satisfy 0 < low < high, got {bounds!r}")
    if grid_points < 3:
        raise ValueError(f"grid_points must be >= 3, got {grid_points}")
    log_lo, log_hi = math.log(lo), math.log(hi)

    def f(log_lam: float) -> float:
        v = float(fn(math.exp(log_lam)))
        return v if math.isfinite(v) else -math.inf

    xs = [log_lo + (log_hi - log_lo) * i / (grid_points - 1) for i in range(grid_points)]
    if init is not None:
        x0 = math.log(check_positive("init", init))
        if log_lo < x0 < log_hi:
            xs = sorted({*xs, x0})
    vals = [f(x) for x in xs]
    best = max(range(len(xs)), key=lambda i: (vals[i], -i))
    if vals[best] == -math.inf:
        raise ValueError("the evidence is not finite anywhere on the search grid")
    a = xs[max(best - 1, 0)]
    b = xs[min(best + 1, len(xs) - 1)]

    # Golden-section search on [a, b], which contains the grid maximiser.
    c = b - _INV_PHI * (b - a)
    d = a + _INV_PHI * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc >= fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = f(d)
    x_star, f_star = (c, fc) if fc >= fd else (d, fd)
    # The refinement can never be worse than the best grid point.
    if vals[best] > f_star:
        x_star = xs[best]
    if x_star - log_lo < 1e-6 or log_hi - x_star < 1e-6:
        warnings.warn(
            f"evidence maximiser hit the bound lambda={math.exp(x_star):.4g} of {bounds}",
            RuntimeWarning,
            stacklevel=2,
        )
    return math.exp(x_star)


def grid_search_prior(nll_fn: Callable[[float], float], grid: Iterable[float]) -> float:
    """The lambda in ``grid`` with the lowest ``nll_fn(lambda)`` (e.g. validation NLL); first on ties.

    Non-finite NLLs are skipped; raises ValueError when every value is non-finite or the grid is empty.
    """
    lams = [check_positive("grid value", g) for g in grid]
    if not lams:
        raise ValueError("grid must contain at least one prior precision")
    best_lam, best_val = None, math.inf
    for lam in lams:
        v = float(nll_fn(lam))
        if math.isfinite(v) and v < best_val:
            best_lam, best_val = lam, v
    if best_lam is None:
        raise ValueError("nll_fn returned a non-finite value for every prior precision in the grid")
    return best_lam
