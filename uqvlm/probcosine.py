"""ProbCosine: moments of the cosine similarity of two independent diagonal Gaussians (method.md §5),
and the predictive distributions built on Gaussian logits.

The closed form is exact for the moments of g^T h / sqrt(S_g S_h) with S = E||.||^2 (the cosine with
both norms replaced by their root mean square); for the cosine itself it is the paper's approximation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from uqvlm.validation import check_positive_int, check_tensor

# Bytes of one row chunk of the fused predictive's elementwise passes. Few large chunks: every pass is a
# parallel region that waits for all its threads, and on a shared CPU many small regions cost more than
# cache residency saves (2-core CPU under load, N = 100,000, K = 1,000: 4 MiB chunks 10.6-13.4 s, 16 MiB
# 7.7-8.3 s, 64 MiB 4.5-9.4 s, MAP 3.6-3.7 s).
_CHUNK_BYTES = 64 * 2**20
# Image rows per matmul of the fused predictive (at least): a full-speed matmul, no [N, D] float64 copy.
_MATMUL_ROWS = 4096

__all__ = [
    "probcosine",
    "probcosine_rank1",
    "probit_log_probs_rank1",
    "probcosine_logits",
    "probit_probs",
    "probit_log_probs",
    "mc_probs",
    "mc_log_probs",
]


def _check_matrix(name: str, x: Tensor, ndim: int = 2) -> None:
    check_tensor(name, x, ndim)


def _check_variance(name: str, var: Tensor, mean_name: str, mean: Tensor) -> None:
    _check_matrix(name, var, mean.ndim)
    if var.shape != mean.shape:
        raise ValueError(
            f"{name} must have the shape of {mean_name} {tuple(mean.shape)}, got {tuple(var.shape)}"
        )
    if (var < 0).any():
        raise ValueError(f"{name} contains negative variances (min {var.min().item():.3g})")


def probcosine(img_mean: Tensor, img_var: Tensor, txt_mean: Tensor, txt_var: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and variance of the cosine similarity of every image/text pair.

    img_mean, img_var: [N, D]; txt_mean, txt_var: [K, D] (diagonal variances, >= 0).
    Returns (mean [N, K], var [N, K]) in the promoted dtype of the inputs. Only matmuls: no [N, K, D]
    tensor is formed.
    """
    _check_matrix("img_mean", img_mean)
    _check_variance("img_var", img_var, "img_mean", img_mean)
    _check_matrix("txt_mean", txt_mean)
    _check_variance("txt_var", txt_var, "txt_mean", txt_mean)
    if img_mean.shape[1] != txt_mean.shape[1]:
        raise ValueError(f"txt_mean has embedding dim {txt_mean.shape[1]}, img_mean has {img_mean.shape[1]}")
    dtype = torch.promote_types(
        torch.promote_types(img_mean.dtype, img_var.dtype), torch.promote_types(txt_mean.dtype, txt_var.dtype)
    )
    mg, vg, mh, vh = (t.to(dtype) for t in (img_mean, img_var, txt_mean, txt_var))

    sq_g = mg.square() + vg  # E[g_d^2]
    sq_h = mh.square() + vh
    s_g = sq_g.sum(1)
    s_h = sq_h.sum(1)
    if (s_g <= 0).any():
        raise ValueError("img_mean has a row with zero norm and zero variance: its cosine is undefined")
    if (s_h <= 0).any():
        raise ValueError("txt_mean has a row with zero norm and zero variance: its cosine is undefined")
    denom = s_g[:, None] * s_h[None, :]

    mean = (mg @ mh.T) / denom.sqrt()
    # Var[g_d h_d] = E[g_d^2] v_h,d + v_g,d mu_h,d^2 summed over independent coordinates.
    var = (sq_g @ vh.T + vg @ mh.square().T) / denom
    return mean, var


def probcosine_rank1(
    img_mean: Tensor, img_scale: Tensor, img_dir: Tensor, txt_mean: Tensor, txt_scale: Tensor, txt_dir: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`probcosine` for variances that are rank one, as KFAC's are:
    img_var = img_scale[:, None] * img_dir[None, :] (img_scale [N], img_dir [D]), txt_var likewise.

    Same result, but the variance costs O(N D + K D + N K) instead of two [N, D] x [D, K] matmuls, so the
    BayesVLM predictive costs little more than the deterministic one.
    """
    dtype = _check_rank1_inputs(img_mean, img_scale, img_dir, txt_mean, txt_scale, txt_dir)
    mg, c, b, mh, e, f = (t.to(dtype) for t in (img_mean, img_scale, img_dir, txt_mean, txt_scale, txt_dir))
    g_n, h_n, left, right = _rank1_terms(mg, c, b, mh, e, f)
    return g_n @ h_n.T, left @ right.T


def _check_rank1_inputs(img_mean, img_scale, img_dir, txt_mean, txt_scale, txt_dir) -> torch.dtype:
    _check_matrix("img_mean", img_mean)
    _check_matrix("txt_mean", txt_mean)
    for name, vec, size in (
        ("img_scale", img_scale, img_mean.shape[0]),
        ("img_dir", img_dir, img_mean.shape[1]),
        ("txt_scale", txt_scale, txt_mean.shape[0]),
        ("txt_dir", txt_dir, txt_mean.shape[1]),
    ):
        _check_matrix(name, vec, 1)
        if vec.shape[0] != size:
            raise ValueError(f"{name} must have length {size}, got {vec.shape[0]}")
        if (vec < 0).any():
            raise ValueError(f"{name} contains negative values (min {vec.min().item():.3g})")
    if img_mean.shape[1] != txt_mean.shape[1]:
        raise ValueError(f"txt_mean has embedding dim {txt_mean.shape[1]}, img_mean has {img_mean.shape[1]}")
    dtype = img_mean.dtype
    for t in (img_scale, img_dir, txt_mean, txt_scale, txt_dir):
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _rank1_terms(mg: Tensor, c: Tensor, b: Tensor, mh: Tensor, e: Tensor, f: Tensor) -> tuple[Tensor, ...]:
    """The per-row and per-column factors of the rank-one ProbCosine: mean = mg_n @ mh_n^T and
    var = left @ right^T, with mg_n, mh_n the means scaled by 1 / sqrt(S)."""
    sq_mg, sq_mh = mg.square(), mh.square()
    s_g = sq_mg.sum(1) + c * b.sum()
    s_h = sq_mh.sum(1) + e * f.sum()
    if (s_g <= 0).any():
        raise ValueError("img_mean has a row with zero norm and zero variance: its cosine is undefined")
    if (s_h <= 0).any():
        raise ValueError("txt_mean has a row with zero norm and zero variance: its cosine is undefined")
    r_g, r_h = 1.0 / s_g, 1.0 / s_h
    # var_nk = [sum_d (mu_g,d^2 + c b_d) e f_d + c b_d mu_h,d^2] / (S_g S_h) is a rank-2 outer product:
    # r_g (mu_g^2 . f + (b . f) c) * e r_h  +  c r_g * (mu_h^2 . b) r_h.
    left = torch.stack([r_g * (sq_mg @ f + (b @ f) * c), c * r_g], dim=1)
    right = torch.stack([e * r_h, (sq_mh @ b) * r_h], dim=1)
    return mg * r_g.sqrt()[:, None], mh * r_h.sqrt()[:, None], left, right


def probit_log_probs_rank1(
    img_mean: Tensor,
    img_scale: Tensor,
    img_dir: Tensor,
    txt_mean: Tensor,
    txt_scale: Tensor,
    txt_dir: Tensor,
    logit_scale: float,
    logit_bias: float | None = None,
    *,
    chunk_rows: int | None = None,
) -> Tensor:
    """The probit predictive of :func:`probcosine_rank1`'s logits, fused: equal (to round-off) to
    ``probit_log_probs(s mean + beta, s^2 var)`` with ``mean, var = probcosine_rank1(...)``, in the inputs'
    promoted dtype (float64 from BayesVLM), [N, K].

    Image rows are taken in blocks: the block's mean logits come from one matmul written straight into
    the output; then, ``chunk_rows`` rows at a time (default: about 64 MiB of them), the variance, the
    probit scaling and the log-softmax are made in place, in five passes. No other [N, K] tensor is
    formed, and the inputs are validated once, here (they are O(N D + K D)). ``logit_scale`` is the LOG
    scale.
    """
    dtype = _check_rank1_inputs(img_mean, img_scale, img_dir, txt_mean, txt_scale, txt_dir)
    if chunk_rows is not None:
        check_positive_int("chunk_rows", chunk_rows)
    s = math.exp(float(logit_scale))
    bias = 0.0 if logit_bias is None else float(logit_bias)
    if not math.isfinite(s) or not math.isfinite(bias):
        raise ValueError(f"logit_scale and logit_bias must be finite, got {logit_scale}, {logit_bias}")
    c, b, mh, e, f = (t.to(dtype) for t in (img_scale, img_dir, txt_mean, txt_scale, txt_dir))
    # The class side once: scaled means and the variance's column factors, s and s^2 pi / 8 folded in.
    sq_mh = mh.square()
    s_h = sq_mh.sum(1) + e * f.sum()
    if (s_h <= 0).any():
        raise ValueError("txt_mean has a row with zero norm and zero variance: its cosine is undefined")
    r_h = 1.0 / s_h
    h_t = (mh * (s * r_h.sqrt())[:, None]).T.contiguous()
    col0 = (e * r_h * (s * s * math.pi / 8.0))[None, :]
    col1 = ((sq_mh @ b) * r_h * (s * s * math.pi / 8.0))[None, :]
    ones = torch.ones_like(col0)
    b_sum, b_dot_f = b.sum(), b @ f
    n, k = img_mean.shape[0], txt_mean.shape[0]
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_BYTES // (k * torch.finfo(dtype).bits // 8))
    out = torch.empty(n, k, dtype=dtype, device=mh.device)
    work = torch.empty(min(chunk_rows, max(n, 1)), k, dtype=dtype, device=mh.device)
    # Image rows in blocks large enough for a full-speed matmul, the elementwise passes in cache-sized chunks.
    block = max(chunk_rows, _MATMUL_ROWS)
    for first in range(0, n, block):
        last = min(first + block, n)
        mg, cg = img_mean[first:last].to(dtype), c[first:last]
        sq_mg = mg.square()
        s_g = sq_mg.sum(1) + cg * b_sum
        if (s_g <= 0).any():
            raise ValueError("img_mean has a row with zero norm and zero variance: its cosine is undefined")
        r_g = 1.0 / s_g
        # var_nk = left_n0 col_k0 + left_n1 col_k1 (see _rank1_terms)
        left0 = (r_g * (sq_mg @ f + b_dot_f * cg))[:, None]
        left1 = (cg * r_g)[:, None]
        torch.mm(mg * r_g.sqrt()[:, None], h_t, out=out[first:last])
        if bias:
            out[first:last].add_(bias)
        for start in range(first, last, chunk_rows):
            stop = min(start + chunk_rows, last)
            logits, probit = out[start:stop], work[: stop - start]
            rows = slice(start - first, stop - first)
            # 1 + pi/8 s^2 Var[cos], then the probit scaling and the log-softmax, on the chunk in the cache
            torch.addcmul(ones, left0[rows], col0, out=probit).addcmul_(left1[rows], col1)
            logits.mul_(probit.rsqrt_())
            torch.log_softmax(logits, dim=-1, out=logits)
    return out


def probcosine_logits(
    img_mean: Tensor,
    img_var: Tensor,
    txt_mean: Tensor,
    txt_var: Tensor,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Gaussian logits s*cos (+ beta): mean s E[cos] + beta, variance s^2 Var[cos].

    ``logit_scale`` is the LOG scale (open_clip's ``model.logit_scale``), s = exp(logit_scale).
    """
    scale_log = float(logit_scale)
    if not math.isfinite(scale_log):
        raise ValueError(f"logit_scale must be finite, got {scale_log}")
    mean, var = probcosine(img_mean, img_var, txt_mean, txt_var)
    s = math.exp(scale_log)
    mean = s * mean
    if logit_bias is not None:
        bias = float(logit_bias)
        if not math.isfinite(bias):
            raise ValueError(f"logit_bias must be finite, got {bias}")
        mean = mean + bias
    return mean, (s * s) * var


def _check_logits(mean_logits: Tensor, var_logits: Tensor) -> None:
    if not isinstance(mean_logits, Tensor) or mean_logits.ndim < 1:
        raise ValueError("mean_logits must be a tensor with a class dimension last")
    _check_matrix("mean_logits", mean_logits, mean_logits.ndim)
    _check_variance("var_logits", var_logits, "mean_logits", mean_logits)


def _probit_scaled(mean_logits: Tensor, var_logits: Tensor) -> Tensor:
    _check_logits(mean_logits, var_logits)
    dtype = torch.promote_types(mean_logits.dtype, var_logits.dtype)
    # In place on one temporary: this runs over every [N, K] logit.
    return var_logits.to(dtype).mul(math.pi / 8.0).add_(1.0).rsqrt_().mul_(mean_logits)


def probit_log_probs(mean_logits: Tensor, var_logits: Tensor) -> Tensor:
    """log of the probit-approximated predictive: log_softmax(mean / sqrt(1 + pi/8 var)), last dimension.

    Exact in log space, so a class the predictive all but rules out keeps a finite log-probability."""
    return torch.log_softmax(_probit_scaled(mean_logits, var_logits), dim=-1)


def probit_probs(mean_logits: Tensor, var_logits: Tensor) -> Tensor:
    """Probit-approximated predictive softmax(mean / sqrt(1 + pi/8 var)) over the last dimension."""
    return torch.softmax(_probit_scaled(mean_logits, var_logits), dim=-1)


def _logit_sample_chunks(
    mean_logits: Tensor,
    var_logits: Tensor,
    samples: int,
    generator: torch.Generator | None,
    max_elements: int,
) -> Iterator[Tensor]:
    """Chunks [m, *mean.shape] of samples l ~ N(mean, diag var), ``samples`` rows in all."""
    _check_logits(mean_logits, var_logits)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if max_elements < 1:
        raise ValueError(f"max_elements must be positive, got {max_elements}")
    dtype = torch.promote_types(mean_logits.dtype, var_logits.dtype)
    mean = mean_logits.to(dtype)
    std = var_logits.to(dtype).sqrt()
    chunk = max(1, min(samples, max_elements // max(1, mean.numel())))
    # Drawn on the generator's device (the CPU for torch.Generator()) and moved: the same seed gives the
    # same samples whichever device the logits are on.
    draw_on = mean.device if generator is None else generator.device
    done = 0
    while done < samples:
        m = min(chunk, samples - done)
        eps = torch.randn((m, *mean.shape), generator=generator, dtype=dtype, device=draw_on)
        yield mean + std * eps.to(mean.device, non_blocking=True)
        done += m


def mc_log_probs(
    mean_logits: Tensor,
    var_logits: Tensor,
    samples: int = 1000,
    generator: torch.Generator | None = None,
    max_elements: int = 1 << 24,
) -> Tensor:
    """log of the Monte Carlo predictive, log E[softmax(l)] = logsumexp_s log_softmax(l_s) - log S,
    with independent l_k ~ N(mean_k, var_k), over the last dimension; float64.

    The same samples as :func:`mc_probs` with the same generator and ``max_elements``. Accumulated in log
    space (float64), so it stays finite where the averaged probability underflows.
    """
    total = None
    for logits in _logit_sample_chunks(mean_logits, var_logits, samples, generator, max_elements):
        part = torch.log_softmax(logits.double(), dim=-1).logsumexp(0)
        total = part if total is None else torch.logaddexp(total, part)
    return total - math.log(samples)


def mc_probs(
    mean_logits: Tensor,
    var_logits: Tensor,
    samples: int = 1000,
    generator: torch.Generator | None = None,
    max_elements: int = 1 << 24,
) -> Tensor:
    """Monte Carlo predictive E[softmax(l)] with independent l_k ~ N(mean_k, var_k), over the last dim.

    Samples are drawn in chunks of at most ``max_elements`` logits so memory stays bounded; with a
    seeded ``generator`` the result is deterministic (for a fixed ``max_elements``).
    """
    dtype = torch.promote_types(mean_logits.dtype, var_logits.dtype)
    total = None
    for logits in _logit_sample_chunks(mean_logits, var_logits, samples, generator, max_elements):
        # Accumulate in float64 so averaging many chunks does not lose float32 precision.
        part = torch.softmax(logits, dim=-1).sum(0, dtype=torch.float64)
        total = part if total is None else total + part
    return (total / samples).to(dtype)
