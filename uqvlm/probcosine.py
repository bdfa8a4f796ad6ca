"""ProbCosine: moments of the cosine similarity of two independent diagonal Gaussians (method.md §5),
and the predictive distributions built on Gaussian logits.

The closed form is exact for the moments of g^T h / sqrt(S_g S_h) with S = E||.||^2 (the cosine with
both norms replaced by their root mean square); for the cosine itself it is the paper's approximation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["probcosine", "probcosine_logits", "probit_probs", "mc_probs"]


def _check_matrix(name: str, x: Tensor, ndim: int = 2) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")


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


def probit_probs(mean_logits: Tensor, var_logits: Tensor) -> Tensor:
    """Probit-approximated predictive softmax(mean / sqrt(1 + pi/8 var)) over the last dimension."""
    _check_logits(mean_logits, var_logits)
    dtype = torch.promote_types(mean_logits.dtype, var_logits.dtype)
    kappa = torch.rsqrt(1.0 + (math.pi / 8.0) * var_logits.to(dtype))
    return torch.softmax(mean_logits.to(dtype) * kappa, dim=-1)


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
    _check_logits(mean_logits, var_logits)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    if max_elements < 1:
        raise ValueError(f"max_elements must be positive, got {max_elements}")
    dtype = torch.promote_types(mean_logits.dtype, var_logits.dtype)
    mean = mean_logits.to(dtype)
    std = var_logits.to(dtype).sqrt()
    chunk = max(1, min(samples, max_elements // max(1, mean.numel())))
    # Accumulate in float64 so averaging many chunks does not lose float32 precision.
    total = torch.zeros(mean.shape, dtype=torch.float64, device=mean.device)
    done = 0
    while done < samples:
        m = min(chunk, samples - done)
        eps = torch.randn((m, *mean.shape), generator=generator, dtype=dtype, device=mean.device)
        total += torch.softmax(mean + std * eps, dim=-1).sum(0, dtype=torch.float64)
        done += m
    return (total / samples).to(dtype)
