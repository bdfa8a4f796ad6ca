"""ProbVLM-style adapters: the generalised Gaussian, the training objective and the zero-shot predictives,
each against an independent truth (torch.distributions, quadrature, the incomplete gamma function, known
noise, brute-force loops, the deterministic model)."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.nn import functional as F

from uqvlm.methods import cosine_logits
from uqvlm.probvlm import (
    BayesCapAdapter,
    ProbVLMAdapters,
    fit_probvlm,
    generalized_gaussian_nll,
    generalized_gaussian_nll_loss,
    generalized_gaussian_variance,
    pair_retrieval_nll,
    probvlm_log_probs_mc,
    probvlm_log_probs_probit,
    probvlm_moments,
    sample_generalized_gaussian,
    temp_comb_loss,
)

F64 = torch.float64
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def one_thread():
    # Training steps are tiny: two intra-op threads on a busy 2-core machine ran 10-50x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _unit(n: int, d: int, seed: int, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=F64), dim=-1).to(device)


def _gg_cdf(x: torch.Tensor, mu: float, alpha: float, beta: float) -> torch.Tensor:
    """CDF from the regularised lower incomplete gamma function: |y - mu|/alpha)^beta ~ Gamma(1/beta)."""
    r = x - mu
    tail = torch.special.gammainc(torch.tensor(1.0 / beta, dtype=F64), (r.abs() / alpha) ** beta)
    return 0.5 + 0.5 * torch.sign(r) * tail


def _adapters(dim: int, init_alpha: float, seed: int = 0, alpha_eps: float = 1e-6) -> ProbVLMAdapters:
    """Freshly initialised adapters: mu = x, alpha = init_alpha, beta = 2 for every input."""
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(hidden=16, layers=3, dropout=0.1, alpha_eps=alpha_eps, init_alpha=init_alpha, generator=g)
    return ProbVLMAdapters(image=BayesCapAdapter(dim, **kwargs), text=BayesCapAdapter(dim, **kwargs)).eval()


def _noisy_pairs(n: int = 1500, d: int = 12, noisy: int = 4, seed: int = 0):
    """Unit inputs and targets = inputs + noise: std 0.3 in the first ``noisy`` coordinates, 0.01 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    std = torch.full((d,), 0.01)
    std[:noisy] = 0.3
    return x, x + std * torch.randn(n, d, generator=g), std


# ---------------------------------------------------------------------------------- generalised Gaussian


def test_nll_reduces_to_gaussian_and_laplace():
    g = torch.Generator().manual_seed(0)
    mu, target = torch.randn(2, 50, generator=g, dtype=F64)
    alpha = 0.1 + torch.rand(50, generator=g, dtype=F64)
    two, one = torch.full_like(alpha, 2.0), torch.ones_like(alpha)
    normal = torch.distributions.Normal(mu, alpha / math.sqrt(2.0))  # variance alpha^2 / 2
    laplace = torch.distributions.Laplace(mu, alpha)
    torch.testing.assert_close(generalized_gaussian_nll(mu, alpha, two, target), -normal.log_prob(target))
    torch.testing.assert_close(generalized_gaussian_nll(mu, alpha, one, target), -laplace.log_prob(target))
    torch.testing.assert_close(
        generalized_gaussian_nll_loss(mu, alpha, two, target, reduction="sum"), -normal.log_prob(target).sum()
    )


@pytest.mark.parametrize(("alpha", "beta"), [(0.5, 0.8), (1.0, 1.5), (2.0, 4.0), (0.3, 8.0)])
def test_density_integrates_to_one(alpha, beta):
    half_width = alpha * 60.0 ** (1.0 / beta)  # exp(-60): the tails beyond are negligible
    grid = torch.linspace(-half_width, half_width, 400_001, dtype=F64) + 0.7
    nll = generalized_gaussian_nll(
        torch.tensor(0.7, dtype=F64), torch.tensor(alpha, dtype=F64), torch.tensor(beta, dtype=F64), grid
    )
    assert torch.trapezoid(torch.exp(-nll), grid).item() == pytest.approx(1.0, abs=1e-5)


def test_nll_gradient_is_finite_at_zero_residual():
    mu = torch.zeros(4, dtype=F64, requires_grad=True)
    alpha = torch.ones(4, dtype=F64, requires_grad=True)
    beta = torch.full((4,), 0.5, dtype=F64, requires_grad=True)  # pow's gradient at 0 is infinite here
    generalized_gaussian_nll(mu, alpha, beta, torch.zeros(4, dtype=F64)).sum().backward()
    for t in (mu, alpha, beta):
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize(("alpha", "beta"), [(0.7, 0.8), (1.0, 1.0), (0.5, 2.0), (2.0, 5.0)])
def test_sampler_matches_cdf_and_variance(alpha, beta):
    n = 40_000
    gen = torch.Generator().manual_seed(1)
    a, b, mu = (torch.tensor(v, dtype=F64) for v in (alpha, beta, -0.3))
    x = sample_generalized_gaussian(mu, a, b, n, gen)
    assert x.shape == (n,)
    # Kolmogorov-Smirnov distance to the CDF from the incomplete gamma function (0.1% critical value).
    xs = x.sort().values
    cdf = _gg_cdf(xs, -0.3, alpha, beta)
    ecdf_hi = torch.arange(1, n + 1, dtype=F64) / n
    ks = torch.maximum(ecdf_hi - cdf, cdf - (ecdf_hi - 1.0 / n)).max().item()
    assert ks < 1.95 / math.sqrt(n)
    # Sample variance against the closed form, within 5 standard errors (from the true 4th moment).
    var = generalized_gaussian_variance(a, b).item()
    m4 = alpha**4 * math.exp(math.lgamma(5 / beta) - math.lgamma(1 / beta))
    se = math.sqrt((m4 - var**2) / n)
    assert abs(x.var().item() - var) < 5 * se


def test_sampler_beta2_is_normal_and_broadcasts():
    gen = torch.Generator().manual_seed(2)
    mu = torch.tensor([[0.0, 1.0, -2.0]], dtype=F64)
    alpha = torch.tensor([[0.5], [2.0]], dtype=F64)  # broadcast to [2, 3]
    x = sample_generalized_gaussian(mu, alpha, torch.tensor(2.0, dtype=F64), 30_000, gen)
    assert x.shape == (30_000, 2, 3)
    normal = torch.distributions.Normal(mu.expand(2, 3), (alpha / math.sqrt(2.0)).expand(2, 3))
    xs = x.sort(dim=0).values
    ecdf = torch.arange(1, 30_001, dtype=F64)[:, None, None] / 30_000
    ks = (ecdf - normal.cdf(xs)).abs().amax(0)
    assert (ks < 1.95 / math.sqrt(30_000) + 1 / 30_000).all()


# ---------------------------------------------------------------------------------- adapter and training


def test_adapter_starts_as_a_gaussian_at_the_input():
    x = _unit(20, 8, seed=3).float()
    adapter = BayesCapAdapter(8, hidden=16, layers=4, dropout=0.5, init_alpha=0.2)
    for mode in (True, False):  # dropout cannot matter while the trunk's last layer is zero
        mu, alpha, beta = adapter.train(mode)(x)
        torch.testing.assert_close(mu, x)
        torch.testing.assert_close(alpha, torch.full_like(x, 0.2))
        torch.testing.assert_close(beta, torch.full_like(x, 2.0))


def test_training_recovers_which_coordinates_are_noisy(one_thread):
    """Regression x -> x + noise with per-coordinate std: the maximum-likelihood spread is the noise's."""
    torch.manual_seed(0)  # nothing below should depend on it: every draw has its own generator
    x, y, std = _noisy_pairs(n=1000, d=8, noisy=3)
    gen = torch.Generator().manual_seed(4)
    adapter = BayesCapAdapter(8, hidden=32, dropout=0.0, generator=gen)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        loss = temp_comb_loss(*adapter(x), y, t1=0.0, t2=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0
    with torch.no_grad():
        _, alpha, beta = adapter(x)
    spread = generalized_gaussian_variance(alpha, beta).mean(0).sqrt()
    assert spread[:3].min() > spread[3:].max()
    # and the scale is the noise's (a factor-2 band: the fit has no reason to be exact in 300 steps)
    assert ((spread / std) > 0.5).all() and ((spread / std) < 2.0).all()


def test_fit_probvlm_is_deterministic_and_learns_the_cross_modal_noise():
    image, text, _ = _noisy_pairs(n=1200, d=8, noisy=3)
    kwargs = dict(hidden=16, epochs=12, batch_size=200, lr=1e-2, cross_modal=1.0)
    adapters, history = fit_probvlm(image, text, generator=torch.Generator().manual_seed(5), **kwargs)
    again, history_again = fit_probvlm(image, text, generator=torch.Generator().manual_seed(5), **kwargs)
    assert len(history) == 12 and history[-1] < history[0]
    assert history == history_again  # on the CPU a fit is reproducible from its seed
    for a, b in zip(adapters.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Each adapter's distribution is also scored at its pair's embedding in the other tower, so the
    # coordinates where the two towers disagree (the noisy ones) get the larger spread, in both towers.
    for tower, emb in (("image", image), ("text", text)):
        _, var = probvlm_moments(adapters, emb, tower)
        spread = var.mean(0).sqrt()
        assert spread[:3].min() > spread[3:].max(), tower


def test_fit_probvlm_refuses_bad_input():
    x = _unit(10, 4, seed=0)
    with pytest.raises(ValueError, match="paired rows"):
        fit_probvlm(x, x[:9])
    with pytest.raises(ValueError, match="epochs"):
        fit_probvlm(x, x, epochs=0)
    with pytest.raises(ValueError, match="cross_modal"):
        fit_probvlm(x, x, cross_modal=-1.0)


# ---------------------------------------------------------------------------------- predictives


@pytest.mark.parametrize("logit_bias", [None, -3.0])
def test_predictives_are_distributions_and_differ_from_map_with_uncertainty(logit_bias):
    x, c = _unit(12, 6, seed=6) * 3.0, _unit(5, 6, seed=7)  # unnormalised images
    adapters = _adapters(6, init_alpha=0.4)
    map_log_probs = torch.log_softmax(cosine_logits(x, c, math.log(20.0), logit_bias), dim=-1)
    gen = torch.Generator().manual_seed(8)
    for log_probs in (
        probvlm_log_probs_probit(adapters, x, c, math.log(20.0), logit_bias),
        probvlm_log_probs_mc(adapters, x, c, math.log(20.0), logit_bias, samples=200, generator=gen),
    ):
        assert log_probs.dtype == F64 and log_probs.shape == (12, 5)
        assert torch.isfinite(log_probs).all()
        torch.testing.assert_close(log_probs.exp().sum(-1), torch.ones(12, dtype=F64))
        # uncertainty flattens the predictive: its entropy exceeds the deterministic model's
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        map_entropy = -(map_log_probs.exp() * map_log_probs).sum(-1)
        assert (entropy > map_entropy).all()


@pytest.mark.parametrize("logit_bias", [None, 1.5])
def test_predictives_reduce_to_map_without_uncertainty(logit_bias):
    x, c = _unit(10, 6, seed=9) * 2.0, _unit(4, 6, seed=10) * 0.5
    adapters = _adapters(6, init_alpha=1e-9, alpha_eps=0.0)
    expected = torch.log_softmax(cosine_logits(x, c, math.log(30.0), logit_bias), dim=-1)
    probit = probvlm_log_probs_probit(adapters, x, c, math.log(30.0), logit_bias)
    mc = probvlm_log_probs_mc(
        adapters, x, c, math.log(30.0), logit_bias, samples=3, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(probit, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(mc, expected, rtol=0, atol=1e-6)


def test_mc_predictive_matches_a_brute_force_loop():
    n, k, d, samples, scale, bias = 3, 4, 5, 40, 10.0, 0.5
    x, c = _unit(n, d, seed=11), _unit(k, d, seed=12)
    adapters = _adapters(d, init_alpha=0.3, seed=1)
    # perturb the heads so alpha and beta vary per input and coordinate
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for adapter in (adapters.image, adapters.text):
            for head in (adapter.alpha_head, adapter.beta_head):
                head[-1].weight.normal_(0.0, 0.5, generator=g)
    got = probvlm_log_probs_mc(
        adapters, x, c, math.log(scale), bias, samples=samples, generator=torch.Generator().manual_seed(14)
    )

    with torch.no_grad():
        _, a_img, b_img = (t.double() for t in adapters.image(F.normalize(x.float(), dim=-1)))
        _, a_cls, b_cls = (t.double() for t in adapters.text(F.normalize(c.float(), dim=-1)))
    assert a_img.std() > 0.01 and b_img.std() > 0.01
    gen = torch.Generator().manual_seed(14)
    probs = [[0.0] * k for _ in range(n)]
    for _ in range(samples):  # same draws, in the documented order: all images, then all classes
        g_s = sample_generalized_gaussian(x, a_img, b_img, 1, gen)[0].tolist()
        h_s = sample_generalized_gaussian(c, a_cls, b_cls, 1, gen)[0].tolist()
        for i in range(n):
            logits = []
            for j in range(k):
                dot = sum(u * v for u, v in zip(g_s[i], h_s[j], strict=True))
                norms = math.sqrt(sum(u * u for u in g_s[i])) * math.sqrt(sum(v * v for v in h_s[j]))
                logits.append(scale * dot / norms + bias)
            top = max(logits)
            z = sum(math.exp(v - top) for v in logits)
            for j in range(k):
                probs[i][j] += math.exp(logits[j] - top) / z / samples
    torch.testing.assert_close(got, torch.tensor(probs, dtype=F64).log(), rtol=1e-10, atol=1e-12)


def test_moments_center_and_variance():
    x = _unit(7, 6, seed=15) * 4.0
    adapters = _adapters(6, init_alpha=0.25)
    mean, var = probvlm_moments(adapters, x, "image")
    torch.testing.assert_close(mean, F.normalize(x, dim=-1))
    torch.testing.assert_close(var, torch.full_like(x, 0.25**2 / 2))  # beta = 2: Gaussian, alpha^2 / 2
    with torch.no_grad():  # move mu away from x: center="adapter" must follow it, "frozen" must not
        adapters.image.mu_head[-1].bias.fill_(0.1)
    adapter_mean, _ = probvlm_moments(adapters, x, "image", center="adapter")
    torch.testing.assert_close(adapter_mean, F.normalize(x, dim=-1) + 0.1)
    torch.testing.assert_close(probvlm_moments(adapters, x, "image")[0], mean)
    with pytest.raises(ValueError, match="center"):
        probvlm_moments(adapters, x, "image", center="mu")


# ---------------------------------------------------------------------------------- caching and devices


def test_state_dict_round_trip_gives_identical_outputs():
    image, text, _ = _noisy_pairs(n=400, d=6, noisy=2)
    adapters, _ = fit_probvlm(image, text, hidden=8, epochs=2, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    torch.save(adapters.state_dict(), buffer)
    buffer.seek(0)
    restored = ProbVLMAdapters.from_state_dict(torch.load(buffer, weights_only=True))
    x, c = _unit(9, 6, seed=16), _unit(3, 6, seed=17)
    for fn in (probvlm_log_probs_probit, probvlm_log_probs_mc):
        kw = {} if fn is probvlm_log_probs_probit else {"generator": torch.Generator().manual_seed(3)}
        a = fn(adapters, x, c, 2.0, **kw)
        kw = {} if fn is probvlm_log_probs_probit else {"generator": torch.Generator().manual_seed(3)}
        b = fn(restored, x, c, 2.0, **kw)
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    bad = adapters.state_dict()
    bad["text"]["trunk.0.weight"] = bad["text"]["trunk.0.weight"][:, :5]
    with pytest.raises(ValueError, match=r"trunk\.0\.weight.*shape"):
        ProbVLMAdapters.from_state_dict(bad)
    with pytest.raises(ValueError, match="version"):
        ProbVLMAdapters.from_state_dict({**adapters.state_dict(), "version": 0})


@pytest.mark.parametrize("device", DEVICES)
def test_tensors_follow_the_inputs(device):
    image, text, _ = _noisy_pairs(n=300, d=6, noisy=2)
    adapters, _ = fit_probvlm(
        image.to(device), text.to(device), hidden=8, epochs=1, generator=torch.Generator().manual_seed(0)
    )
    assert adapters.device.type == device
    x, c = _unit(5, 6, seed=18, device=device), _unit(3, 6, seed=19, device=device)
    mean, var = probvlm_moments(adapters, x, "image")
    assert mean.device.type == device and var.device.type == device
    probit = probvlm_log_probs_probit(adapters, x, c, 1.0)
    mc = probvlm_log_probs_mc(
        adapters, x, c, 1.0, samples=5, generator=torch.Generator(device).manual_seed(0)
    )
    assert probit.device.type == device and mc.device.type == device
    # the same adapters on the CPU give the same probit predictive
    cpu = ProbVLMAdapters.from_state_dict(adapters.state_dict())
    torch.testing.assert_close(probit.cpu(), probvlm_log_probs_probit(cpu, x.cpu(), c.cpu(), 1.0))


# ---------------------------------------------------------------------------------- the zero-shot method


def test_pair_retrieval_nll_matches_a_brute_force_loop():
    gen = torch.Generator().manual_seed(20)
    image = torch.randn(8, 5, generator=gen, dtype=F64)
    text = torch.randn(8, 5, generator=gen, dtype=F64)
    text[2] = text[0] * 3.0  # the same caption twice in the first batch (one unit embedding)
    text[7] = text[6]  # ... and in the last
    scale = math.log(7.0)

    def log_probs(x, c):
        return torch.log_softmax(cosine_logits(x, c, scale, None), dim=-1)

    got = pair_retrieval_nll(log_probs, image, text, batch=3)
    total = 0.0
    for start in (0, 3, 6):  # batches of 3, 3 and 2 pairs
        rows = range(start, min(8, start + 3))
        for i in rows:
            logits = {j: math.exp(scale) * float(F.cosine_similarity(image[i], text[j], dim=0)) for j in rows}
            z = sum(math.exp(v) for v in logits.values())
            same = [j for j in rows if float(F.cosine_similarity(text[i], text[j], dim=0)) > 1 - 1e-9]
            total -= math.log(sum(math.exp(logits[j]) for j in same) / z)
    assert got == pytest.approx(total / 8, rel=1e-12)
    with pytest.raises(ValueError, match="batch"):
        pair_retrieval_nll(log_probs, image, text, batch=1)


class _FakePairs:
    """PairAdapters whose fit for weight w is fresh adapters with alpha = w (a known spread)."""

    def __init__(self, dim: int, image: torch.Tensor, text: torch.Tensor):
        self.dim, self.image, self.text = dim, image, text
        self.calls: list[tuple[float, str]] = []

    def fit(self, cross_modal, subset):
        self.calls.append((cross_modal, subset))
        return _adapters(self.dim, init_alpha=cross_modal, alpha_eps=0.0)

    def heldout(self):
        return self.image, self.text


def _zeroshot_ctx(pairs: _FakePairs, scale: float, bias: float | None):
    from uqvlm.features import Features
    from uqvlm.methods import ZeroShotContext

    gen = torch.Generator().manual_seed(21)
    classes = torch.randn(4, pairs.dim, generator=gen, dtype=F64)
    images = classes[torch.arange(30) % 4] + 1.2 * torch.randn(30, pairs.dim, generator=gen, dtype=F64)
    labels = torch.arange(30) % 4

    def unused(*_):
        raise AssertionError("ProbVLM needs no posteriors or views")

    return ZeroShotContext(
        logit_scale=scale,
        logit_bias=bias,
        image=Features(images, images),
        labels=labels,
        text=Features(classes, classes),
        posterior=None,
        validation_provider=lambda: (Features(images[:20], images[:20]), labels[:20]),
        views_provider=unused,
        posterior_provider=unused,
        probvlm_provider=lambda fit: pairs,
    )


@pytest.mark.parametrize("predictive", ["mc", "probit"])
@pytest.mark.parametrize("select", ["pairs", "val"])
def test_probvlm_method_keeps_the_weight_with_the_lowest_criterion(predictive, select):
    from uqvlm.methods import ProbVLM
    from uqvlm.metrics import negative_log_likelihood
    from uqvlm.tasks.zeroshot import label_use

    d, scale, bias = 6, math.log(15.0), (None if predictive == "mc" else -1.0)
    image, text, _ = _noisy_pairs(n=40, d=d, noisy=3)
    pairs = _FakePairs(d, image.double(), text.double())
    ctx = _zeroshot_ctx(pairs, scale, bias)
    grid = [1e-3, 0.05, 0.3, 1.5]
    method = ProbVLM(predictive=predictive, samples=30, cross_modal=grid, select=select, retrieval_batch=8)
    got = method.predict_log_probs(ctx)

    def predictive_of(weight, x, c):
        adapters = _adapters(d, init_alpha=weight, alpha_eps=0.0)
        if predictive == "probit":
            return probvlm_log_probs_probit(adapters, x, c, scale, bias)
        return probvlm_log_probs_mc(
            adapters, x, c, scale, bias, samples=30, generator=torch.Generator().manual_seed(0)
        )

    if select == "pairs":
        scores = [
            pair_retrieval_nll(lambda x, c, w=w: predictive_of(w, x, c), pairs.image, pairs.text, batch=8)
            for w in grid
        ]
    else:
        val, val_labels = ctx.validation
        scores = [
            float(negative_log_likelihood(predictive_of(w, val.embeddings, ctx.text.embeddings), val_labels))
            for w in grid
        ]
    best = grid[scores.index(min(scores))]
    assert len(set(scores)) == len(scores)  # the criterion tells the weights apart
    note = ctx.notes[f"probvlm/{predictive}/{select}"]
    assert note["cross_modal"] == best
    assert [note["scores"][str(w)] for w in grid] == pytest.approx(scores, rel=1e-12)
    # the prediction is the chosen weight's, refitted on all pairs, and a distribution over the classes
    assert pairs.calls[-1] == (best, "all")
    assert {s for _, s in pairs.calls[:-1]} == {"train" if select == "pairs" else "all"}
    torch.testing.assert_close(got, predictive_of(best, ctx.image.embeddings, ctx.text.embeddings))
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(30, dtype=F64))
    # only the validation criterion uses labels of the evaluated dataset
    assert method.uses_labels == (select == "val")
    assert (label_use(None, method) is not None) == (select == "val")


def test_probvlm_method_with_vanishing_uncertainty_is_map():
    from uqvlm.methods import MAP, ProbVLM

    image, text, _ = _noisy_pairs(n=20, d=6, noisy=2)
    ctx = _zeroshot_ctx(_FakePairs(6, image, text), math.log(25.0), None)
    expected = MAP().predict_log_probs(ctx)
    for predictive in ("mc", "probit"):
        got = ProbVLM(predictive=predictive, samples=4, cross_modal=1e-9).predict_log_probs(ctx)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert ctx.notes["probvlm/mc/pairs"]["criterion"] == "fixed"


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"cross_modal": []}, "cross_modal"),
        ({"cross_modal": [1e-4, -1.0]}, "cross_modal"),
        ({"select": "labels"}, "select"),
        ({"holdout": 1.0}, "holdout"),
        ({"predictive": "exact"}, "predictive"),
    ],
)
def test_probvlm_method_refuses_bad_settings(bad, match):
    from uqvlm.methods import ProbVLM

    with pytest.raises(ValueError, match=match):
        ProbVLM(**bad)


def test_probvlm_trains_on_task_pairs_when_the_hessian_data_has_none(settings_of):
    from uqvlm.data.sections import PublishedFactorsSettings
    from uqvlm.tasks.zeroshot import pair_data, selected_methods

    # A paper model's default Hessian data are the published factors: no pairs, so ProbVLM's rows drop ...
    published = settings_of("dataset=food101")
    assert isinstance(published.hessian_data, PublishedFactorsSettings)
    assert not {"probvlm", "probvlm-probit"} & set(selected_methods(published))
    # ... unless task.pairs names pair data, which they then train on (the posteriors keep the factors).
    with_pairs = settings_of(
        "dataset=food101", "hessian_data@task.pairs=laion400m", "task.pairs.root=/data/x"
    )
    assert isinstance(with_pairs.hessian_data, PublishedFactorsSettings)
    assert pair_data(with_pairs).name == "laion400m" and pair_data(with_pairs).section["root"] == "/data/x"
    assert {"probvlm", "probvlm-probit"} <= set(selected_methods(with_pairs))
    # The shapes world: task.pairs, when set, wins over the run's own pairs.
    assert pair_data(settings_of()).name == "shapes"
    assert pair_data(settings_of("hessian_data@task.pairs=shapes-proxy")).name == "shapes-proxy"
