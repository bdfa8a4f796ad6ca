"""Exact output-space GGNs of the contrastive losses (method.md section 2).

For a source embedding z (unnormalised, r = ||z||, u = z / r) compared with C normalised targets y_c,
the GGN of the loss w.r.t. z is ``s^2 J M J^T`` with ``J = (I - u u^T) / r`` and

- InfoNCE: ``M = sum_c p_c y_c y_c^T - m m^T``, ``p = softmax(s u^T y)``, ``m = sum_c p_c y_c``;
- SigLIP:  ``M = sum_c w_c y_c y_c^T``, ``w_c = sigma(l_c) (1 - sigma(l_c))``, ``l_c = s u^T y_c + beta``.

Summed over a batch of sources this never needs a per-source D x D matrix: with ``v = M u``,
``J M J^T = (M - u w^T - w u^T) / r^2`` where ``w = v - (u^T v / 2) u``; every piece is a product of
per-source vectors, plus ``Y^T diag(q) Y`` for the summed weights ``q``. Per chunk of b sources the work is
the b x C logits and one [2b, C] x [C, D] product (InfoNCE: the softmax weights and the weights times the
logits, stacked; SigLIP needs only the latter, the diagonals add one weights x Y^2 product), all in the input
dtype, as are the O(b D) per-source algebra and the chunk's O(b D^2) GEMM; only the sums across chunks
(and the final C-row Gram product's accumulation) are float64. Sources are processed in row chunks so that
one [chunk, C] block stays within ``LOGITS_BUDGET_BYTES`` and ``MAX_CHUNK_ROWS`` (on CUDA within
``CUDA_LOGITS_BUDGET_BYTES``, without a row cap); two such blocks are live at a
time.

InfoNCE is evaluated around the arg-max target t (exactly the same algebra, since the arg-max term of
``sum_c p_c (y_c - t)(y_c - t)^T`` vanishes): with CLIP's scale the softmax is nearly one-hot, and
``sum_c p_c y_c y_c^T - m m^T`` would then be a small difference of O(1) float32 quantities, while around t
every term is of the size of the result.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from ..validation import check_finite, check_positive_int

__all__ = [
    "infonce_hessian",
    "infonce_hessian_diagonals",
    "naive_infonce_hessian",
    "siglip_hessian",
    "siglip_hessian_diagonals",
]

# Bytes of one [chunk, C] logits block; the working set is about two such blocks.
LOGITS_BUDGET_BYTES = 256 * 2**20
# Row cap: the elementwise passes over a chunk run faster on blocks that stay cache-resident (quiet 2-core
# CPU, C = 4096: 1024 rows 0.386 s against 0.441 s for one 4096-row block; C = 16384: 5.7 s against 5.9 s).
MAX_CHUNK_ROWS = 1024
# On a GPU there is no cache to stay in, and every chunk costs some 25 kernel launches: larger blocks and
# no row cap (C = 32,768: 8 chunks of 4,096 rows, about 1 GiB of GPU memory).
CUDA_LOGITS_BUDGET_BYTES = 512 * 2**20

_F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------


def _check_matrix(x: Tensor, name: str) -> Tensor:
    """Validate a [rows, D] embedding matrix; return its row norms in float64."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D [rows, D], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    # in row blocks, so that no float64 copy of a large source matrix is ever held
    step = max(1, 2**24 // x.shape[1])
    norms = torch.cat(
        [
            torch.linalg.vector_norm(x[i : i + step].detach().to(_F64), dim=1)
            for i in range(0, x.shape[0], step)
        ]
    )
    # A NaN/Inf entry makes its row norm non-finite, so one pass over x checks both.
    bad = ~torch.isfinite(norms.reciprocal().square()) | ~torch.isfinite(norms)
    if bool(bad.any()):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} has {int(bad.sum())} row(s) with zero (or under/overflowing) norm "
            f"(first: row {row}, norm {float(norms[row])}); cannot normalise"
        )
    return norms


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None:
        check_positive_int("chunk_size", chunk_size)


@dataclass
class _Problem:
    source: Tensor  # [B, D], as given (detached)
    r: Tensor  # [B] float64 source norms
    y: Tensor  # [C, D] normalised targets in the compute dtype
    s: float  # exp(logit_scale)
    bias: float
    chunk: int

    @property
    def dtype(self) -> torch.dtype:
        return self.y.dtype


def _problem(
    source: Tensor,
    target: Tensor,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor | None,
    chunk_size: int | None,
) -> _Problem:
    r = _check_matrix(source, "source")
    t_norm = _check_matrix(target, "target")
    if source.shape[1] != target.shape[1]:
        raise ValueError(
            f"source and target embedding dims differ: source D={source.shape[1]}, target D={target.shape[1]}"
        )
    if source.device != target.device:
        raise ValueError(f"source is on {source.device} but target is on {target.device}")
    log_s = check_finite("logit_scale", logit_scale)
    bias = 0.0 if logit_bias is None else check_finite("logit_bias", logit_bias)
    _check_chunk_size(chunk_size)

    dtype = torch.promote_types(source.dtype, target.dtype)
    if dtype not in (torch.float32, _F64):
        dtype = torch.float32  # half precision is too coarse for the weights, and slow on CPU
    s = math.exp(log_s) if log_s < 710 else math.inf
    if not math.isfinite(s) or s * (1 + abs(bias)) > torch.finfo(dtype).max / 4:
        raise ValueError(f"logit_scale={log_s} is too large: exp(logit_scale) overflows {dtype}")

    y = (target.detach().to(_F64) / t_norm[:, None]).to(dtype)
    n_rows, n_targets = source.shape[0], target.shape[0]
    if chunk_size is None:
        itemsize = torch.finfo(dtype).bits // 8
        if y.device.type == "cuda":
            chunk_size = max(1, CUDA_LOGITS_BUDGET_BYTES // (n_targets * itemsize))
        else:
            chunk_size = max(1, min(MAX_CHUNK_ROWS, LOGITS_BUDGET_BYTES // (n_targets * itemsize)))
    return _Problem(source.detach(), r, y, s, bias, min(int(chunk_size), n_rows))


# ----------------------------------------------------------------------------------------------------------
# per-chunk statistics
# ----------------------------------------------------------------------------------------------------------
#
# For one source, with v = M u and w = v - (u^T v / 2) u, J M J^T = rho (M - u w^T - w u^T), rho = 1 / r^2.
# InfoNCE writes M around the arg-max target t = y_i: with p' the softmax without entry i, sigma' = sum p',
# k = Y^T p', n = k - sigma' t (= m - t) and a = k - sigma' t / 2,
#     M = sum_c p'_c (y_c - t)(y_c - t)^T - n n^T = Y^T diag(p') Y - a t^T - t a^T - n n^T.
# So sum_b J_b M_b J_b^T = Y^T diag(q) Y - sym(sum_b rho_b (w_b u_b^T + a_b t_b^T + n_b n_b^T / 2)), with
# q = sum_b rho_b p'_b and sym(X) = X + X^T; SigLIP is the same without the (a, t) and n terms. With
# p_t = 1 - sigma', sym(a t^T + n n^T / 2) = sym(g f^T) for g = n + (1 + sqrt(p_t)) t and
# f = (n + (1 - sqrt(p_t)) t) / 2, so InfoNCE too needs 2 rows per source: 2 B + C rows of GEMM in all, per
# chunk in the compute dtype, summed over chunks in float64.


@dataclass
class _Chunk:
    """Quantities of one chunk of b sources (q float64; lhs, rhs in the compute dtype; diag float64)."""

    q: Tensor  # [C] this chunk's sum_b rho_b p'_b
    # sum path: rows of the D x D update -sym(lhs^T rhs), i.e. [g; w] against rho [f; u] (SigLIP: w, rho u)
    lhs: Tensor | None = None
    rhs: Tensor | None = None
    diag: Tensor | None = None  # [b, D] diagonals of J_b M_b J_b^T (without s^2), when requested


def _scaled_sources(pb: _Problem, start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
    """u (float64), s * u in the compute dtype, and rho = 1 / r^2 for sources [start, stop)."""
    r = pb.r[start:stop]
    u = pb.source[start:stop].to(_F64) / r[:, None]
    return u, (u * pb.s).to(pb.dtype), r.pow(-2)


def _exp_floor(dtype: torch.dtype, device: torch.device) -> float | None:
    """Lowest Delta worth exponentiating: exp of anything below is subnormal or 0 in ``dtype``.

    With CLIP's scale most Delta lie far below it (float32: -87), and subnormal exp outputs are several times
    slower to produce and to multiply. Clamping changes each such weight by less than the smallest normal
    number, i.e. by nothing next to the arg-max weight 1.
    On a GPU, which handles subnormals at full speed, the clamp would only cost a pass: None there.
    """
    if device.type == "cuda":
        return None
    return float(math.ceil(math.log(torch.finfo(dtype).tiny)))


def _infonce_chunks(pb: _Problem, diag: bool) -> Iterator[_Chunk]:
    # Everything per chunk runs in the compute dtype: the [b, D] algebra and the D x D products of the chunk
    # are O(b D) and O(b D^2) next to the O(b C D) target products, and float32 there adds only rounding of
    # the size of the float32 logits' own. Only the sums across chunks are float64 (in _sum_hessian).
    source, y, dtype, s = pb.source, pb.y, pb.dtype, pb.s
    y_sq = y.square() if diag else None
    # One buffer, reused across chunks (fresh pages cost as much as a pass over them), holds [E; E * Delta]
    # so that both target products are a single matmul.
    exp_floor = _exp_floor(dtype, y.device)
    work = torch.empty(2 * pb.chunk, y.shape[0], dtype=dtype, device=y.device)
    for start in range(0, source.shape[0], pb.chunk):
        stop = min(start + pb.chunk, source.shape[0])
        b = stop - start
        r = pb.r[start:stop]
        rho = r.pow(-2)
        u = source[start:stop].to(dtype) * r.reciprocal().to(dtype)[:, None]

        buf = work[: 2 * b]
        e, delta = buf[:b], buf[b:]
        delta.addmm_(u, y.T, beta=0.0, alpha=s)  # logits s u^T y
        lmax, idx = delta.max(dim=1)
        delta.sub_(lmax[:, None])  # Delta = l - l* <= 0: a stable softmax
        if exp_floor is not None:
            delta.clamp_min_(exp_floor)  # keeps exp (and all that reads it) off subnormals: see _exp_floor
        torch.exp(delta, out=e)
        e.scatter_(1, idx[:, None], 0.0)  # p' (unnormalised): the softmax without the arg-max entry
        e_sum = e.sum(dim=1).to(_F64)
        inv_z = 1.0 / (1.0 + e_sum)  # 1 / softmax normaliser
        q = ((rho * inv_z).to(dtype) @ e).to(_F64)
        e2 = (e @ y_sq).mul_(inv_z.to(dtype)[:, None]) if diag else None
        delta.mul_(e)
        ed_sum = delta.sum(dim=1).to(_F64)
        prods = buf @ y

        k = prods[:b].mul_(inv_z.to(dtype)[:, None])  # Y^T p'
        h = prods[b:].mul_((inv_z / s).to(dtype)[:, None])  # sum_c p'_c (u^T (y_c - t)) y_c
        sig64 = e_sum * inv_z  # sigma' = 1 - p_t
        sig = sig64.to(dtype)[:, None]
        pd = (ed_sum * (inv_z / s)).to(dtype)[:, None]  # sum_c p'_c u^T (y_c - t)
        t = y.index_select(0, idx)

        n = k.addcmul_(sig, t, value=-1.0)  # m - t
        w = h.addcmul_(pd, t, value=-1.0)  # v = M u = h - pd t - (n^T u) n
        w.addcmul_(torch.linalg.vecdot(n, u)[:, None], n, value=-1.0)
        w.addcmul_(torch.linalg.vecdot(u, w)[:, None], u, value=-0.5)
        rho_c = rho.to(dtype)[:, None]
        if diag:
            a = torch.addcmul(n, sig, t, value=0.5)
            d = e2.addcmul_(u, w, value=-2.0).addcmul_(a, t, value=-2.0).addcmul_(n, n, value=-1.0)
            yield _Chunk(q=q, diag=d.to(_F64).mul_(rho[:, None]))
        else:
            # n n^T + a t^T + t a^T (a = n + sigma' t / 2) = g f^T + f g^T with g = n + (1 + sqrt(p_t)) t and
            # f = (n + (1 - sqrt(p_t)) t) / 2, so the (a, t) terms need no scatter over the targets.
            root = inv_z.sqrt()
            beta = (sig64 / (1.0 + root)).to(dtype)[:, None]  # 1 - sqrt(p_t), without cancellation
            rhs = torch.empty_like(prods)
            torch.mul(u, rho_c, out=rhs[b:])
            torch.addcmul(n, beta, t, out=rhs[:b]).mul_(0.5 * rho_c)
            n.addcmul_((1.0 + root).to(dtype)[:, None], t)
            yield _Chunk(q=q, lhs=prods, rhs=rhs)


def _siglip_chunks(pb: _Problem, diag: bool) -> Iterator[_Chunk]:
    source, y, dtype, s = pb.source, pb.y, pb.dtype, pb.s
    y_sq = y.square() if diag else None
    work = torch.empty(2 * pb.chunk, y.shape[0], dtype=dtype, device=y.device)  # reused across chunks
    for start in range(0, source.shape[0], pb.chunk):
        stop = min(start + pb.chunk, source.shape[0])
        b = stop - start
        u, us, rho = _scaled_sources(pb, start, stop)

        g, wt = work[:b], work[b : 2 * b]
        torch.matmul(us, y.T, out=g)  # logits without the bias
        torch.add(g, pb.bias, out=wt)
        # sigma(l)(1 - sigma(l)) = x (1 - x) with x = sigma(-|l|) <= 1/2: no cancellation in 1 - x.
        wt.abs_().neg_().sigmoid_()
        wt.addcmul_(wt, wt, value=-1.0)
        q = (rho.to(dtype) @ wt).to(_F64)
        e2 = (wt @ y_sq).to(_F64) if diag else None
        g.mul_(wt)
        w = (g @ y).to(_F64).div_(s)  # v = M u = sum_c w_c (u^T y_c) y_c
        w.addcmul_(torch.einsum("bd,bd->b", u, w)[:, None], u, value=-0.5)
        if diag:
            yield _Chunk(q=q, diag=e2.addcmul_(u, w, value=-2.0).mul_(rho[:, None]))
        else:
            yield _Chunk(q=q, lhs=w, rhs=u.mul_(rho[:, None]))


# ----------------------------------------------------------------------------------------------------------
# assembly
# ----------------------------------------------------------------------------------------------------------


def _sum_hessian(pb: _Problem, chunks: Iterator[_Chunk]) -> Tensor:
    y = pb.y
    q = torch.zeros(y.shape[0], dtype=_F64, device=y.device)
    acc = torch.zeros(y.shape[1], y.shape[1], dtype=_F64, device=y.device)
    for ch in chunks:
        q += ch.q
        # the chunk's D x D product in its own dtype; the sum over chunks in float64
        acc.sub_(torch.mm(ch.lhs.T, ch.rhs))
    acc.add_(torch.mm(y.T, y * (0.5 * q).to(y.dtype)[:, None]))
    return pb.s**2 * (acc + acc.T)


def _diagonals(pb: _Problem, chunks: Iterator[_Chunk]) -> Tensor:
    return torch.cat([ch.diag for ch in chunks]).mul_(pb.s**2)


# ----------------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------------


def infonce_hessian(
    source: Tensor, target: Tensor, logit_scale: float | Tensor, *, chunk_size: int | None = None
) -> Tensor:
    """Sum over the rows z_b of ``source`` of the InfoNCE GGN w.r.t. the unnormalised embedding z_b.

    ``source`` is [B, D] (unnormalised), ``target`` [C, D] (normalised here); the softmax runs over all C
    targets with multiplier ``exp(logit_scale)`` (open_clip's log scale). The GGN does not depend on the
    label. The C x D products run in the input dtype; the D x D sums in float64. Sources are processed in
    chunks of ``chunk_size`` rows (default: at most 1024 rows and about 256 MiB of logits). Returns a symmetric float64 [D, D].
    """
    pb = _problem(source, target, logit_scale, None, chunk_size)
    return _sum_hessian(pb, _infonce_chunks(pb, diag=False))


def siglip_hessian(
    source: Tensor,
    target: Tensor,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Sum over all B x C pairs of the SigLIP (sigmoid loss) GGN w.r.t. the unnormalised source embedding.

    Logits are ``exp(logit_scale) u_b^T y_c + logit_bias``; the GGN weight sigma(l)(1 - sigma(l)) is the
    same for positive and negative labels, so no label matrix is needed. Returns a symmetric float64 [D, D].
    """
    pb = _problem(source, target, logit_scale, logit_bias, chunk_size)
    return _sum_hessian(pb, _siglip_chunks(pb, diag=False))


def infonce_hessian_diagonals(
    source: Tensor, target: Tensor, logit_scale: float | Tensor, *, chunk_size: int | None = None
) -> Tensor:
    """Per-source diagonals [B, D] (float64) of the InfoNCE GGNs summed by :func:`infonce_hessian`."""
    pb = _problem(source, target, logit_scale, None, chunk_size)
    return _diagonals(pb, _infonce_chunks(pb, diag=True))


def siglip_hessian_diagonals(
    source: Tensor,
    target: Tensor,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor,
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Per-source diagonals [B, D] (float64) of the SigLIP GGNs summed by :func:`siglip_hessian`."""
    pb = _problem(source, target, logit_scale, logit_bias, chunk_size)
    return _diagonals(pb, _siglip_chunks(pb, diag=True))


def naive_infonce_hessian(
    source: Tensor, target: Tensor, logit_scale: float | Tensor, group: int = 5
) -> Tensor:
    """The published per-source algorithm: an explicit [group, D, D] ``s^2 J M J^T`` per group of sources.

    Costs O(B C D^2); kept as a benchmark baseline and a second reference for tests. Returns float64 [D, D].
    """
    pb = _problem(source, target, logit_scale, None, None)
    check_positive_int("group", group)
    y, dtype, s = pb.y, pb.dtype, pb.s
    dim = y.shape[1]
    eye = torch.eye(dim, dtype=dtype, device=y.device)
    acc = torch.zeros(dim, dim, dtype=_F64, device=y.device)
    for start in range(0, pb.source.shape[0], group):
        z = pb.source[start : start + group].to(dtype)
        r = torch.linalg.vector_norm(z, dim=1)
        u = z / r[:, None]
        p = torch.softmax(s * (u @ y.T), dim=1)
        m = p @ y
        mid = torch.einsum("gc,cd,ce->gde", p, y, y) - m[:, :, None] * m[:, None, :]
        jac = (eye - u[:, :, None] * u[:, None, :]) / r[:, None, None]
        acc += (s**2 * (jac @ mid @ jac.transpose(1, 2))).sum(dim=0).to(_F64)
    return (acc + acc.T) / 2
