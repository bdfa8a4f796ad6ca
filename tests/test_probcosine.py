"""ProbCosine and the Gaussian-logit predictives against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

from uqvlm.probcosine import (
    mc_log_probs,
    mc_probs,
    probcosine,
    probcosine_logits,
    probit_log_probs,
    probit_probs,
)

F64 = torch.float64


def _inputs(n: int, k: int, d: int, var_scale: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img_mean = torch.randn(n, d, generator=g, dtype=F64)
    txt_mean = torch.randn(k, d, generator=g, dtype=F64)
    img_var = var_scale * torch.rand(n, d, generator=g, dtype=F64)
    txt_var = var_scale * torch.rand(k, d, generator=g, dtype=F64)
    return img_mean, img_var, txt_mean, txt_var


def _loop_closed_form(img_mean, img_var, txt_mean, txt_var):
    """Section 5 written out per pair and per coordinate, with no matmul."""
    n, d = img_mean.shape
    k = txt_mean.shape[0]
    mean = torch.empty(n, k, dtype=F64)
    var = torch.empty(n, k, dtype=F64)
    for i in range(n):
        for j in range(k):
            s_g = sum(float(img_mean[i, c] ** 2 + img_var[i, c]) for c in range(d))
            s_h = sum(float(txt_mean[j, c] ** 2 + txt_var[j, c]) for c in range(d))
            dot = sum(float(img_mean[i, c] * txt_mean[j, c]) for c in range(d))
            num = sum(
                float(
                    (img_mean[i, c] ** 2 + img_var[i, c]) * txt_var[j, c]
                    + img_var[i, c] * txt_mean[j, c] ** 2
                )
                for c in range(d)
            )
            mean[i, j] = dot / math.sqrt(s_g * s_h)
            var[i, j] = num / (s_g * s_h)
    return mean, var


def test_probcosine_matches_explicit_loop():
    args = _inputs(3, 4, 5, var_scale=0.5)
    mean, var = probcosine(*args)
    ref_mean, ref_var = _loop_closed_form(*args)
    assert mean.shape == (3, 4) and var.shape == (3, 4)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-14)


def test_probcosine_zero_variance_is_cosine():
    img_mean, _, txt_mean, _ = _inputs(4, 3, 6, var_scale=0.0)
    mean, var = probcosine(img_mean, torch.zeros_like(img_mean), txt_mean, torch.zeros_like(txt_mean))
    cos = torch.nn.functional.normalize(img_mean, dim=1) @ torch.nn.functional.normalize(txt_mean, dim=1).T
    torch.testing.assert_close(mean, cos, rtol=1e-12, atol=1e-14)
    assert torch.all(var == 0)


def _sample(img_mean, img_var, txt_mean, txt_var, samples: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    gs = img_mean + img_var.sqrt() * torch.randn(samples, *img_mean.shape, generator=g, dtype=F64)
    hs = txt_mean + txt_var.sqrt() * torch.randn(samples, *txt_mean.shape, generator=g, dtype=F64)
    return gs, hs


def _within_se(samples: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, k: float = 5.0) -> None:
    """Sample mean and sample variance of [S, N, K] within k standard errors of (mean, var)."""
    s = samples.shape[0]
    m_hat = samples.mean(0)
    v_hat = samples.var(0)
    se_m = (v_hat / s).sqrt()
    # SE of the sample variance from the fourth central moment.
    mu4 = ((samples - m_hat) ** 4).mean(0)
    se_v = ((mu4 - v_hat**2) / s).sqrt()
    assert torch.all((m_hat - mean).abs() <= k * se_m), ((m_hat - mean) / se_m).abs().max()
    assert torch.all((v_hat - var).abs() <= k * se_v), ((v_hat - var) / se_v).abs().max()


def test_probcosine_moments_are_exact_for_rms_normalised_dot():
    # The closed form is the exact mean/variance of g.h / sqrt(S_g S_h) for any variance.
    img_mean, img_var, txt_mean, txt_var = _inputs(2, 3, 4, var_scale=0.8, seed=1)
    mean, var = probcosine(img_mean, img_var, txt_mean, txt_var)
    gs, hs = _sample(img_mean, img_var, txt_mean, txt_var, 100_000, seed=2)
    s_g = (img_mean**2 + img_var).sum(1)
    s_h = (txt_mean**2 + txt_var).sum(1)
    x = torch.einsum("snd,skd->snk", gs, hs) / (s_g[:, None] * s_h[None, :]).sqrt()
    _within_se(x, mean, var)


def test_probcosine_close_to_sampled_cosines_for_small_variance():
    img_mean, img_var, txt_mean, txt_var = _inputs(2, 3, 6, var_scale=1e-5, seed=3)
    mean, var = probcosine(img_mean, img_var, txt_mean, txt_var)
    gs, hs = _sample(img_mean, img_var, txt_mean, txt_var, 100_000, seed=4)
    cos = torch.nn.functional.normalize(gs, dim=-1) @ torch.nn.functional.normalize(hs, dim=-1).transpose(
        1, 2
    )
    se = (cos.var(0) / cos.shape[0]).sqrt()
    assert torch.all((cos.mean(0) - mean).abs() <= 5 * se)
    # The variance ignores that normalisation removes radial noise: it is the cosine's variance only for
    # orthogonal means (next test); here it is merely of the same size.
    ratio = var / cos.var(0)
    assert torch.all((ratio > 0.5) & (ratio < 2.0))


def test_probcosine_variance_matches_sampled_cosines_for_orthogonal_means():
    g = torch.Generator().manual_seed(5)
    d = 6
    img_mean = torch.zeros(2, d, dtype=F64)
    txt_mean = torch.zeros(3, d, dtype=F64)
    img_mean[:, :3] = torch.randn(2, 3, generator=g, dtype=F64)
    txt_mean[:, 3:] = torch.randn(3, 3, generator=g, dtype=F64)
    img_var = 1e-4 * torch.rand(2, d, generator=g, dtype=F64)
    txt_var = 1e-4 * torch.rand(3, d, generator=g, dtype=F64)
    mean, var = probcosine(img_mean, img_var, txt_mean, txt_var)
    gs, hs = _sample(img_mean, img_var, txt_mean, txt_var, 100_000, seed=6)
    cos = torch.nn.functional.normalize(gs, dim=-1) @ torch.nn.functional.normalize(hs, dim=-1).transpose(
        1, 2
    )
    _within_se(cos, mean, var)


def test_probcosine_logits_scale_and_bias():
    args = _inputs(2, 3, 4, var_scale=0.3)
    mean, var = probcosine(*args)
    lm, lv = probcosine_logits(*args, logit_scale=math.log(10.0), logit_bias=-2.0)
    torch.testing.assert_close(lm, 10.0 * mean - 2.0)
    torch.testing.assert_close(lv, 100.0 * var)


def test_probcosine_float32_and_shapes():
    args = [t.float() for t in _inputs(5, 7, 8, var_scale=0.1)]
    mean, var = probcosine(*args)
    assert mean.dtype == torch.float32 and mean.shape == (5, 7)
    ref_mean, ref_var = probcosine(*[t.double() for t in args])
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "which, bad, name",
    [
        (1, lambda t: -t, "img_var"),
        (3, lambda t: -t, "txt_var"),
        (0, lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), "img_mean"),
        (2, lambda t: t.index_fill(0, torch.tensor([0]), float("inf")), "txt_mean"),
        (1, lambda t: t[:, :-1], "img_var"),
        (2, lambda t: t[:, :-1], "txt_mean"),
        (3, lambda t: t[0], "txt_var"),
    ],
)
def test_probcosine_rejects_bad_input(which, bad, name):
    args = list(_inputs(2, 3, 4, var_scale=0.1))
    args[which] = bad(args[which])
    with pytest.raises(ValueError, match=name):
        probcosine(*args)


# ------------------------------------------------------------------------------------ predictives
def _two_class_exact(m: torch.Tensor, v: torch.Tensor) -> float:
    """E[softmax(l)_0] for two independent Gaussian logits: E[sigmoid(x)], x = l0 - l1, by quadrature."""
    mu = float(m[0] - m[1])
    sd = math.sqrt(float(v[0] + v[1]))
    x = torch.linspace(mu - 12 * sd, mu + 12 * sd, 400_001, dtype=F64)
    pdf = torch.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * math.sqrt(2 * math.pi))
    return float(torch.trapezoid(torch.sigmoid(x) * pdf, x))


def test_mc_probs_converges_to_gaussian_softmax_expectation():
    m = torch.tensor([[0.7, -0.4]], dtype=F64)
    v = torch.tensor([[2.0, 1.5]], dtype=F64)
    exact = _two_class_exact(m[0], v[0])
    samples = 2_000_000
    g = torch.Generator().manual_seed(0)
    p = mc_probs(m, v, samples=samples, generator=g, max_elements=1 << 20)
    assert p.shape == (1, 2)
    torch.testing.assert_close(p.sum(-1), torch.ones(1, dtype=F64))
    # SE of a mean of sigmoids is at most 0.5 / sqrt(S).
    assert abs(float(p[0, 0]) - exact) < 5 * 0.5 / math.sqrt(samples)
    # The probit approximation is close but not exact.
    pr = probit_probs(m, v)
    assert abs(float(pr[0, 0]) - exact) < 0.05


def test_mc_probs_deterministic_with_generator_and_zero_variance():
    m = torch.randn(4, 5, dtype=F64)
    v = torch.rand(4, 5, dtype=F64)
    a = mc_probs(m, v, samples=300, generator=torch.Generator().manual_seed(1))
    b = mc_probs(m, v, samples=300, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    z = mc_probs(m, torch.zeros_like(v), samples=7)
    torch.testing.assert_close(z, torch.softmax(m, -1))


def test_probit_sanity():
    m = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], dtype=F64)
    torch.testing.assert_close(probit_probs(m, torch.zeros_like(m)), torch.softmax(m, -1))
    v = torch.full_like(m, 4.0)
    p = probit_probs(m, v)
    torch.testing.assert_close(p, torch.softmax(m / math.sqrt(1 + math.pi / 8 * 4.0), -1))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, dtype=F64))
    # Equal variance keeps the ranking and moves towards uniform; huge variance gives uniform.
    assert torch.equal(p.argmax(-1), m.argmax(-1))
    assert torch.all(p.max(-1).values < torch.softmax(m, -1).max(-1).values)
    torch.testing.assert_close(
        probit_probs(m, torch.full_like(m, 1e12)), torch.full_like(m, 1 / 3), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "fn",
    [
        probit_probs,
        probit_log_probs,
        lambda m, v: mc_probs(m, v, samples=4),
        lambda m, v: mc_log_probs(m, v, samples=4),
    ],
)
def test_predictives_reject_bad_input(fn):
    m = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="var_logits"):
        fn(m, -torch.ones(2, 3))
    with pytest.raises(ValueError, match="var_logits"):
        fn(m, torch.ones(2, 4))
    with pytest.raises(ValueError, match="mean_logits"):
        fn(torch.full((2, 3), float("nan")), torch.ones(2, 3))
    with pytest.raises(ValueError, match="var_logits"):
        fn(m, torch.full((2, 3), float("inf")))


def test_mc_log_probs_are_the_log_of_an_independent_monte_carlo_average():
    g = torch.Generator().manual_seed(5)
    m = 3 * torch.randn(4, 6, generator=g, dtype=F64)
    v = torch.rand(4, 6, generator=g, dtype=F64)
    samples = 500
    # The same normal draws, averaged in probability space and logged at the end.
    eps = torch.randn((samples, 4, 6), generator=torch.Generator().manual_seed(9), dtype=F64)
    expected = torch.softmax(m + v.sqrt() * eps, -1).mean(0).log()
    got = mc_log_probs(m, v, samples=samples, generator=torch.Generator().manual_seed(9))
    assert got.dtype == F64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # In chunks (several log-space partial sums): the log of mc_probs with the same chunks and draws.
    chunked = mc_log_probs(
        m, v, samples=samples, generator=torch.Generator().manual_seed(2), max_elements=100
    )
    reference = mc_probs(m, v, samples=samples, generator=torch.Generator().manual_seed(2), max_elements=100)
    torch.testing.assert_close(chunked, reference.log(), rtol=1e-12, atol=1e-12)


def test_log_predictives_stay_finite_where_probabilities_underflow():
    # A class 2000 logits behind: p = e^-2000 underflows to 0 in float64, its log is exact in log space.
    m = torch.tensor([[0.0, -2000.0, -1.0]], dtype=F64)
    zero = torch.zeros_like(m)
    expected = m.log_softmax(-1)
    assert mc_probs(m, zero, samples=3)[0, 1] == 0
    torch.testing.assert_close(mc_log_probs(m, zero, samples=3), expected, rtol=1e-14, atol=1e-14)
    v = torch.tensor([[1.0, 4.0, 0.0]], dtype=F64)
    scaled = m / torch.sqrt(1 + math.pi / 8 * v)
    assert probit_probs(m, v)[0, 1] == 0
    torch.testing.assert_close(probit_log_probs(m, v), scaled.log_softmax(-1), rtol=1e-14, atol=1e-14)
    assert torch.isfinite(probit_log_probs(m, v)).all()


def test_probit_log_probs_are_the_log_of_probit_probs():
    g = torch.Generator().manual_seed(6)
    m, v = 5 * torch.randn(7, 4, generator=g, dtype=F64), 3 * torch.rand(7, 4, generator=g, dtype=F64)
    torch.testing.assert_close(probit_log_probs(m, v), probit_probs(m, v).log(), rtol=1e-12, atol=1e-12)


def test_mc_probs_rejects_bad_samples():
    for fn in (mc_probs, mc_log_probs):
        with pytest.raises(ValueError, match="samples"):
            fn(torch.zeros(1, 2), torch.zeros(1, 2), samples=0)


def test_rank1_probcosine_equals_full_variance_form():
    from uqvlm.probcosine import probcosine, probcosine_rank1

    g = torch.Generator().manual_seed(3)
    mg, mh = (
        torch.randn(7, 5, generator=g, dtype=torch.float64),
        torch.randn(4, 5, generator=g, dtype=torch.float64),
    )
    c, b = torch.rand(7, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)
    e, f = torch.rand(4, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)
    full = probcosine(mg, c[:, None] * b[None, :], mh, e[:, None] * f[None, :])
    fast = probcosine_rank1(mg, c, b, mh, e, f)
    for x, y in zip(full, fast, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="img_scale"):
        probcosine_rank1(mg, -c, b, mh, e, f)
    with pytest.raises(ValueError, match="txt_dir"):
        probcosine_rank1(mg, c, b, mh, e, f[:3])


def test_kfac_variance_factors_reproduce_embedding_variance():
    from uqvlm.laplace import KFACPosterior

    g = torch.Generator().manual_seed(4)
    a_fac = torch.randn(6, 6, generator=g, dtype=torch.float64)
    b_fac = torch.randn(3, 3, generator=g, dtype=torch.float64)
    post = KFACPosterior.from_factors(
        a_fac @ a_fac.T,
        b_fac @ b_fac.T,
        weight=torch.randn(3, 5, generator=g),
        bias=torch.randn(3, generator=g),
    )
    post.n, post.prior_precision = 3.0, 2.0
    acts = torch.randn(9, 5, generator=g, dtype=torch.float64)
    quad, b_diag = post.variance_factors(acts)
    torch.testing.assert_close(
        quad[:, None] * b_diag[None, :], post.embedding_variance(acts), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize(
    ("n", "chunk_rows", "matmul_rows"), [(7, 3, 4096), (7, 2, 3), (7, 128, 4), (1, 1, 1), (0, 4, 8)]
)
@pytest.mark.parametrize("bias", [None, -2.5])
def test_fused_rank1_probit_equals_probit_of_the_full_variance_moments(
    n, chunk_rows, matmul_rows, bias, monkeypatch
):
    """The fused KFAC predictive against the unfused closed form with explicit [N, D] variances, over
    row blocks and chunks of every alignment."""
    from uqvlm import probcosine as pc
    from uqvlm.probcosine import probcosine_logits, probit_log_probs, probit_log_probs_rank1

    monkeypatch.setattr(pc, "_MATMUL_ROWS", matmul_rows)

    g = torch.Generator().manual_seed(5)
    mg = 3 * torch.randn(n, 6, generator=g, dtype=torch.float64)
    mh = torch.randn(4, 6, generator=g, dtype=torch.float64)
    c, b = (
        5 * torch.rand(n, generator=g, dtype=torch.float64),
        torch.rand(6, generator=g, dtype=torch.float64),
    )
    e, f = torch.rand(4, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64)
    log_scale = math.log(30.0)
    mean, var = probcosine_logits(mg, c[:, None] * b[None, :], mh, e[:, None] * f[None, :], log_scale, bias)
    want = probit_log_probs(mean, var)
    inputs = [t.clone() for t in (mg, c, b, mh, e, f)]
    got = probit_log_probs_rank1(mg, c, b, mh, e, f, log_scale, bias, chunk_rows=chunk_rows)
    assert got.shape == (n, 4) and got.dtype == torch.float64
    for before, after in zip(inputs, (mg, c, b, mh, e, f), strict=True):  # the caller's tensors untouched
        assert torch.equal(before, after)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="txt_scale"):
        probit_log_probs_rank1(mg, c, b, mh, -e - 1, f, log_scale)
    with pytest.raises(ValueError, match="chunk_rows"):
        probit_log_probs_rank1(mg, c, b, mh, e, f, log_scale, chunk_rows=0)


@pytest.mark.parametrize(
    ("values", "finite"),
    [
        ([1.0, -2.0, 3.0], True),
        ([1e308, 1e308], True),  # the sum overflows, the entries are finite
        ([float("nan"), 1.0], False),
        ([float("inf"), float("-inf")], False),  # the sum is NaN
        ([float("-inf")], False),
        ([], True),
    ],
)
def test_all_finite_agrees_with_isfinite_entry_by_entry(values, finite):
    from uqvlm.validation import all_finite

    x = torch.tensor(values, dtype=torch.float64)
    assert all_finite(x) == bool(torch.isfinite(x).all()) == finite
    big = torch.full((4,), 3e38, dtype=torch.float32)  # float32 entries whose float32 sum would overflow
    assert all_finite(big)
