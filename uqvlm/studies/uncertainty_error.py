"""Does predictive uncertainty track error? Error rate per equal-mass uncertainty bin, e.g. for the
predictive before and after active few-shot learning.

Inputs are a method's log-probabilities [N, K]; the uncertainty of an input is the entropy of its
predictive, H = -sum_k p_k log p_k, or 1 - max_k p_k (the score :mod:`uqvlm.metrics` uses for AUROC).
Inputs are ordered by uncertainty (ties by index, a stable sort) and cut into ``bins`` consecutive
groups of equal size (sizes differ by at most one, the larger first); per group the mean uncertainty
and the error rate of the arg max. A well-behaved predictive has an error rate rising with uncertainty.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from uqvlm.plots import _save, plt

__all__ = ["UNCERTAINTIES", "error_by_uncertainty", "plot_uncertainty_error", "predictive_uncertainty"]

UNCERTAINTIES = ("entropy", "one_minus_max")


def predictive_uncertainty(log_probs: Tensor, kind: str = "entropy") -> Tensor:
    """Per-input uncertainty [N], float64: ``entropy`` (nats) or ``one_minus_max`` (1 - max_k p_k)."""
    if not isinstance(log_probs, Tensor) or log_probs.ndim != 2 or not log_probs.is_floating_point():
        raise ValueError("log_probs must be a floating-point tensor [N, K]")
    if torch.isnan(log_probs).any() or (log_probs == torch.inf).any():
        raise ValueError("log_probs contains NaN or +inf (-inf, a probability of 0, is allowed)")
    lp = log_probs.double()
    if kind == "entropy":
        return -(lp.exp() * lp).nan_to_num(0.0).sum(-1)  # 0 log 0 = 0 for classes with p = 0
    if kind == "one_minus_max":
        return 1.0 - lp.max(-1).values.exp()
    raise ValueError(f"uncertainty kind must be one of {UNCERTAINTIES}, got {kind!r}")


def error_by_uncertainty(
    log_probs: Tensor, labels: Tensor, bins: int = 10, kind: str = "entropy"
) -> dict[str, Tensor]:
    """Equal-mass uncertainty bins (lowest uncertainty first). Per bin [bins], float64 (count: int64):
    ``uncertainty`` (mean), ``lower`` / ``upper`` (min / max), ``error_rate`` (fraction whose arg max is
    not the label), ``count``."""
    u = predictive_uncertainty(log_probs, kind)
    n = u.numel()
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if isinstance(bins, bool) or not isinstance(bins, int) or not 1 <= bins <= n:
        raise ValueError(f"bins must be an int in [1, {n}] (no empty bin), got {bins!r}")
    error = (log_probs.argmax(-1) != labels.to(log_probs.device)).double()
    order = torch.argsort(u, stable=True)
    groups = torch.tensor_split(order, bins)
    return {
        "uncertainty": torch.stack([u[g].mean() for g in groups]),
        "lower": torch.stack([u[g].min() for g in groups]),
        "upper": torch.stack([u[g].max() for g in groups]),
        "error_rate": torch.stack([error[g].mean() for g in groups]),
        "count": torch.tensor([len(g) for g in groups]),
    }


def plot_uncertainty_error(
    curves: Mapping[str, Mapping[str, Tensor]],
    path: Path,
    xlabel: str = "predictive entropy",
    title: str = "",
) -> Path:
    """Error rate against mean uncertainty per bin, one line per predictive (e.g. ``{"before AL": ...,
    "after AL": ...}``, each from :func:`error_by_uncertainty`)."""
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for name, c in curves.items():
        ax.plot(
            c["uncertainty"].cpu().numpy(), c["error_rate"].cpu().numpy(), "o-", label=name, linewidth=1.2
        )
    ax.set(xlabel=f"{xlabel} (bin mean)", ylabel="error rate", ylim=(0, 1), title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)
