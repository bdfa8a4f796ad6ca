"""Laplace posteriors (KFAC, diagonal, MAP) and their evidence against brute-force references."""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
from torch.func import jacrev

from uqvlm.features import LastLayer
from uqvlm.laplace import (
    DiagPosterior,
    InfoNCE,
    KFACPosterior,
    Laplace,
    LastLayerPosterior,
    MAPPosterior,
    SigLIP,
    diag_log_evidence,
    grid_search_prior,
    kfac_log_evidence,
    load_published_factors,
    maximise_evidence,
)

F64 = torch.float64
LOG_SCALE = math.log(4.0)
BIAS = -1.5
# ../shared beside the checkout, or UQVLM_SHARED (as in conftest.py).
REF_DIR = (
    Path(os.environ.get("UQVLM_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
    / "reference-hessians"
)
REF_MODEL_DIR = REF_DIR / "clip-vit-b-32-laion2b-s34b-b79k"


# ------------------------------------------------------------------------------ brute-force truth
def _logits_fn(target: torch.Tensor, log_scale: float, bias: float | None):
    y = torch.nn.functional.normalize(target, dim=-1)

    def logits(z: torch.Tensor) -> torch.Tensor:
        out = math.exp(log_scale) * (z / z.norm()) @ y.T
        return out if bias is None else out + bias

    return logits


def brute_ggn(
    z: torch.Tensor, target: torch.Tensor, log_scale: float, bias: float | None = None
) -> torch.Tensor:
    """Per-source GGN J^T (d^2 loss / d logits^2) J by autograd; InfoNCE if bias is None, else SigLIP."""
    f = _logits_fn(target, log_scale, bias)
    jac = jacrev(f)(z)  # [C, D]
    logits = f(z)
    if bias is None:
        p = torch.softmax(logits, -1)
        h_out = torch.diag(p) - torch.outer(p, p)
    else:
        s = torch.sigmoid(logits)
        h_out = torch.diag(s * (1 - s))
    return jac.T @ h_out @ jac


class BruteInfoNCE(InfoNCE):
    """InfoNCE whose GGNs come from autograd, source by source (records itself as InfoNCE)."""

    def ggn(self, sources, targets):
        return sum(brute_ggn(z, targets, self.logit_scale) for z in sources)

    def ggn_diagonals(self, sources, targets):
        return torch.stack([brute_ggn(z, targets, self.logit_scale).diagonal() for z in sources])


class BruteSigLIP(SigLIP):
    """SigLIP whose GGNs come from autograd, source by source (records itself as SigLIP)."""

    def ggn(self, sources, targets):
        return sum(brute_ggn(z, targets, self.logit_scale, self.logit_bias) for z in sources)

    def ggn_diagonals(self, sources, targets):
        return torch.stack(
            [brute_ggn(z, targets, self.logit_scale, self.logit_bias).diagonal() for z in sources]
        )


@pytest.fixture(params=["brute", "real"])
def likelihood_of(request):
    """``likelihood_of(kind)``: accumulation tests run with brute-force autograd GGNs and with uqvlm's."""
    infonce, siglip = (BruteInfoNCE, BruteSigLIP) if request.param == "brute" else (InfoNCE, SigLIP)

    def make(kind: str) -> InfoNCE | SigLIP:
        return siglip(LOG_SCALE, BIAS) if kind == "siglip" else infonce(LOG_SCALE)

    return make


def _layer(d: int, p: int, bias: bool, seed: int = 0, scale: float = 0.3) -> LastLayer:
    g = torch.Generator().manual_seed(seed)
    w = scale * torch.randn(d, p, generator=g, dtype=F64)
    b = scale * torch.randn(d, generator=g, dtype=F64) if bias else None
    return LastLayer(w, b)


def _batches(layer: LastLayer, sizes: list[int], seed: int = 1):
    """Class batches (activations, source embeddings, target embeddings)."""
    g = torch.Generator().manual_seed(seed)
    d, p = layer.weight.shape
    out = []
    for c in sizes:
        a = torch.randn(c, p, generator=g, dtype=F64)
        z = a @ layer.weight.T + (0 if layer.bias is None else layer.bias)
        tgt = z + 0.7 * torch.randn(c, d, generator=g, dtype=F64)  # paired but noisy targets
        out.append((a, z, tgt))
    return out


def _augment(a: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], 1) if bias else a


def _fit(structure: str, layer: LastLayer, batches, likelihood, n: float = 3.0, lam: float = 0.7):
    post = Laplace(layer, structure, likelihood=likelihood, n=n, prior_precision=lam)
    for a, z, tgt in batches:
        post.update(a, z, tgt)
    return post.finalize()


def _vec_jacobian(layer: LastLayer, a: torch.Tensor) -> torch.Tensor:
    """[D, P] Jacobian of z = W a (+ b) w.r.t. the column-stacked vec([W | b]) (index j*D + d)."""
    w, b = layer.weight, layer.bias
    if b is None:
        jw = jacrev(lambda w_: w_ @ a)(w)  # [D, D, p]
    else:
        jw, jb = jacrev(lambda w_, b_: w_ @ a + b_, argnums=(0, 1))(w, b)
        jw = torch.cat([jw, jb[:, :, None]], dim=2)  # bias = one more input column
    return jw.permute(0, 2, 1).reshape(jw.shape[0], -1)


def _brute_variance(layer: LastLayer, acts: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    sigma = torch.linalg.inv(precision)
    rows = []
    for a in acts:
        jac = _vec_jacobian(layer, a)
        rows.append((jac @ sigma @ jac.T).diagonal())
    return torch.stack(rows)


def _damped(mat: torch.Tensor, n: float, lam: float) -> torch.Tensor:
    return math.sqrt(n) * mat + math.sqrt(lam) * torch.eye(mat.shape[0], dtype=F64)


# --------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("likelihood", ["infonce", "siglip"])
@pytest.mark.parametrize("bias", [False, True])
def test_kfac_factors_equal_brute_force_sums(likelihood_of, likelihood, bias):
    layer = _layer(4, 3, bias)
    batches = _batches(layer, [5, 3, 6])
    post = _fit("kfac", layer, batches, likelihood_of(likelihood))
    lb = BIAS if likelihood == "siglip" else None
    sum_aa = sum(_augment(a, bias).T @ _augment(a, bias) for a, _, _ in batches)
    sum_h = sum(brute_ggn(z, tgt, LOG_SCALE, lb) for _, zs, tgt in batches for z in zs)
    n_src = sum(a.shape[0] for a, _, _ in batches)
    assert post.num_data == n_src
    torch.testing.assert_close(post.A, sum_aa / math.sqrt(n_src), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(post.B, sum_h / math.sqrt(n_src), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["infonce", "siglip"])
@pytest.mark.parametrize("bias", [False, True])
def test_diag_ggn_equals_brute_force(likelihood_of, likelihood, bias):
    layer = _layer(4, 3, bias, seed=2)
    batches = _batches(layer, [4, 5], seed=3)
    post = _fit("diag", layer, batches, likelihood_of(likelihood))
    lb = BIAS if likelihood == "siglip" else None
    ggn = torch.zeros(4, 3 + bias, dtype=F64)
    for a, zs, tgt in batches:
        for a_n, z in zip(_augment(a, bias), zs, strict=True):
            ggn += brute_ggn(z, tgt, LOG_SCALE, lb).diagonal()[:, None] * a_n[None, :] ** 2
    torch.testing.assert_close(post.ggn_diagonal, ggn, rtol=1e-8, atol=1e-12)


def test_update_after_finalize_extends_the_data(likelihood_of):
    layer = _layer(3, 2, True)
    batches = _batches(layer, [3, 4, 2])
    one = _fit("kfac", layer, batches, likelihood_of("infonce"))
    two = _fit("kfac", layer, batches[:2], likelihood_of("infonce"))
    a, z, t = batches[2]
    two.update(a, z, t)
    with pytest.raises(RuntimeError, match="finalize"):
        two.embedding_variance(a)
    two.finalize()
    torch.testing.assert_close(two.A, one.A)
    torch.testing.assert_close(two.B, one.B)


# ---------------------------------------------------------------------------------- map-reduce
@pytest.mark.parametrize("structure", ["kfac", "diag"])
@pytest.mark.parametrize("bias", [False, True])
def test_partial_sums_of_disjoint_batches_merge_into_the_whole_data_posterior(structure, bias):
    layer = _layer(4, 3, bias, seed=5)
    batches = _batches(layer, [5, 3, 6, 4], seed=6)
    likelihood = BruteSigLIP(LOG_SCALE, BIAS)
    whole = _fit(structure, layer, batches, likelihood)
    # Parts of one and of two batches, merged out of order: the sums are additive.
    parts = []
    for group in (batches[2:], batches[:1], batches[1:2]):
        post = Laplace(layer, structure, likelihood=likelihood)
        for a, z, t in group:
            post.update(a, z, t)
        parts.append(post.partial_sums())
    merged = LastLayerPosterior.from_partial_sums(
        layer, parts, likelihood=likelihood, n=3.0, prior_precision=0.7
    )
    assert type(merged) is type(whole) and merged.fitted and merged.num_data == whole.num_data == 18
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(7), dtype=F64)
    torch.testing.assert_close(merged.embedding_variance(x), whole.embedding_variance(x), rtol=1e-12, atol=0)
    assert merged.log_evidence() == pytest.approx(whole.log_evidence(), rel=1e-12)
    sums = parts[0]["sums"]
    assert all(v.dtype == F64 and v.device.type == "cpu" for v in sums.values())
    assert set(sums) == ({"sum_aa", "sum_h"} if structure == "kfac" else {"ggn"})


def test_from_partial_sums_refuses_mixed_or_malformed_parts():
    layer = _layer(3, 2, False)
    (a, z, t), (a2, z2, t2) = _batches(layer, [4, 3])
    kfac = Laplace(layer, "kfac", likelihood=InfoNCE(LOG_SCALE))
    kfac.update(a, z, t)
    diag = Laplace(layer, "diag", likelihood=InfoNCE(LOG_SCALE))
    diag.update(a2, z2, t2)
    with pytest.raises(ValueError, match="different structures"):
        LastLayerPosterior.from_partial_sums(layer, [kfac.partial_sums(), diag.partial_sums()])
    with pytest.raises(ValueError, match="not those of a DiagPosterior"):
        DiagPosterior.from_partial_sums(layer, [kfac.partial_sums()])
    with pytest.raises(ValueError, match="at least one part"):
        LastLayerPosterior.from_partial_sums(layer, [])
    wider = _layer(3, 5, False)
    with pytest.raises(ValueError, match="shape"):
        LastLayerPosterior.from_partial_sums(wider, [kfac.partial_sums()])
    no_count = {**kfac.partial_sums(), "num_data": 0}
    with pytest.raises(ValueError, match="num_data"):
        LastLayerPosterior.from_partial_sums(layer, [no_count])
    with pytest.raises(ValueError, match="no data"):
        Laplace(layer, "kfac", likelihood=InfoNCE(LOG_SCALE)).partial_sums()


# ------------------------------------------------------------------------------------ variance
@pytest.mark.parametrize("bias", [False, True])
def test_kfac_variance_equals_explicit_kronecker_covariance(bias):
    d, p = 3, 4
    layer = _layer(d, p, bias, seed=4)
    g = torch.Generator().manual_seed(5)
    pa = p + bias
    xa = torch.randn(pa, 2 * pa, generator=g, dtype=F64)
    xb = torch.randn(d, 2 * d, generator=g, dtype=F64)
    A, B = xa @ xa.T, 0.1 * xb @ xb.T
    n, lam = 2.5, 0.8
    post = KFACPosterior.from_factors(A, B, weight=layer.weight, bias=layer.bias, n=n, prior_precision=lam)
    acts = torch.randn(5, p, generator=g, dtype=F64)
    # Column-stacked vec: Cov[W_dj, W_ek] = A~^-1_jk B~^-1_de  <=>  precision kron(A~, B~).
    precision = torch.kron(_damped(A, n, lam), _damped(B, n, lam))
    torch.testing.assert_close(post.embedding_variance(acts), _brute_variance(layer, acts, precision))
    # Changing lambda and n needs no refit.
    post.prior_precision, post.n = 3.0, 0.5
    precision = torch.kron(_damped(A, 0.5, 3.0), _damped(B, 0.5, 3.0))
    torch.testing.assert_close(post.embedding_variance(acts), _brute_variance(layer, acts, precision))


@pytest.mark.parametrize("bias", [False, True])
def test_diag_variance_equals_explicit_diagonal_covariance(bias):
    d, p = 3, 4
    layer = _layer(d, p, bias, seed=6)
    g = torch.Generator().manual_seed(7)
    ggn = torch.rand(d, p + bias, generator=g, dtype=F64) * 5
    n, lam = 4.0, 0.3
    post = DiagPosterior.from_diagonal(ggn, weight=layer.weight, bias=layer.bias, n=n, prior_precision=lam)
    acts = torch.randn(5, p, generator=g, dtype=F64)
    precision = torch.diag((n * ggn + lam).T.reshape(-1))  # column-stacked like the Jacobian
    torch.testing.assert_close(post.embedding_variance(acts), _brute_variance(layer, acts, precision))


def test_embedding_variance_keeps_dtype_and_handles_float32():
    layer = _layer(3, 4, True, seed=8)
    post = KFACPosterior.from_factors(torch.eye(5) * 2, torch.eye(3), weight=layer.weight, bias=layer.bias)
    acts = torch.randn(6, 4)
    v32 = post.embedding_variance(acts)
    assert v32.dtype == torch.float32 and v32.shape == (6, 3)
    torch.testing.assert_close(v32.double(), post.embedding_variance(acts.double()), rtol=1e-6, atol=0)
    assert post.embedding_variance(torch.zeros(0, 4)).shape == (0, 3)


@pytest.mark.parametrize("structure", ["kfac", "diag"])
def test_weight_samples_reproduce_embedding_variance(structure):
    d, p = 3, 2
    layer = _layer(d, p, True, seed=9)
    g = torch.Generator().manual_seed(10)
    if structure == "kfac":
        xa = torch.randn(p + 1, 5, generator=g, dtype=F64)
        post = KFACPosterior.from_factors(
            xa @ xa.T, torch.eye(d, dtype=F64) * 2, weight=layer.weight, bias=layer.bias
        )
    else:
        ggn = torch.rand(d, p + 1, generator=g, dtype=F64)
        post = DiagPosterior.from_diagonal(ggn, weight=layer.weight, bias=layer.bias)
    post.n, post.prior_precision = 1.0, 0.5
    w, b = post.sample(40_000, generator=torch.Generator().manual_seed(11))
    assert w.shape == (40_000, d, p) and b.shape == (40_000, d)
    acts = torch.randn(3, p, generator=g, dtype=F64)
    z = torch.einsum("sdp,np->snd", w, acts) + b[:, None, :]
    var = post.embedding_variance(acts)
    se = var * math.sqrt(2 / z.shape[0])
    assert torch.all((z.var(0) - var).abs() <= 5 * se)
    assert torch.all((z.mean(0) - post.embedding_mean(acts)).abs() <= 5 * (var / z.shape[0]).sqrt())


# ------------------------------------------------------------------------------------ evidence
def _kfac_problem(seed: int = 12):
    g = torch.Generator().manual_seed(seed)
    p, q = 4, 3
    xa = torch.randn(p, 6, generator=g, dtype=F64)
    xb = torch.randn(q, 5, generator=g, dtype=F64)
    layer = _layer(q, p, False, seed=seed, scale=0.2)
    return xa @ xa.T, 0.5 * xb @ xb.T, layer


def _brute_kfac_evidence(A, B, layer, lam, n, variant="exact"):
    p, q = A.shape[0], B.shape[0]
    w2 = float(layer.weight.square().sum())
    prior = -0.5 * lam * w2 + 0.5 * p * q * math.log(lam)
    at, bt = _damped(A, n, lam), _damped(B, n, lam)
    if variant == "exact":
        return prior - 0.5 * float(torch.linalg.slogdet(torch.kron(at, bt))[1])
    return prior - (p * float(torch.linalg.slogdet(at)[1]) + q * float(torch.linalg.slogdet(bt)[1]))


@pytest.mark.parametrize("variant", ["exact", "reference"])
def test_kfac_log_evidence_equals_brute_force(variant):
    A, B, layer = _kfac_problem()
    post = KFACPosterior.from_factors(A, B, weight=layer.weight, n=2.0, prior_precision=1.0)
    for lam, n in [(0.01, 1.0), (1.0, 2.0), (37.0, 10.0)]:
        expected = _brute_kfac_evidence(A, B, layer, lam, n, variant)
        assert post.log_evidence(lam, n, variant=variant) == pytest.approx(expected, rel=1e-12, abs=1e-10)
        ea, eb = torch.linalg.eigvalsh(A), torch.linalg.eigvalsh(B)
        assert kfac_log_evidence(ea, eb, post.weight_sq_norm, lam, n, variant) == pytest.approx(
            expected, rel=1e-12
        )


def test_diag_log_evidence_equals_brute_force():
    layer = _layer(3, 4, True, seed=13)
    ggn = torch.rand(3, 5, dtype=F64, generator=torch.Generator().manual_seed(14)) * 3
    post = DiagPosterior.from_diagonal(ggn, weight=layer.weight, bias=layer.bias)
    w2 = float(layer.weight.square().sum() + layer.bias.square().sum())
    for lam, n in [(0.1, 1.0), (5.0, 10.0)]:
        precision = torch.diag((n * ggn + lam).reshape(-1))
        expected = -0.5 * lam * w2 + 0.5 * 15 * math.log(lam) - 0.5 * float(torch.logdet(precision))
        assert post.log_evidence(lam, n) == pytest.approx(expected, rel=1e-12)
        assert diag_log_evidence(ggn, w2, lam, n) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("variant", ["exact", "reference"])
def test_evidence_maximiser_finds_dense_grid_argmax(variant):
    A, B, layer = _kfac_problem(seed=15)
    n = 3.0
    post = KFACPosterior.from_factors(A, B, weight=layer.weight, n=n)
    lam_star = post.optimize_prior_precision("evidence", variant=variant)
    assert post.prior_precision == lam_star
    # Brute force: explicit Kronecker log-determinants on a dense log grid (batched slogdet).
    log_grid = torch.linspace(math.log(1e-4), math.log(1e8), 20_001, dtype=F64)
    lams = log_grid.exp()
    p, q = A.shape[0], B.shape[0]
    eye_a, eye_b = torch.eye(p, dtype=F64), torch.eye(q, dtype=F64)
    at = math.sqrt(n) * A + lams.sqrt()[:, None, None] * eye_a
    bt = math.sqrt(n) * B + lams.sqrt()[:, None, None] * eye_b
    w2 = float(layer.weight.square().sum())
    prior = -0.5 * lams * w2 + 0.5 * p * q * log_grid
    if variant == "exact":
        kron = (at[:, :, None, :, None] * bt[:, None, :, None, :]).reshape(-1, p * q, p * q)
        vals = prior - 0.5 * torch.linalg.slogdet(kron)[1]
    else:
        vals = prior - (p * torch.linalg.slogdet(at)[1] + q * torch.linalg.slogdet(bt)[1])
    i = int(vals.argmax())
    assert 0 < i < len(lams) - 1, "test problem must have an interior optimum"
    step = float(log_grid[1] - log_grid[0])
    assert abs(math.log(lam_star) - float(log_grid[i])) <= step
    assert post.log_evidence(lam_star, variant=variant) >= float(vals[i]) - 1e-9


def test_no_eigendecomposition_after_finalize(monkeypatch, likelihood_of):
    layer = _layer(3, 2, True)
    calls = {"eigh": 0}
    real_eigh = torch.linalg.eigh

    def counting(*args, **kwargs):
        calls["eigh"] += 1
        return real_eigh(*args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", counting)
    post = _fit("kfac", layer, _batches(layer, [4, 3]), likelihood_of("infonce"))
    assert calls["eigh"] == 2  # A and B, once each
    for name in ("eigvalsh", "inv", "cholesky", "slogdet", "det", "solve", "svd"):
        monkeypatch.setattr(torch.linalg, name, _forbidden(name))
    monkeypatch.setattr(torch, "logdet", _forbidden("logdet"))
    acts = torch.randn(4, 2, dtype=F64)
    for lam in (1e-3, 0.1, 10.0, 1e4):
        for n in (1.0, 10.0):
            post.prior_precision, post.n = lam, n
            post.log_evidence()
            post.log_evidence(variant="reference")
            post.embedding_variance(acts)
    post.optimize_prior_precision("evidence")
    post.optimize_prior_precision("evidence", variant="reference")
    post.sample(3)
    assert calls["eigh"] == 2


def _forbidden(name):
    def fail(*args, **kwargs):
        raise AssertionError(f"torch.linalg.{name} called after finalize")

    return fail


def test_grid_search_prior_picks_lowest_nll_and_sets_candidates():
    assert grid_search_prior(lambda lam: (math.log(lam) - math.log(3.0)) ** 2, [0.1, 1.0, 3.0, 10.0]) == 3.0
    assert grid_search_prior(lambda lam: float("nan") if lam < 1 else lam, [0.5, 2.0, 4.0]) == 2.0
    with pytest.raises(ValueError, match="non-finite"):
        grid_search_prior(lambda lam: float("inf"), [1.0, 2.0])
    layer = _layer(2, 2, False)
    post = DiagPosterior.from_diagonal(torch.ones(2, 2, dtype=F64), weight=layer.weight)
    seen = []

    def nll(lam):
        seen.append(post.prior_precision == lam)
        return abs(lam - 7.0)

    assert post.optimize_prior_precision("grid", nll_fn=nll, grid=[1.0, 5.0, 8.0]) == 8.0
    assert all(seen) and post.prior_precision == 8.0


def test_maximise_evidence_on_known_function():
    lam0 = 123.0
    found = maximise_evidence(lambda lam: -((math.log(lam) - math.log(lam0)) ** 2), init=1.0)
    assert found == pytest.approx(lam0, rel=1e-8)
    with pytest.warns(RuntimeWarning, match="bound"):
        maximise_evidence(lambda lam: lam, bounds=(1e-2, 1e2))


# --------------------------------------------------------------------------------- MAP, caching
def test_map_posterior_has_zero_variance_and_counts():
    layer = _layer(3, 2, True)
    post = Laplace(layer, structure="map")
    assert isinstance(post, MAPPosterior)
    a, z, t = _batches(layer, [4])[0]
    post.update(a, z, t)  # no likelihood needed
    post.finalize()
    assert post.num_data == 4
    assert torch.equal(post.embedding_variance(a), torch.zeros(4, 3, dtype=F64))
    torch.testing.assert_close(post.embedding_mean(a), z)
    assert post.optimize_prior_precision("evidence") == post.prior_precision
    w, b = post.sample(2)
    torch.testing.assert_close(w[1], layer.weight)
    torch.testing.assert_close(b[0], layer.bias)


@pytest.mark.parametrize("structure", ["kfac", "diag", "map"])
@pytest.mark.parametrize("bias", [False, True])
def test_state_dict_roundtrip(likelihood_of, structure, bias):
    layer = _layer(3, 2, bias)
    post = _fit(structure, layer, _batches(layer, [4, 3]), likelihood_of("siglip"), n=2.0, lam=0.4)
    buf = io.BytesIO()
    torch.save(post.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    again = LastLayerPosterior.from_state_dict(state)
    assert type(again) is type(post)
    assert (again.n, again.prior_precision, again.num_data) == (2.0, 0.4, 7)
    assert again.likelihood == SigLIP(LOG_SCALE, BIAS)  # a cached posterior knows its likelihood
    acts = torch.randn(3, 2, dtype=F64)
    torch.testing.assert_close(again.embedding_variance(acts), post.embedding_variance(acts))
    if structure != "map":
        assert again.log_evidence() == pytest.approx(post.log_evidence(), rel=1e-14)
    other = DiagPosterior if structure == "kfac" else KFACPosterior
    with pytest.raises(ValueError, match="posterior"):
        other.from_state_dict(state)


def test_from_factors_matches_fitted_and_extends(likelihood_of):
    layer = _layer(3, 2, True)
    batches = _batches(layer, [4, 3, 5])
    likelihood = likelihood_of("infonce")
    fitted = _fit("kfac", layer, batches, likelihood)
    built = KFACPosterior.from_factors(
        fitted.A,
        fitted.B,
        num_data=fitted.num_data,
        weight=layer.weight,
        bias=layer.bias,
        n=3.0,
        prior_precision=0.7,
    )
    acts = torch.randn(3, 2, dtype=F64)
    torch.testing.assert_close(built.embedding_variance(acts), fitted.embedding_variance(acts))
    partial = _fit("kfac", layer, batches[:2], likelihood)
    ext = KFACPosterior.from_factors(
        partial.A,
        partial.B,
        num_data=partial.num_data,
        weight=layer.weight,
        bias=layer.bias,
        likelihood=likelihood,
    )
    a, z, t = batches[2]
    ext.update(a, z, t)
    ext.finalize()
    torch.testing.assert_close(ext.A, fitted.A)
    torch.testing.assert_close(ext.B, fitted.B)
    no_n = KFACPosterior.from_factors(
        partial.A, partial.B, weight=layer.weight, bias=layer.bias, likelihood=likelihood
    )
    with pytest.raises(RuntimeError, match="without num_data"):
        no_n.update(a, z, t)


def test_state_records_the_likelihood_and_refuses_other_versions(likelihood_of):
    layer = _layer(3, 2, True)
    post = _fit("kfac", layer, _batches(layer, [4, 3]), likelihood_of("infonce"))
    state = post.state_dict()
    assert state["likelihood"] == {"kind": "infonce", "logit_scale": LOG_SCALE}
    # A state of the previous format (no likelihood) is refused by its version, not half-read.
    old = {k: v for k, v in state.items() if k != "likelihood"} | {"version": 1}
    with pytest.raises(ValueError, match="version 1"):
        LastLayerPosterior.from_state_dict(old)
    with pytest.raises(ValueError, match="unknown likelihood 'mse'"):
        LastLayerPosterior.from_state_dict({**state, "likelihood": {"kind": "mse"}})
    with pytest.raises(ValueError, match="SigLIP"):
        LastLayerPosterior.from_state_dict({**state, "likelihood": {"kind": "siglip", "logit_scale": 1.0}})
    no_likelihood = KFACPosterior.from_factors(post.A, post.B, weight=layer.weight, bias=layer.bias)
    assert LastLayerPosterior.from_state_dict(no_likelihood.state_dict()).likelihood is None


class _GGNOnly:
    """A likelihood with the two GGN methods and nothing else (no state to record)."""

    def ggn(self, sources, targets):
        return InfoNCE(LOG_SCALE).ggn(sources, targets)

    def ggn_diagonals(self, sources, targets):
        return InfoNCE(LOG_SCALE).ggn_diagonals(sources, targets)


def test_any_object_with_the_ggn_methods_is_a_likelihood():
    layer = _layer(3, 2, True)
    batches = _batches(layer, [4, 3])
    post = _fit("kfac", layer, batches, _GGNOnly())
    torch.testing.assert_close(post.B, _fit("kfac", layer, batches, InfoNCE(LOG_SCALE)).B, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no state"):
        post.state_dict()
    moved = post.to("cpu")  # a copy keeps the very likelihood object
    assert moved.likelihood is post.likelihood and moved.num_data == 7


def test_with_point_needs_a_likelihood_num_data_and_curvature():
    layer = _layer(3, 2, True)
    a, z, t = _batches(layer, [4])[0]
    likelihood = InfoNCE(LOG_SCALE)
    kfac = _fit("kfac", layer, [(a, z, t)], likelihood)
    new = kfac.with_point(a[0], z[0], t, copies=2)
    assert new.num_data == 6 and new.likelihood is likelihood and kfac.num_data == 4
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="copies"):
            kfac.with_point(a[0], z[0], t, copies=bad)
    with pytest.raises(ValueError, match="embedding"):
        kfac.with_point(a[0], z[0, :2], t)
    with pytest.raises(ValueError, match="activation"):
        kfac.with_point(a[0, :1], z[0], t)
    unrecorded = KFACPosterior.from_factors(
        kfac.A, kfac.B, weight=layer.weight, bias=layer.bias, likelihood=likelihood
    )
    with pytest.raises(ValueError, match="num_data"):
        unrecorded.with_point(a[0], z[0], t)
    for post in (
        KFACPosterior.from_factors(kfac.A, kfac.B, 4, weight=layer.weight, bias=layer.bias),
        DiagPosterior.from_diagonal(torch.ones(3, 3, dtype=F64), 4, weight=layer.weight, bias=layer.bias),
    ):
        with pytest.raises(ValueError, match="likelihood"):
            post.with_point(a[0], z[0], t)
    with pytest.raises(NotImplementedError, match="MAP"):
        Laplace(layer, "map").with_point(a[0], z[0], t)


# ------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("structure", ["kfac", "diag", "map"])
def test_rejects_bad_hyperparameters(structure):
    layer = _layer(3, 2, False)
    for bad in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="prior_precision"):
            Laplace(layer, structure=structure, prior_precision=bad)
        with pytest.raises(ValueError, match=r"\bn\b"):
            Laplace(layer, structure=structure, n=bad)
    post = Laplace(layer, structure=structure)
    with pytest.raises(ValueError, match="prior_precision"):
        post.prior_precision = -2.0
    with pytest.raises(ValueError, match=r"\bn\b"):
        post.n = 0
    assert post.prior_precision == 1.0 and post.n == 10.0


def test_rejects_bad_update_input():
    layer = _layer(3, 2, True)
    post = Laplace(layer, structure="kfac", likelihood=InfoNCE(LOG_SCALE))
    a, z, t = _batches(layer, [4])[0]
    cases = [
        ((a.clone().fill_(float("nan")), z, t), "activations"),
        ((a[:, :1], z, t), "activations"),
        ((a[:3], z, t), "source_emb"),
        ((a, z[:, :2], t), "source_emb"),
        ((a, z, t[:, :2]), "target_emb"),
        ((a, z, t.clone().fill_(float("inf"))), "target_emb"),
    ]
    for args, name in cases:
        with pytest.raises(ValueError, match=name):
            post.update(*args)
    # The likelihood's scale and bias are checked once, when it is built.
    for build, name in [
        (lambda: InfoNCE(float("nan")), "logit_scale"),
        (lambda: SigLIP(float("inf"), BIAS), "logit_scale"),
        (lambda: SigLIP(LOG_SCALE, None), "logit_bias"),
        (lambda: SigLIP(LOG_SCALE, float("nan")), "logit_bias"),
        (lambda: Laplace(layer, "kfac", likelihood="siglip"), "likelihood"),
    ]:
        with pytest.raises(ValueError, match=name):
            build()
    for structure in ("kfac", "diag"):  # curvature needs a likelihood
        with pytest.raises(ValueError, match="likelihood"):
            Laplace(layer, structure).update(a, z, t)
    assert post.num_data == 0
    with pytest.raises(RuntimeError, match="no data"):
        post.finalize()
    with pytest.raises(ValueError, match="structure"):
        Laplace(layer, structure="full")


def test_rejects_bad_inference_input():
    layer = _layer(3, 2, True)
    post = KFACPosterior.from_factors(torch.eye(3), torch.eye(3), weight=layer.weight, bias=layer.bias)
    with pytest.raises(ValueError, match="activations"):
        post.embedding_variance(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="activations"):
        post.embedding_variance(torch.ones(2, 3))
    with pytest.raises(ValueError, match="prior_precision"):
        post.log_evidence(prior_precision=0.0)
    with pytest.raises(ValueError, match=r"\bn\b"):
        post.log_evidence(n=-1.0)
    with pytest.raises(ValueError, match="variant"):
        post.log_evidence(variant="published")
    with pytest.raises(ValueError, match="A must have shape"):
        KFACPosterior.from_factors(torch.eye(2), torch.eye(3), weight=layer.weight, bias=layer.bias)
    with pytest.raises(ValueError, match="B must have shape"):
        KFACPosterior.from_factors(torch.eye(3), torch.eye(4), weight=layer.weight, bias=layer.bias)
    with pytest.raises(ValueError, match="positive semi-definite"):
        KFACPosterior.from_factors(-torch.eye(3), torch.eye(3), weight=layer.weight, bias=layer.bias)
    with pytest.raises(ValueError, match="prior_precision"):
        kfac_log_evidence(torch.ones(2), torch.ones(2), 1.0, -1.0, 1.0)
    with pytest.raises(ValueError, match=r"\bn\b"):
        kfac_log_evidence(torch.ones(2), torch.ones(2), 1.0, 1.0, 0.0)


# --------------------------------------------------------------------------------- published factors
@pytest.fixture(scope="module")
def published():
    if not REF_MODEL_DIR.is_dir():
        pytest.skip(f"published reference factors not found at {REF_MODEL_DIR}")
    return load_published_factors(REF_MODEL_DIR)


W_IMG_SQ = 63.6576


def test_published_factor_traces(published):
    expected = {"A_img": 564881.7, "B_img": 6128.29, "A_txt": 335626.2, "B_txt": 9389.46}
    for key, trace in expected.items():
        assert float(published[key].trace()) == pytest.approx(trace, rel=1e-4), key
    assert published["A_img"].shape == (768, 768) and published["B_img"].shape == (512, 512)
    assert published["lambda_img"] == pytest.approx(1708.95, rel=1e-5)


@pytest.fixture(scope="module")
def published_img(published):
    d, p = 512, 768
    # Only ||W||^2 enters the evidence; any weight with the model's norm will do.
    weight = torch.full((d, p), math.sqrt(W_IMG_SQ / (d * p)), dtype=F64)
    return KFACPosterior.from_factors(published["A_img"], published["B_img"], weight=weight, n=1.0)


@pytest.mark.parametrize("n, expected", [(1.0, 1708.95), (10.0, 2997.88)])
def test_reference_variant_reproduces_published_lambda(published_img, n, expected):
    published_img.n = n
    lam = published_img.optimize_prior_precision("evidence", variant="reference")
    assert lam == pytest.approx(expected, rel=1e-3)
    # The same through the pure functions.
    fn = lambda x: kfac_log_evidence(published_img.eig_A, published_img.eig_B, W_IMG_SQ, x, n, "reference")  # noqa: E731
    assert maximise_evidence(fn) == pytest.approx(lam, rel=1e-9)


@pytest.mark.parametrize("n, expected", [(1.0, 3085.72), (10.0, 3913.31)])
def test_exact_variant_on_published_factors(published_img, n, expected):
    # Regression values of the exact Laplace evidence (not published): the maximiser is a stationary
    # point of the exact formula and differs from the published lambda.
    published_img.n = n
    lam = published_img.optimize_prior_precision("evidence", variant="exact")
    assert lam == pytest.approx(expected, rel=1e-4)
    for f in (0.99, 1.01):
        assert published_img.log_evidence(lam) > published_img.log_evidence(lam * f)


def _cholesky_logdet(m: torch.Tensor) -> float:
    return 2.0 * float(torch.linalg.cholesky(m).diagonal().log().sum())


@pytest.mark.parametrize("n", [1.0, 10.0])
def test_exact_evidence_optimum_on_published_factors_by_brute_force(published, published_img, n):
    """The exact maximiser against an independent computation: log|A~ (x) B~| = q log|A~| + p log|B~| with
    each log-determinant from a Cholesky factor of the damped, symmetrised factor (no eigendecomposition),
    maximised over a dense log grid of lambda and refined by bisection on the derivative, whose trace terms
    come from Cholesky solves."""
    A = 0.5 * (published["A_img"] + published["A_img"].T)
    B = 0.5 * (published["B_img"] + published["B_img"].T)
    p, q = A.shape[0], B.shape[0]
    eye_a, eye_b = torch.eye(p, dtype=F64), torch.eye(q, dtype=F64)

    def damped(lam: float) -> tuple[torch.Tensor, torch.Tensor]:
        return math.sqrt(n) * A + math.sqrt(lam) * eye_a, math.sqrt(n) * B + math.sqrt(lam) * eye_b

    def log_evidence(lam: float) -> float:
        at, bt = damped(lam)
        logdet = q * _cholesky_logdet(at) + p * _cholesky_logdet(bt)
        return -0.5 * lam * W_IMG_SQ + 0.5 * p * q * math.log(lam) - 0.5 * logdet

    def derivative(lam: float) -> float:
        # d/dlam logdet(A~) = tr(A~^-1) / (2 sqrt(lam)); traces of inverses by Cholesky solves.
        at, bt = damped(lam)
        tr_a = float(torch.cholesky_solve(eye_a, torch.linalg.cholesky(at)).trace())
        tr_b = float(torch.cholesky_solve(eye_b, torch.linalg.cholesky(bt)).trace())
        return -0.5 * W_IMG_SQ + 0.5 * p * q / lam - 0.25 * (q * tr_a + p * tr_b) / math.sqrt(lam)

    grid = [10.0 ** (e / 20.0) for e in range(0, 121)]  # 1 .. 1e6, 20 points per decade
    values = [log_evidence(x) for x in grid]
    i = max(range(len(grid)), key=values.__getitem__)
    assert 0 < i < len(grid) - 1, "the optimum must be interior to the grid"
    lo, hi = grid[i - 1], grid[i + 1]
    assert derivative(lo) > 0 > derivative(hi)
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if derivative(mid) > 0 else (lo, mid)
    brute = math.sqrt(lo * hi)

    published_img.n = n
    lam = published_img.optimize_prior_precision("evidence", variant="exact")
    assert lam == pytest.approx(brute, rel=1e-6)
    assert published_img.log_evidence(lam) - published_img.log_evidence(brute) == pytest.approx(0.0, abs=1e-6)


def test_load_published_factors_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="A_img_analytic.pt"):
        load_published_factors(tmp_path)
    for name, size in [("A_img", 4), ("B_img", 3), ("A_txt", 5), ("B_txt", 2)]:
        torch.save(torch.eye(size), tmp_path / f"{name}_analytic.pt")
    (tmp_path / "prior_precision_analytic.json").write_text(
        json.dumps({"lambda_img": 1.0, "lambda_txt": 2.0})
    )
    with pytest.raises(ValueError, match="B_img"):
        load_published_factors(tmp_path)
    torch.save(torch.eye(3), tmp_path / "B_txt_analytic.pt")
    out = load_published_factors(tmp_path)
    assert out["lambda_txt"] == 2.0 and out["A_txt"].dtype == F64
    torch.save(torch.ones(3, 4), tmp_path / "A_txt_analytic.pt")
    with pytest.raises(ValueError, match="A_txt"):
        load_published_factors(tmp_path)
