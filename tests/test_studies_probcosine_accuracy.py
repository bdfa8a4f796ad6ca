"""ProbCosine accuracy study: Monte Carlo against the closed form, W1, width sweeps."""

from __future__ import annotations

import math

import pytest
import torch

from uqvlm.laplace.diag import DiagPosterior
from uqvlm.studies.probcosine_accuracy import (
    compare,
    embedding_variances_over_n,
    gaussian_w1,
    mc_cosine_samples,
    plot_densities,
    scale_variances,
)

S = 20_000


def _random_pairs(pairs: int, dim: int, seed: int, orthogonal: bool = False):
    g = torch.Generator().manual_seed(seed)
    if orthogonal:
        q, _ = torch.linalg.qr(torch.randn(pairs, dim, 2, generator=g, dtype=torch.float64))
        mg, mh = 3 * q[..., 0], 2 * q[..., 1]
    else:
        mg, mh = (torch.randn(pairs, dim, generator=g, dtype=torch.float64) for _ in range(2))
    vg, vh = (torch.rand(pairs, dim, generator=g, dtype=torch.float64) + 0.5 for _ in range(2))
    return mg, vg, mh, vh


def test_mc_samples_are_cosines_of_gaussian_draws():
    mg, vg, mh, vh = _random_pairs(3, 5, 0)
    a = mc_cosine_samples(mg, vg, mh, vh, 1000, torch.Generator().manual_seed(1))
    b = mc_cosine_samples(mg, vg, mh, vh, 1000, torch.Generator().manual_seed(1), max_elements=64)
    assert a.shape == (1000, 3) and (a.abs() <= 1 + 1e-12).all()
    assert torch.equal(
        mc_cosine_samples(mg, 0 * vg, mh, 0 * vh, 2), torch.cosine_similarity(mg, mh).expand(2, 3)
    )
    # Chunking changes which draws go where, not the distribution.
    assert (a.mean(0) - b.mean(0)).abs().max() < 5 * math.sqrt(2 * float(a.var(0).max()) / 1000)


def test_analytic_matches_monte_carlo_for_orthogonal_means_and_small_variance():
    mg, vg, mh, vh = _random_pairs(6, 16, 0, orthogonal=True)
    r = compare(mg, 1e-3 * vg, mh, 1e-3 * vh, S, torch.Generator().manual_seed(1))
    assert (r["mean_error"].abs() < 4 * r["mean_se"]).all()
    # The sample variance of S near-Gaussian draws has relative sd sqrt(2 / S).
    assert (r["var_rel_error"] < 4 * math.sqrt(2 / S)).all()


def test_error_grows_with_posterior_width():
    mg, vg, mh, vh = _random_pairs(8, 16, 0)
    widths = [1e-3, 1e-2, 1e-1, 1.0]
    mean_err, w1 = [], []
    for var_g, var_h in zip(scale_variances(vg, widths), scale_variances(vh, widths), strict=True):
        r = compare(mg, var_g, mh, var_h, S, torch.Generator().manual_seed(1))
        mean_err.append(float(r["mean_error"].abs().mean()))
        w1.append(float(r["w1"].mean()))
    assert all(a < b for a, b in zip(mean_err, mean_err[1:], strict=False)), mean_err
    assert all(a < b for a, b in zip(w1, w1[1:], strict=False)), w1


def test_gaussian_w1_against_closed_forms_and_scipy():
    s = 4000
    levels = (torch.arange(s, dtype=torch.float64) + 0.5) / s
    grid = (0.2 + 0.5 * torch.special.ndtri(levels))[:, None]
    mean, var = torch.tensor([0.2], dtype=torch.float64), torch.tensor([0.25], dtype=torch.float64)
    assert float(gaussian_w1(grid, mean, var)) == pytest.approx(0.0, abs=1e-12)
    assert float(gaussian_w1(grid + 0.3, mean, var)) == pytest.approx(0.3)  # a shift moves every quantile
    stats = pytest.importorskip("scipy.stats")
    x = torch.rand(s, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    reference = stats.wasserstein_distance(x[:, 0].numpy(), grid[:, 0].numpy())
    assert float(gaussian_w1(x, mean, var)) == pytest.approx(reference, rel=1e-9)


def test_embedding_variances_over_n_follow_the_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    d, p = 3, 4
    ggn = torch.rand(d, p, generator=g, dtype=torch.float64)
    post = DiagPosterior.from_diagonal(ggn, weight=torch.randn(d, p, generator=g), n=7.0, prior_precision=2.0)
    a = torch.randn(5, p, generator=g, dtype=torch.float64)
    ns = [0.01, 1.0, 100.0]
    out = embedding_variances_over_n(post, a, ns)
    for i, n in enumerate(ns):  # Var[z_d] = sum_j a_j^2 / (n GGN_dj + lambda)
        expected = (a.square()[:, None, :] / (n * ggn + 2.0)[None]).sum(-1)
        torch.testing.assert_close(out[i], expected)
    assert post.n == 7.0


def test_density_figure_is_written(tmp_path):
    mg, vg, mh, vh = _random_pairs(3, 8, 0)
    r = compare(mg, 0.1 * vg, mh, 0.1 * vh, 2000, torch.Generator().manual_seed(0))
    draws = mc_cosine_samples(mg, 0.1 * vg, mh, 0.1 * vh, 2000, torch.Generator().manual_seed(0))
    path = plot_densities(
        draws, r["analytic_mean"], r["analytic_var"], tmp_path / "d.png", labels=["a", "b", "c"]
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="> 0"):
        scale_variances(vg, [1.0, 0.0])
