"""Acquisition math for active learning (method.md section 7): entropies, BALD, EPIG, targeting.

Pure tensor functions. Entropies use ``torch.xlogy`` in float64; EPIG works on per-sample class
probabilities ``[N, S, K]`` that are *jointly* random across inputs (every input pushed through the same
S weight samples), and is computed with matmuls over S in bounded chunks.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from uqvlm.probcosine import probcosine

__all__ = [
    "DISTANCES",
    "entropy",
    "bald",
    "epig",
    "epig_upper_bound",
    "EpigTargets",
    "sampled_embeddings",
    "joint_sample_probs",
    "gaussian_distances",
    "nearest",
    "assign_nearest_unused",
]

# Elements of one [rows, cols] temporary (distances, EPIG joint blocks): bounds memory.
MAX_ELEMENTS = 1 << 23
# The metrics of gaussian_distances (the targeting distance).
DISTANCES = ("wasserstein", "cosine")


def entropy(probs: Tensor, dim: int = -1) -> Tensor:
    """Shannon entropy (nats) along ``dim``, in float64."""
    p = probs.double()
    return -torch.xlogy(p, p).sum(dim)


def bald(sample_probs: Tensor) -> Tensor:
    """BALD = H[E_s p_s] - E_s H[p_s] for per-sample probabilities [N, S, K]; returns [N] float64."""
    if sample_probs.ndim != 3:
        raise ValueError(f"sample_probs must be [N, S, K], got {tuple(sample_probs.shape)}")
    p = sample_probs.double()
    return entropy(p.mean(1)) - entropy(p).mean(1)


def _blocks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(total, start + size))


def _centred_ratio(probs: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(p_s(y|x) - p(y|x)) / p(y|x) as [N, S, K] in ``dtype``, and the marginals p(y|x) [N, K] (float64).

    The probabilities are renormalised in float64 first: a float32 softmax sums to 1 only to ~1e-7, and
    EPIG's linear term sum p(y*) t, zero for normalised probabilities, would not cancel.
    """
    p = probs.to(torch.float64, copy=True)
    p /= p.sum(-1, keepdim=True)
    mean = p.mean(1)
    ratio = p.sub_(mean[:, None]).div_(mean.clamp_min(1e-300)[:, None])
    return ratio.to(dtype), mean


def _centred_rows(probs: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`_centred_ratio` in float64 laid out as rows (x, y) of S samples, [N K, S], and the marginals."""
    n, s, k = probs.shape
    p = torch.empty((n, k, s), dtype=torch.float64, device=probs.device).copy_(probs.transpose(1, 2))
    p.div_(p.sum(1, keepdim=True))
    mean = p.mean(2)
    return p.sub_(mean[:, :, None]).div_(mean.clamp_min(1e-300)[:, :, None]).view(n * k, s), mean


# Scales of the EPIG bound's buckets: half-octaves 2^(e/2), e in [_E_MIN, _E_MAX]; e = _E_MAX + 1 is "larger".
_E_MIN, _E_MAX = -40, 10
_EPS64 = torch.finfo(torch.float64).eps


def _scale_level(norms: Tensor) -> Tensor:
    """The smallest half-octave exponent e with norms <= 2^(e/2), clamped to [_E_MIN, _E_MAX + 1]."""
    return torch.ceil(2.0 * torch.log2(norms)).clamp(_E_MIN, _E_MAX + 1).long()


class EpigTargets:
    """The target side of :func:`epig` and :func:`epig_upper_bound` for one set of target probabilities
    [M, S, K'], prepared once and shared by every call of a greedy step.

    For EPIG: the centred ratios c[(x*, y*), s] = (p_s(y*|x*) - p(y*|x*)) / p(y*|x*) as columns in ``dtype``
    and the marginals p(y*|x*) as weights. For the bound (float64): the rows c with weights
    w = p(y*|x*) / M, grouped by the half-octave of b = ||c|| / sqrt(S), and per group the Gram matrix
    G_j = sum w c c^T [S, S].

    Both are built in chunks of target rows (:meth:`from_chunks`), so beside the columns ([S, M K'] in
    ``dtype``, what EPIG reads) only one chunk's float64 temporaries are held: at M = 20,000, S = 100,
    K' = 200 the columns take 1.6 GB in float32, where whole-array float64 copies would take 3.2 GB each.
    """

    def __init__(self, target_probs: Tensor, dtype: torch.dtype = torch.float64, *, chunk: int | None = None):
        if target_probs.ndim != 3:
            raise ValueError(f"target_probs must be [M, S, K'], got {tuple(target_probs.shape)}")
        m, s, k = target_probs.shape
        rows = chunk or max(1, MAX_ELEMENTS // max(1, s * k))
        self._build(target_probs.split(rows) if m else [target_probs], m, s, k, dtype, target_probs.device)

    @classmethod
    def from_chunks(
        cls, chunks: Iterable[Tensor], count: int, dtype: torch.dtype = torch.float64
    ) -> EpigTargets:
        """The targets from consecutive row chunks [m_i, S, K'] of the probabilities (sum m_i = ``count``),
        consumed one at a time: the full [M, S, K'] tensor is never needed."""
        chunks = iter(chunks)
        first = next(chunks, None)
        if first is None or first.ndim != 3:
            raise ValueError("from_chunks needs at least one [m, S, K'] chunk")
        self = cls.__new__(cls)
        self._build(
            itertools.chain([first], chunks), count, first.shape[1], first.shape[2], dtype, first.device
        )
        return self

    def _build(
        self, chunks: Iterable[Tensor], m: int, s: int, k: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.count, self.samples, self.classes, self.dtype = m, s, k, dtype
        self.columns = torch.empty((s, m * k), dtype=dtype, device=device)  # column (x*, y*)
        self.weights = torch.empty(m * k, dtype=dtype, device=device)
        grams: dict[int, Tensor] = {}
        mean_scale = 0.0
        done = 0
        for probs in chunks:
            if probs.ndim != 3 or probs.shape[1:] != (s, k):
                raise ValueError(f"every chunk must be [m, {s}, {k}], got {tuple(probs.shape)}")
            n = probs.shape[0]
            if done + n > m:
                raise ValueError(f"the chunks hold more than the {m} target rows announced")
            cols = slice(done * k, (done + n) * k)
            ratio, marg = _centred_ratio(probs, dtype)
            self.columns[:, cols] = ratio.permute(1, 0, 2).reshape(s, -1) / s
            self.weights[cols] = marg.reshape(-1).to(dtype)
            del ratio
            # The bound's side: the same ratios in float64 as rows, grouped by their scale's half-octave.
            c, marg64 = _centred_rows(probs)
            w = marg64.reshape(-1) / m
            b = c.norm(dim=1) / math.sqrt(s)
            mean_scale += float((w * b).sum())
            levels, slices = _groups(_scale_level(b))
            for level, rows in zip(levels.tolist(), slices, strict=True):
                part = c[rows]
                gram = (part * w[rows, None]).T @ part
                grams[level] = gram if level not in grams else grams[level].add_(gram)
            done += n
        if done != m:
            raise ValueError(f"the chunks hold {done} target rows, {m} were announced")
        order = sorted(grams)
        self._levels = torch.tensor(order, dtype=torch.long)
        self._grams = (
            torch.stack([grams[j] for j in order]) if order else torch.zeros(0, s, s, dtype=torch.float64)
        )
        self._gram = self._grams.sum(0)
        self._mean_scale = mean_scale
        self._by_level: dict[int, Tensor] = {}

    @property
    def mean_scale(self) -> float:
        """sum_(x*, y*) w ||c|| / sqrt(S): the targets' half of the round-off scale of the bound's margin."""
        return self._mean_scale

    def weighted_gram(self, level: int) -> Tensor:
        """H_l = G/2 + sum_j min(1, 2^((l + j)/2)) G_j / 2 (factor 1 where l or j is "larger")."""
        if level not in self._by_level:
            factor = torch.exp2((level + self._levels.double()) / 2).clamp(max=1.0)
            factor[self._levels > _E_MAX] = 1.0
            if level > _E_MAX:
                factor[:] = 1.0
            factor = factor.to(self._grams.device)
            self._by_level[level] = 0.5 * self._gram + 0.5 * (factor[:, None, None] * self._grams).sum(0)
        return self._by_level[level]


def _groups(levels: Tensor) -> tuple[Tensor, list[Tensor]]:
    """The distinct levels (ascending) and, for each, the indices of the rows at that level."""
    order = torch.argsort(levels, stable=True)
    distinct, counts = torch.unique_consecutive(levels[order], return_counts=True)
    return distinct.cpu(), list(torch.split(order, counts.tolist()))


def _targets(target_probs: Tensor | EpigTargets, dtype: torch.dtype) -> EpigTargets:
    if isinstance(target_probs, EpigTargets):
        if target_probs.dtype != dtype:
            raise ValueError(f"the targets were prepared in {target_probs.dtype}, epig runs in {dtype}")
        return target_probs
    return EpigTargets(target_probs, dtype)


def epig(
    pool_probs: Tensor,
    target_probs: Tensor | EpigTargets,
    *,
    dtype: torch.dtype = torch.float64,
    max_elements: int = MAX_ELEMENTS,
) -> Tensor:
    """EPIG(x) = mean over targets x* of I(y; y* | x, x*), for every pool point x.

    ``pool_probs`` [N, S, K] and ``target_probs`` [M, S, K'] (or :class:`EpigTargets` prepared from them in
    ``dtype``) hold p_s(y|x) for the SAME S joint weight samples; p(y, y*) = mean_s p_s(y|x) p_s(y*|x*).
    Written with t = p(y, y*) / (p(y) p(y*)) - 1, which is one matmul of the centred ratios (p_s - p) / p
    over S, I = sum p(y) p(y*) (1 + t) log(1 + t): no difference of entropies, so it stays accurate when I
    is tiny, also in float32. Pairs are processed in blocks of at most ``max_elements`` entries; the matmul
    and log run in ``dtype``. Returns [N] float64.
    """
    if pool_probs.ndim != 3:
        raise ValueError("pool_probs must be [N, S, K]")
    targets = _targets(target_probs, dtype)
    n, s, k = pool_probs.shape
    m, k2 = targets.count, targets.classes
    if s != targets.samples:
        raise ValueError(
            f"pool and target probabilities use different sample counts ({s} vs {targets.samples})"
        )
    ratio_p, marg_p = _centred_ratio(pool_probs, dtype)
    rows = ratio_p.permute(0, 2, 1).reshape(n * k, s)  # row (x, y)
    cols, weight_t = targets.columns.to(rows.device), targets.weights.to(rows.device)
    # J = 0 exactly (t = -1) only by underflow; clamping keeps (1 + t) log(1 + t) at ~0 instead of NaN.
    floor = -1.0 + 4 * torch.finfo(dtype).eps
    m_block = max(1, min(m, max_elements // (k * k2)))
    n_block = max(1, max_elements // (k * m_block * k2))
    total = torch.zeros(n * k, dtype=torch.float64, device=pool_probs.device)
    for ns in _blocks(n, n_block):
        r = rows[ns.start * k : ns.stop * k]
        for ms in _blocks(m, m_block):
            t = (r @ cols[:, ms.start * k2 : ms.stop * k2]).clamp_(min=floor)
            u = torch.log1p(t)
            u.mul_(t.add_(1.0))
            total[ns.start * k : ns.stop * k] += (u @ weight_t[ms.start * k2 : ms.stop * k2]).double()
    return (total.view(n, k) * marg_p).sum(1) / m


def epig_upper_bound(
    pool_probs: Tensor, target_probs: Tensor | EpigTargets, *, dtype: torch.dtype | None = None
) -> Tensor:
    """An upper bound on :func:`epig` for the same samples, in O(N S^2 K) after the targets' O(M S^2 K').

    With t = p(y, y*) / (p(y) p(y*)) - 1 = (1/S) sum_s r_s(y) c_s(y*) (r, c the centred ratios (p_s - p)/p
    of pool and target point), EPIG = mean_x* sum p(y) p(y*) phi(t), phi(t) = (1 + t) log(1 + t) - t (the
    linear term sums to zero), and chi^2 = mean_x* sum p(y) p(y*) t^2 = sum_y p(y) r_y^T G r_y / S^2 with
    G = mean_x* sum_y* p(y*) c c^T.

    - phi(t) <= t^2/2 for t >= 0 and phi(t) <= t^2 (1 - t)/2 for -1 <= t < 0 (the difference is 0 at -1 and
      0, convex then concave in between), so phi(t) <= t^2/2 (1 + min(1, |t|)); and |t| <= ||r_y|| ||c_y*||/S
      (Cauchy-Schwarz over samples). With both norms rounded up to half-octaves (targets grouped by theirs,
      Gram G_j per group) this gives B = sum_y p(y) r_y^T H_l(y) r_y / S^2 with
      H_l = G/2 + sum_j min(1, 2^((l + j)/2)) G_j / 2: about chi^2/2, EPIG's own leading term, where the
      ratios are small, and at most chi^2.
    - KL <= log(1 + chi^2) for every target, then Jensen over targets; chi^2 <= 2 B, as H_l >= G/2.

    So EPIG <= min(B, log(1 + 2 B)), exactly, for the probabilities given (renormalised as :func:`epig`
    does). ``dtype`` (the dtype :func:`epig` runs in, if given) adds a margin for its round-off,
    16 eps (sigma + sigma^2) with sigma = sum_y p(y) ||r_y|| / sqrt(S) sum_y* w ||c_y*|| / sqrt(S) the scale
    of the error of t (whose linear term does not cancel in floating point), plus S eps64 B for the bound's
    own. Returns [N] float64.
    """
    if pool_probs.ndim != 3:
        raise ValueError("pool_probs must be [N, S, K]")
    targets = target_probs if isinstance(target_probs, EpigTargets) else EpigTargets(target_probs)
    n, s, k = pool_probs.shape
    if s != targets.samples:
        raise ValueError(
            f"pool and target probabilities use different sample counts ({s} vs {targets.samples})"
        )
    r, marg = _centred_rows(pool_probs)
    norms = r.norm(dim=1) / math.sqrt(s)
    levels, slices = _groups(_scale_level(norms))
    quad = torch.empty_like(norms)
    for level, rows in zip(levels.tolist(), slices, strict=True):
        part = r[rows]
        quad[rows] = ((part @ targets.weighted_gram(level).to(r.device)) * part).sum(1)
    second = (quad.view(n, k) * marg).sum(1).clamp_min(0) / s**2
    bound = torch.minimum(second, torch.log1p(2 * second))
    if dtype is not None:
        scale = (norms.view(n, k) * marg).sum(1) * targets.mean_scale
        bound = bound + 16 * torch.finfo(dtype).eps * (scale + scale.square()) + s * _EPS64 * bound
    return bound


def sampled_embeddings(
    activations: Tensor, weight: Tensor, bias: Tensor | None = None, residuals: Tensor | None = None
) -> Tensor:
    """z_s = W_s a (+ b_s) (+ r) for every input and weight sample: [N, p] x [S, D, p] -> [N, S, D]."""
    s, d, p = weight.shape
    z = (activations.to(weight.dtype) @ weight.reshape(s * d, p).T).view(-1, s, d)
    if bias is not None:
        z = z + bias.to(z.dtype)[None]
    if residuals is not None:
        z = z + residuals.to(z.dtype)[:, None]
    return z


def _softmax(logits: Tensor) -> Tensor:
    """Softmax over the last dim, in place of ``logits``: on CPU 5x faster than Tensor.softmax when the last
    dim is a few classes."""
    logits -= logits.amax(-1, keepdim=True)
    logits.exp_()
    return logits.div_(logits.sum(-1, keepdim=True))


def joint_sample_probs(
    activations: Tensor,
    residuals: Tensor | None,
    weight: Tensor,
    bias: Tensor | None,
    class_embeddings: Tensor,
    logit_scale: float,
    logit_bias: float | None = None,
    *,
    max_elements: int = MAX_ELEMENTS,
) -> Tensor:
    """p_s(y|x) = softmax_y(s cos(W_s a, t_{s,y}) + beta) for weight samples [S, D, p] and per-sample class
    embeddings ``class_embeddings`` [S, K, D]; returns [N, S, K] in the weights' dtype, in row chunks."""
    s, d, _ = weight.shape
    if class_embeddings.ndim != 3 or class_embeddings.shape[0] != s or class_embeddings.shape[2] != d:
        raise ValueError(f"class_embeddings must be [{s}, K, {d}], got {tuple(class_embeddings.shape)}")
    t = torch.nn.functional.normalize(class_embeddings.to(weight.dtype), dim=-1).transpose(1, 2)  # [S, D, K]
    scale = math.exp(logit_scale)
    step = max(1, max_elements // (s * max(d, class_embeddings.shape[1])))
    out = []
    for rows in _blocks(activations.shape[0], step):
        res = None if residuals is None else residuals[rows]
        u = torch.nn.functional.normalize(sampled_embeddings(activations[rows], weight, bias, res), dim=-1)
        logits = scale * torch.bmm(u.transpose(0, 1), t)  # [S, n, K]
        out.append(_softmax(logits + (logit_bias or 0.0)).transpose(0, 1))
    if not out:
        return weight.new_zeros(0, s, class_embeddings.shape[1])
    return torch.cat(out)


def gaussian_distances(
    query_mean: Tensor, query_var: Tensor, pool_mean: Tensor, pool_var: Tensor, metric: str = "wasserstein"
) -> Tensor:
    """[Q, N] dissimilarities between diagonal Gaussian embeddings (smaller = closer), float64.

    ``wasserstein``: squared 2-Wasserstein distance ||mu1 - mu2||^2 + sum (sigma1 - sigma2)^2.
    ``cosine``: minus the expected cosine similarity (ProbCosine mean).
    """
    if metric == "wasserstein":
        a = torch.cat([query_mean.double(), query_var.double().clamp_min(0).sqrt()], 1)
        b = torch.cat([pool_mean.double(), pool_var.double().clamp_min(0).sqrt()], 1)
        sq = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2.0 * (a @ b.T)
        return sq.clamp_min(0.0)
    if metric == "cosine":
        mean, _ = probcosine(query_mean.double(), query_var.double(), pool_mean.double(), pool_var.double())
        return -mean
    raise ValueError(f"metric must be {' or '.join(map(repr, DISTANCES))}, got {metric!r}")


def _distance_rows(
    query_mean: Tensor, query_var: Tensor, pool_mean: Tensor, pool_var: Tensor, metric: str, max_elements: int
) -> Iterator[tuple[slice, Tensor]]:
    step = max(1, max_elements // max(1, pool_mean.shape[0]))
    for rows in _blocks(query_mean.shape[0], step):
        yield rows, gaussian_distances(query_mean[rows], query_var[rows], pool_mean, pool_var, metric)


def nearest(
    query_mean: Tensor,
    query_var: Tensor,
    pool_mean: Tensor,
    pool_var: Tensor,
    k: int = 1,
    metric: str = "wasserstein",
    *,
    max_elements: int = MAX_ELEMENTS,
) -> Tensor:
    """The k nearest pool points of every query, [Q, k] (nearest first); query rows in bounded chunks."""
    k = min(k, pool_mean.shape[0])
    out = [
        dist.topk(k, dim=1, largest=False).indices
        for _, dist in _distance_rows(query_mean, query_var, pool_mean, pool_var, metric, max_elements)
    ]
    return torch.cat(out) if out else torch.zeros(0, k, dtype=torch.long)


def assign_nearest_unused(
    query_mean: Tensor,
    query_var: Tensor,
    pool_mean: Tensor,
    pool_var: Tensor,
    budget: int,
    k: int = 1,
    metric: str = "wasserstein",
    *,
    max_elements: int = MAX_ELEMENTS,
) -> tuple[Tensor, Tensor]:
    """Map queries, in the given order, to their k nearest pool points not taken by an earlier query,
    until ``budget`` pool points are chosen. Returns (pool indices [budget], query of each pick)."""
    if budget > pool_mean.shape[0]:
        raise ValueError(f"budget {budget} exceeds the pool size {pool_mean.shape[0]}")
    used = torch.zeros(pool_mean.shape[0], dtype=torch.bool, device=pool_mean.device)
    picks: list[int] = []
    owners: list[int] = []
    for rows, dist in _distance_rows(query_mean, query_var, pool_mean, pool_var, metric, max_elements):
        for i, row in enumerate(dist):
            take = min(k, budget - len(picks))
            row = row.masked_fill(used, math.inf)
            idx = row.topk(take, largest=False).indices
            used[idx] = True
            picks.extend(idx.tolist())
            owners.extend([rows.start + i] * take)
            if len(picks) == budget:
                return torch.tensor(picks, dtype=torch.long), torch.tensor(owners, dtype=torch.long)
    raise ValueError(f"only {len(picks)} of {budget} pool points could be assigned: too few query points")
