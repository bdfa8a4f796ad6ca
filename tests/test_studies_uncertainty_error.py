"""Uncertainty-vs-error binning against a brute-force loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from uqvlm.studies.uncertainty_error import (
    error_by_uncertainty,
    plot_uncertainty_error,
    predictive_uncertainty,
)


def _case(n: int = 53, k: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, k, generator=g, dtype=torch.float64)
    logits[:6] = logits[6:12]  # exact ties in uncertainty
    return logits.log_softmax(-1), torch.randint(0, k, (n,), generator=g)


def _brute_force(log_probs, labels, bins, kind):
    rows = log_probs.tolist()
    u = []
    for row in rows:
        p = [math.exp(x) for x in row]
        u.append(-sum(q * math.log(q) for q in p if q > 0) if kind == "entropy" else 1 - max(p))
    wrong = [int(max(range(len(r)), key=lambda j: r[j]) != int(y)) for r, y in zip(rows, labels, strict=True)]
    order = sorted(range(len(u)), key=lambda i: (u[i], i))
    out = {"uncertainty": [], "error_rate": [], "count": [], "lower": [], "upper": []}
    for group in np.array_split(np.array(order), bins):
        out["uncertainty"].append(sum(u[i] for i in group) / len(group))
        out["error_rate"].append(sum(wrong[i] for i in group) / len(group))
        out["count"].append(len(group))
        out["lower"].append(min(u[i] for i in group))
        out["upper"].append(max(u[i] for i in group))
    return out


@pytest.mark.parametrize("kind", ["entropy", "one_minus_max"])
@pytest.mark.parametrize("bins", [1, 4, 7, 53])
def test_binning_matches_a_brute_force_loop(kind, bins):
    lp, y = _case()
    got = error_by_uncertainty(lp, y, bins=bins, kind=kind)
    want = _brute_force(lp, y, bins, kind)
    for key, values in want.items():
        np.testing.assert_allclose(got[key].numpy(), np.array(values, dtype=float), rtol=1e-12, atol=1e-12)


def test_entropy_handles_zero_probabilities_and_bad_input():
    lp = torch.tensor([[0.0, -math.inf], [math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    torch.testing.assert_close(
        predictive_uncertainty(lp), torch.tensor([0.0, math.log(2)], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="kind"):
        predictive_uncertainty(lp, "variance")
    lp, y = _case()
    with pytest.raises(ValueError, match="bins"):
        error_by_uncertainty(lp, y, bins=54)


def test_figure_is_written(tmp_path):
    lp, y = _case()
    lp2, _ = _case(seed=1)
    curves = {"before AL": error_by_uncertainty(lp, y, 5), "after AL": error_by_uncertainty(lp2, y, 5)}
    path = plot_uncertainty_error(curves, tmp_path / "u.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
