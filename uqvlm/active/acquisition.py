"""Acquisition math for active learning (method.md section 7): entropies, BALD, EPIG, targeting.

Pure tensor functions. Entropies use ``torch.xlogy`` in float64; EPIG works on per-sample class
probabilities ``[N, S, K]`` that are *jointly* random across inputs (every input pushed through the same
S weight samples), and is computed with matmuls over S in bounded chunks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from uqvlm.probcosine import probcosine

__all__ = [
    "entropy",
    "bald",
    "epig",
    "epig_upper_bound",
    "sampled_embeddings",
    "joint_sample_probs",
    "gaussian_distances",
    "nearest",
    "assign_nearest_unused",
]

# Elements of one [rows, cols] temporary (distances, EPIG joint blocks): bounds memory.
MAX_ELEMENTS = 1 << 23


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
    """(p_s(y|x) - p(y|x)) / p(y|x) as [N, S, K] in ``dtype``, and the marginals p(y|x) [N, K] (float64)."""
    p = probs.double()
    mean = p.mean(1)
    ratio = (p - mean[:, None]) / mean.clamp_min(1e-300)[:, None]
    return ratio.to(dtype), mean


def epig(
    pool_probs: Tensor,
    target_probs: Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    max_elements: int = MAX_ELEMENTS,
) -> Tensor:
    """EPIG(x) = mean over targets x* of I(y; y* | x, x*), for every pool point x.

    ``pool_probs`` [N, S, K] and ``target_probs`` [M, S, K'] hold p_s(y|x) for the SAME S joint weight
    samples; p(y, y*) = mean_s p_s(y|x) p_s(y*|x*). Written with t = p(y, y*) / (p(y) p(y*)) - 1, which is
    one matmul of the centred ratios (p_s - p) / p over S, I = sum p(y) p(y*) (1 + t) log(1 + t): no
    difference of entropies, so it stays accurate when I is tiny, also in float32. Pairs are processed in
    blocks of at most ``max_elements`` entries; the matmul and log run in ``dtype``. Returns [N] float64.
    """
    if pool_probs.ndim != 3 or target_probs.ndim != 3:
        raise ValueError("pool_probs and target_probs must be [N, S, K] and [M, S, K']")
    n, s, k = pool_probs.shape
    m, s2, k2 = target_probs.shape
    if s != s2:
        raise ValueError(f"pool and target probabilities use different sample counts ({s} vs {s2})")
    ratio_p, marg_p = _centred_ratio(pool_probs, dtype)
    ratio_t, marg_t = _centred_ratio(target_probs, dtype)
    rows = ratio_p.permute(0, 2, 1).reshape(n * k, s)  # row (x, y)
    cols = ratio_t.permute(1, 0, 2).reshape(s, m * k2) / s  # column (x*, y*)
    weight_t = marg_t.reshape(-1).to(dtype)
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


def epig_upper_bound(pool_probs: Tensor, target_probs: Tensor) -> Tensor:
    """An upper bound on :func:`epig` for the same samples, in O((N + M) S^2 K) instead of O(N M S K^2).

    I(y; y*) = KL(p(y, y*) || p(y) p(y*)) <= log(1 + chi^2), and with the centred, scaled sample matrices
    U_x[s, y] = (p_s(y|x) - p(y|x)) / sqrt(p(y|x)): chi^2 = ||U_x^T U_x*||_F^2 / S^2 = <U_x U_x^T, U_x* U_x*^T> / S^2.
    Averaging over targets (Jensen) gives log(1 + <U_x U_x^T, mean_x* U_x* U_x*^T> / S^2). Returns [N] float64.
    """

    def centred(p: Tensor) -> Tensor:
        p = p.double()
        mean = p.mean(1, keepdim=True)
        return torch.where(mean > 0, (p - mean) / mean.clamp_min(1e-300).sqrt(), torch.zeros_like(p))

    s = pool_probs.shape[1]
    u_t = centred(target_probs)  # [M, S, K']
    gram_t = torch.einsum("msk,mtk->st", u_t, u_t) / u_t.shape[0]  # mean_x* U U^T, [S, S]
    u_p = centred(pool_probs)  # [N, S, K]
    chi2 = (u_p * torch.einsum("st,ntk->nsk", gram_t, u_p)).sum((1, 2)) / s**2
    return torch.log1p(chi2.clamp_min(0))


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
        logits = scale * torch.bmm(u.transpose(0, 1), t).transpose(0, 1)  # [n, S, K]
        out.append((logits + (logit_bias or 0.0)).softmax(-1))
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
    raise ValueError(f"metric must be 'wasserstein' or 'cosine', got {metric!r}")


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
    used = torch.zeros(pool_mean.shape[0], dtype=torch.bool)
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
