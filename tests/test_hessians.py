"""Tests of uqvlm.laplace.hessians (and the likelihood objects that bind them) against an independent
autograd GGN (torch.func)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.func import hessian, jacrev

from uqvlm.laplace.hessians import (
    infonce_hessian,
    infonce_hessian_diagonals,
    naive_infonce_hessian,
    siglip_hessian,
    siglip_hessian_diagonals,
)
from uqvlm.laplace.likelihoods import (
    LIKELIHOODS,
    InfoNCE,
    SigLIP,
    likelihood_for,
    likelihood_from_state,
)

F64 = torch.float64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def autograd_ggns(
    source: torch.Tensor,
    target: torch.Tensor,
    logit_scale: float,
    logit_bias: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Per-source GGNs [B, D, D] = J_f^T H_ll J_f, J_f = d logits / d z, H_ll = Hessian of the loss in logits.

    Random labels are drawn on purpose: the GGN must not depend on them. InfoNCE: -log softmax(l)[label];
    SigLIP (logit_bias given): sum_j -log sigmoid(label_j l_j) with labels in {+1, -1}.
    """
    gen = torch.Generator().manual_seed(seed)
    source, target = source.to(F64), target.to(F64)
    scale = math.exp(logit_scale)
    y = target / torch.linalg.vector_norm(target, dim=1, keepdim=True)

    def logits(z: torch.Tensor) -> torch.Tensor:
        out = scale * (y @ (z / torch.linalg.vector_norm(z)))
        return out if logit_bias is None else out + logit_bias

    ggns = []
    for z in source:
        if logit_bias is None:
            label = int(torch.randint(target.shape[0], (1,), generator=gen))

            def loss(lg: torch.Tensor, label: int = label) -> torch.Tensor:
                return -torch.log_softmax(lg, dim=0)[label]

        else:
            signs = torch.randint(0, 2, (target.shape[0],), generator=gen).to(F64) * 2 - 1

            def loss(lg: torch.Tensor, signs: torch.Tensor = signs) -> torch.Tensor:
                return -torch.nn.functional.logsigmoid(signs * lg).sum()

        jac = jacrev(logits)(z)  # [C, D]
        h_ll = hessian(loss)(logits(z))  # [C, C]
        ggns.append(jac.T @ h_ll @ jac)
    return torch.stack(ggns)


def make_inputs(seed: int, n_src: int, n_tgt: int, dim: int, dtype: torch.dtype = F64):
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(n_src, dim, generator=gen, dtype=dtype) * (
        0.5 + 3 * torch.rand(n_src, 1, generator=gen)
    )
    target = torch.randn(n_tgt, dim, generator=gen, dtype=dtype) * (
        0.5 + 2 * torch.rand(n_tgt, 1, generator=gen)
    )
    # log scale around log(100) (CLIP) and log(10) (SigLIP), jittered per seed
    jitter = float(torch.rand((), generator=gen)) - 0.5
    return source, target, jitter


# --------------------------------------------------------------------------------------------------------
# exactness against autograd
# --------------------------------------------------------------------------------------------------------

CASES = [(0, 7, 11, 6), (1, 13, 5, 8), (2, 4, 17, 5)]  # seed, B, C, D (B != C)


@pytest.mark.parametrize("seed,n_src,n_tgt,dim", CASES)
@pytest.mark.parametrize("base_scale", [math.log(100.0), math.log(10.0)])
def test_infonce_matches_autograd(seed, n_src, n_tgt, dim, base_scale):
    source, target, jitter = make_inputs(seed, n_src, n_tgt, dim)
    ls = base_scale + jitter
    truth = autograd_ggns(source, target, ls, seed=seed)
    assert rel_err(infonce_hessian(source, target, ls), truth.sum(0)) <= 1e-10
    assert rel_err(naive_infonce_hessian(source, target, ls), truth.sum(0)) <= 1e-10
    diag = infonce_hessian_diagonals(source, target, ls)
    assert rel_err(diag, torch.diagonal(truth, dim1=1, dim2=2)) <= 1e-10


@pytest.mark.parametrize("seed,n_src,n_tgt,dim", CASES)
@pytest.mark.parametrize("base_scale", [math.log(100.0), math.log(10.0)])
@pytest.mark.parametrize("bias", [-10.0, "random"])
def test_siglip_matches_autograd(seed, n_src, n_tgt, dim, base_scale, bias):
    source, target, jitter = make_inputs(seed, n_src, n_tgt, dim)
    ls = base_scale + jitter
    if bias == "random":
        bias = float(torch.randn((), generator=torch.Generator().manual_seed(seed + 100)) * 5)
    truth = autograd_ggns(source, target, ls, logit_bias=bias, seed=seed)
    assert rel_err(siglip_hessian(source, target, ls, bias), truth.sum(0)) <= 1e-10
    diag = siglip_hessian_diagonals(source, target, ls, bias)
    assert rel_err(diag, torch.diagonal(truth, dim1=1, dim2=2)) <= 1e-10


def mp_infonce_ggn_sum(source: torch.Tensor, target: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """sum_b J_f^T (diag(p) - p p^T) J_f in 50-digit arithmetic (float64 autograd loses 1 - p_max)."""
    mp = pytest.importorskip("mpmath").mp
    mp.dps = 50
    scale = mp.exp(mp.mpf(logit_scale))
    ys = []
    for t in target.tolist():
        norm = mp.sqrt(mp.fsum(mp.mpf(x) ** 2 for x in t))
        ys.append([mp.mpf(x) / norm for x in t])
    dim = source.shape[1]
    total = mp.zeros(dim, dim)
    for z in source.tolist():
        r = mp.sqrt(mp.fsum(mp.mpf(x) ** 2 for x in z))
        u = [mp.mpf(x) / r for x in z]
        cos = [mp.fsum(a * b for a, b in zip(u, y, strict=True)) for y in ys]
        lmax = max(cos)
        ex = [mp.exp(scale * (c - lmax)) for c in cos]
        p = [e / mp.fsum(ex) for e in ex]
        jac = mp.matrix(
            [[scale * (y[d] - c * u[d]) / r for d in range(dim)] for y, c in zip(ys, cos, strict=True)]
        )
        h_ll = mp.diag(p) - mp.matrix(p) * mp.matrix(p).T
        total += jac.T * h_ll * jac
    return torch.tensor([[float(total[i, j]) for j in range(dim)] for i in range(dim)], dtype=F64)


def test_nearly_one_hot_softmax_matches_high_precision():
    # each source almost equals one target: p_max = 1 - O(1e-13), the GGN is tiny, and the raw form
    # sum_c p_c y_c y_c^T - m m^T (and float64 autograd) would lose most digits to cancellation
    source, target, _ = make_inputs(3, 6, 9, 7)
    source = target[:6] * 2.0 + 0.05 * source
    truth = mp_infonce_ggn_sum(source, target, math.log(100.0))
    assert rel_err(infonce_hessian(source, target, math.log(100.0)), truth) <= 1e-10


def test_outputs_symmetric_psd_float64():
    source, target, _ = make_inputs(4, 20, 30, 9)
    for h in (infonce_hessian(source, target, 3.0), siglip_hessian(source, target, 2.0, -3.0)):
        assert h.dtype == F64 and h.shape == (9, 9)
        assert torch.equal(h, h.T)
        assert float(torch.linalg.eigvalsh(h).min()) >= -1e-12 * float(torch.linalg.eigvalsh(h).max())
    for d in (
        infonce_hessian_diagonals(source, target, 3.0),
        siglip_hessian_diagonals(source, target, 2.0, -3.0),
    ):
        assert d.dtype == F64 and d.shape == (20, 9)
        assert float(d.min()) >= 0


# --------------------------------------------------------------------------------------------------------
# chunking, dtypes, scalar types, the naive reference
# --------------------------------------------------------------------------------------------------------

FUNCS = {
    "infonce": lambda s, t, **kw: infonce_hessian(s, t, 4.2, **kw),
    "siglip": lambda s, t, **kw: siglip_hessian(s, t, 2.5, -4.0, **kw),
    "infonce_diag": lambda s, t, **kw: infonce_hessian_diagonals(s, t, 4.2, **kw),
    "siglip_diag": lambda s, t, **kw: siglip_hessian_diagonals(s, t, 2.5, -4.0, **kw),
}


@pytest.mark.parametrize("name", FUNCS)
@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_chunked_equals_unchunked(name, chunk_size):
    source, target, _ = make_inputs(5, 23, 31, 10)
    whole = FUNCS[name](source, target)
    chunked = FUNCS[name](source, target, chunk_size=chunk_size)
    assert rel_err(chunked, whole) <= 1e-13


@pytest.mark.parametrize("name", FUNCS)
def test_float32_close_to_float64(name):
    source, target, _ = make_inputs(6, 200, 300, 48, dtype=torch.float32)
    got = FUNCS[name](source, target)
    ref = FUNCS[name](source.to(F64), target.to(F64))
    assert got.dtype == F64
    assert rel_err(got, ref) <= 1e-5


def test_float32_peaked_softmax_close_to_float64():
    # CLIP-like: every source has one clearly matching target, logit gaps of tens at scale 100, so the
    # softmax is nearly one-hot and the raw form sum p y y^T - m m^T would cancel catastrophically in float32.
    # What is left is float32 rounding of the logits themselves (~1e-5 absolute at scale 100), which moves
    # the small softmax weights by ~1e-5 relative: hence 5e-5 here.
    gen = torch.Generator().manual_seed(7)
    shared = torch.randn(256, 128, generator=gen)
    source = (shared + 0.7 * torch.randn(256, 128, generator=gen)) * 2
    target = shared + 0.7 * torch.randn(256, 128, generator=gen)
    ref = infonce_hessian(source.to(F64), target.to(F64), math.log(100.0))
    assert rel_err(infonce_hessian(source, target, math.log(100.0)), ref) <= 5e-5
    ref_d = infonce_hessian_diagonals(source.to(F64), target.to(F64), math.log(100.0))
    assert rel_err(infonce_hessian_diagonals(source, target, math.log(100.0)), ref_d) <= 5e-5


@pytest.mark.parametrize("group", [1, 5, 6])
def test_naive_equals_fast(group):
    source, target, _ = make_inputs(8, 17, 40, 12)
    fast = infonce_hessian(source, target, math.log(50.0))
    naive = naive_infonce_hessian(source, target, math.log(50.0), group=group)
    assert rel_err(naive, fast) <= 1e-12


def test_scalar_tensors_and_mixed_dtypes():
    source, target, _ = make_inputs(9, 8, 12, 5)
    scale = torch.nn.Parameter(torch.tensor(3.1))
    bias = torch.tensor(-2.0, dtype=torch.float32)
    assert torch.equal(
        infonce_hessian(source, target, scale), infonce_hessian(source, target, float(scale.detach()))
    )
    ref = siglip_hessian(source, target, float(scale.detach()), -2.0)
    assert torch.equal(siglip_hessian(source, target, scale, bias), ref)
    assert torch.equal(
        siglip_hessian(source, target, 3.1, torch.tensor([-2.0])), siglip_hessian(source, target, 3.1, -2.0)
    )
    # float32 source with float64 target is computed in float64
    assert (
        rel_err(
            infonce_hessian(source.float(), target, 3.1),
            infonce_hessian(source.float().double(), target, 3.1),
        )
        <= 1e-14
    )


def test_inputs_not_modified():
    source, target, _ = make_inputs(10, 6, 7, 4)
    s0, t0 = source.clone(), target.clone()
    for fn in FUNCS.values():
        fn(source, target)
    naive_infonce_hessian(source, target, 1.0)
    assert torch.equal(source, s0) and torch.equal(target, t0)


# --------------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------------


def _bad_cases():
    good_s, good_t, _ = make_inputs(11, 4, 6, 3)
    nan_s = good_s.clone()
    nan_s[1, 2] = float("nan")
    inf_t = good_t.clone()
    inf_t[0, 0] = float("inf")
    zero_s = good_s.clone()
    zero_s[2] = 0.0
    zero_t = good_t.clone()
    zero_t[5] = 0.0
    return [
        ("source 1-D", dict(source=good_s[0]), "source"),
        ("target 3-D", dict(target=good_t[None]), "target"),
        ("D mismatch", dict(target=good_t[:, :2]), "target"),
        ("empty source", dict(source=good_s[:0]), "source"),
        ("empty target", dict(target=good_t[:0]), "target"),
        ("zero-width", dict(source=good_s[:, :0], target=good_t[:, :0]), "source"),
        ("nan source", dict(source=nan_s), "source"),
        ("inf target", dict(target=inf_t), "target"),
        ("zero-norm source row", dict(source=zero_s), "source"),
        ("zero-norm target row", dict(target=zero_t), "target"),
        ("integer source", dict(source=good_s.long()), "source"),
        ("nan logit_scale", dict(logit_scale=float("nan")), "logit_scale"),
        ("inf logit_scale", dict(logit_scale=torch.tensor(float("inf"))), "logit_scale"),
        ("huge logit_scale", dict(logit_scale=1000.0), "logit_scale"),
        ("vector logit_scale", dict(logit_scale=torch.ones(2)), "logit_scale"),
        ("string logit_scale", dict(logit_scale="4.6"), "logit_scale"),
        ("nan logit_bias", dict(logit_bias=float("nan")), "logit_bias"),
        ("inf logit_bias", dict(logit_bias=-float("inf")), "logit_bias"),
        ("zero chunk", dict(chunk_size=0), "chunk_size"),
    ], (good_s, good_t)


BAD, GOOD = _bad_cases()
BAD_FUNCS = {
    "infonce": infonce_hessian,
    "siglip": siglip_hessian,
    "infonce_diag": infonce_hessian_diagonals,
    "siglip_diag": siglip_hessian_diagonals,
    "naive": naive_infonce_hessian,
}
BAD_PARAMS = [
    pytest.param(fn_name, override, arg, id=f"{fn_name}-{label}")
    for fn_name in BAD_FUNCS
    for label, override, arg in BAD
    # InfoNCE has no logit_bias; the naive reference has no chunk_size
    if not ("logit_bias" in override and not fn_name.startswith("siglip"))
    and not ("chunk_size" in override and fn_name == "naive")
]


@pytest.mark.parametrize("fn_name,override,arg", BAD_PARAMS)
def test_bad_inputs_raise_value_error_naming_argument(fn_name, override, arg):
    kwargs = dict(source=GOOD[0], target=GOOD[1], logit_scale=2.0)
    if fn_name.startswith("siglip"):
        kwargs["logit_bias"] = -1.0
    kwargs.update(override)
    with pytest.raises(ValueError, match=arg):
        BAD_FUNCS[fn_name](**kwargs)


def test_naive_bad_group():
    with pytest.raises(ValueError, match="group"):
        naive_infonce_hessian(GOOD[0], GOOD[1], 2.0, group=0)


def test_float32_far_subnormal_weights_close_to_float64():
    # Scale 150: ~94% of the logit gaps lie below float32's exp floor (-87), where the weights are clamped to
    # the smallest normal number rather than exponentiated into subnormals; the result must still match
    # float64, whole and in chunks (chunks summed in float64).
    gen = torch.Generator().manual_seed(11)
    shared = torch.randn(300, 64, generator=gen)
    source = (shared + 0.5 * torch.randn(300, 64, generator=gen)) * 3
    target = shared + 0.5 * torch.randn(300, 64, generator=gen)
    ls = math.log(150.0)
    ref = infonce_hessian(source.to(F64), target.to(F64), ls)
    assert rel_err(infonce_hessian(source, target, ls), ref) <= 5e-5
    assert rel_err(infonce_hessian(source, target, ls, chunk_size=37), ref) <= 5e-5
    ref_d = infonce_hessian_diagonals(source.to(F64), target.to(F64), ls)
    assert rel_err(infonce_hessian_diagonals(source, target, ls, chunk_size=37), ref_d) <= 5e-5


# --------------------------------------------------------------------------------------------------------
# likelihood objects
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [None, -4.0])
def test_likelihood_objects_give_the_autograd_ggn(bias):
    source, target, _ = make_inputs(3, 6, 9, 5)
    ls = math.log(20.0)
    likelihood = (
        InfoNCE(torch.tensor(ls, dtype=F64)) if bias is None else SigLIP(ls, torch.tensor(bias, dtype=F64))
    )
    truth = autograd_ggns(source, target, ls, logit_bias=bias)
    assert rel_err(likelihood.ggn(source, target), truth.sum(0)) <= 1e-10
    assert rel_err(likelihood.ggn_diagonals(source, target), torch.diagonal(truth, dim1=1, dim2=2)) <= 1e-10


def test_likelihood_of_a_model_and_its_state():
    clip = likelihood_for(SimpleNamespace(logit_scale=4.6, logit_bias=None))
    siglip = likelihood_for(SimpleNamespace(logit_scale=2.3, logit_bias=-10.0))
    assert clip == InfoNCE(4.6) and siglip == SigLIP(2.3, -10.0)
    assert set(LIKELIHOODS) == {clip.state()["kind"], siglip.state()["kind"]}
    for likelihood in (clip, siglip):
        assert likelihood_from_state(likelihood.state()) == likelihood
    assert likelihood_from_state(None) is None
    with pytest.raises(ValueError, match="unknown likelihood"):
        likelihood_from_state({"kind": "mse", "logit_scale": 1.0})
    with pytest.raises(ValueError, match="InfoNCE"):
        likelihood_from_state({"kind": "infonce", "logit_scale": 1.0, "logit_bias": 0.0})
