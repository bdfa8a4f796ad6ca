"""How accurate is ProbCosine? The closed form of method.md §5 against Monte Carlo of the cosine itself.

For g ~ N(mu_g, diag v_g) and h ~ N(mu_h, diag v_h), independent, ProbCosine gives E[cos] and Var[cos]
in closed form by replacing both norms with their root mean square (exact for g^T h / sqrt(S_g S_h),
an approximation for g^T h / (||g|| ||h||)) and the predictive then treats the cosine as Gaussian. Both
approximations tighten as the posterior narrows; the paper's study sweeps the pseudo-data count n
(0.01 to 100), i.e. the posterior width. :func:`compare` measures per pair the error of the mean, the
relative error of the variance, and the Wasserstein-1 distance between the Monte Carlo distribution of the
cosine and the Gaussian N(E, Var) the predictive assumes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from uqvlm.plots import _save, plt
from uqvlm.probcosine import probcosine
from uqvlm.validation import check_tensor

__all__ = [
    "compare",
    "embedding_variances_over_n",
    "gaussian_w1",
    "mc_cosine_samples",
    "plot_densities",
    "pseudo_data_count",
    "scale_variances",
]


def _check_pairs(mu_g: Tensor, var_g: Tensor, mu_h: Tensor, var_h: Tensor) -> None:
    for name, t in (("mu_g", mu_g), ("var_g", var_g), ("mu_h", mu_h), ("var_h", var_h)):
        check_tensor(name, t, 2)
        if t.shape != mu_g.shape:
            raise ValueError(f"{name} must have the shape of mu_g {tuple(mu_g.shape)}, got {tuple(t.shape)}")
    if (var_g < 0).any() or (var_h < 0).any():
        raise ValueError("variances must be >= 0")


def mc_cosine_samples(
    mu_g: Tensor,
    var_g: Tensor,
    mu_h: Tensor,
    var_h: Tensor,
    samples: int,
    generator: torch.Generator | None = None,
    max_elements: int = 1 << 24,
) -> Tensor:
    """[samples, P] draws of cos(g_p, h_p) for the P row-wise pairs, g_p ~ N(mu_g[p], diag var_g[p]),
    h_p ~ N(mu_h[p], diag var_h[p]), in float64, drawn in chunks of at most ``max_elements`` numbers."""
    _check_pairs(mu_g, var_g, mu_h, var_h)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an int >= 2, got {samples!r}")
    mg, sg, mh, sh = (t.double() for t in (mu_g, var_g.sqrt(), mu_h, var_h.sqrt()))
    chunk = max(1, max_elements // (2 * mg.numel()))
    out = []
    for start in range(0, samples, chunk):
        m = min(chunk, samples - start)
        eps = torch.randn((2, m, *mg.shape), generator=generator, dtype=torch.float64, device=mg.device)
        g, h = mg + sg * eps[0], mh + sh * eps[1]
        out.append(torch.nn.functional.cosine_similarity(g, h, dim=-1, eps=0.0))
    return torch.cat(out)


def gaussian_w1(samples: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """Wasserstein-1 distance [P] between each column of ``samples`` [S, P] and N(mean[p], var[p]):
    mean_i |x_(i) - (mean + sd * Phi^-1((i - 1/2) / S))|, the sorted sample against the Gaussian's
    quantiles (the 1-D W1 is the L1 distance between quantile functions)."""
    s = samples.shape[0]
    levels = (torch.arange(s, dtype=torch.float64, device=samples.device) + 0.5) / s
    quantiles = mean.double() + var.double().sqrt() * torch.special.ndtri(levels)[:, None]
    return (samples.double().sort(0).values - quantiles).abs().mean(0)


def compare(
    mu_g: Tensor,
    var_g: Tensor,
    mu_h: Tensor,
    var_h: Tensor,
    samples: int = 20_000,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """ProbCosine vs Monte Carlo for P row-wise pairs (all inputs [P, D], variances diagonal). Per pair [P]:

    analytic_mean, analytic_var: :func:`uqvlm.probcosine.probcosine`;
    mc_mean, mc_var: sample mean and variance of the cosine; mean_se = sqrt(mc_var / S);
    mean_error = mc_mean - analytic_mean; var_rel_error = |analytic_var - mc_var| / mc_var;
    w1 = Wasserstein-1 between the MC sample and N(analytic_mean, analytic_var) (the Gaussian the
    predictive assumes), w1_rel = w1 / sqrt(mc_var) (scale-free: W1 between standardised laws).
    """
    _check_pairs(mu_g, var_g, mu_h, var_h)
    mean, var = probcosine(mu_g.double(), var_g.double(), mu_h.double(), var_h.double())
    mean, var = mean.diagonal(), var.diagonal()
    draws = mc_cosine_samples(mu_g, var_g, mu_h, var_h, samples, generator)
    mc_mean, mc_var = draws.mean(0), draws.var(0)
    w1 = gaussian_w1(draws, mean, var)
    return {
        "analytic_mean": mean,
        "analytic_var": var,
        "mc_mean": mc_mean,
        "mc_var": mc_var,
        "mean_se": (mc_var / samples).sqrt(),
        "mean_error": mc_mean - mean,
        "var_rel_error": (var - mc_var).abs() / mc_var,
        "w1": w1,
        "w1_rel": w1 / mc_var.sqrt(),
    }


# ---------------------------------------------------------------------------- posterior width


def scale_variances(var: Tensor, factors: Sequence[float]) -> list[Tensor]:
    """``[f * var for f in factors]``: a width sweep on given variances (a diagonal posterior's variance
    is about 1/n times its likelihood part when the prior is weak; use :func:`embedding_variances_over_n`
    for the exact dependence on n)."""
    if any(not f > 0 for f in factors):
        raise ValueError(f"width factors must be > 0, got {list(factors)}")
    return [var * f for f in factors]


@contextlib.contextmanager
def pseudo_data_count(posts: Sequence, n: float) -> Iterator[None]:
    """Set ``post.n`` on every posterior for the block; restore each one's own n afterwards."""
    saved = [p.n for p in posts]
    try:
        for p in posts:
            p.n = n
        yield
    finally:
        for p, old in zip(posts, saved, strict=True):
            p.n = old


def embedding_variances_over_n(post, activations: Tensor, ns: Sequence[float]) -> Tensor:
    """[len(ns), N, D] embedding variances of ``activations`` under the fitted posterior ``post`` at each
    pseudo-data count n (prior precision unchanged); ``post.n`` is restored afterwards."""
    out = []
    for n in ns:
        with pseudo_data_count([post], n):
            out.append(post.embedding_variance(activations))
    return torch.stack(out)


# ------------------------------------------------------------------------------------------ figure


def plot_densities(
    samples: Tensor,
    mean: Tensor,
    var: Tensor,
    path: Path,
    labels: Sequence[str] | None = None,
    bins: int = 60,
    title: str = "",
) -> Path:
    """One panel per pair: histogram (density) of the Monte Carlo cosines [S, P] and the analytic
    Gaussian pdf N(mean[p], var[p]) ProbCosine assigns, with W1 in the panel title."""
    samples, mean, var = (
        samples.detach().cpu().double(),
        mean.detach().cpu().double(),
        var.detach().cpu().double(),
    )
    pairs = samples.shape[1]
    cols = min(4, pairs)
    rows = -(-pairs // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.6 * rows + 0.4), squeeze=False)
    w1 = gaussian_w1(samples, mean, var)
    for ax in axes.flat[pairs:]:
        ax.axis("off")
    for p, ax in zip(range(pairs), axes.flat, strict=False):
        x = samples[:, p].numpy()
        ax.hist(x, bins=bins, density=True, color="tab:gray", alpha=0.6, label="Monte Carlo")
        sd = math.sqrt(float(var[p]))
        lo, hi = min(x.min(), float(mean[p]) - 4 * sd), max(x.max(), float(mean[p]) + 4 * sd)
        grid = np.linspace(lo, hi, 400)
        pdf = np.exp(-0.5 * ((grid - float(mean[p])) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
        ax.plot(grid, pdf, color="tab:blue", linewidth=1.2, label="ProbCosine")
        name = labels[p] if labels is not None else f"pair {p}"
        ax.set_title(f"{name}  W1={float(w1[p]):.2g}", fontsize=8)
        ax.set_xlabel("cosine")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
