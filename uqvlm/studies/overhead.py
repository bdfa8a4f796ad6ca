"""Computational overhead of the BayesVLM predictive over the deterministic model (paper: < 5% runtime,
< 0.11% GFLOPs).

Two kinds of work, counted separately because they are measured differently:

- **matmul FLOPs**, counted by :class:`torch.utils.flop_counter.FlopCounterMode` while the real code
  runs. It counts only matmul-like ops (mm, addmm, bmm, convolution, attention kernels; 2*m*n*k per
  [m, k] x [k, n] product, bias adds not included). Every other op (elementwise, reductions,
  softmax, matrix-vector products, eigendecompositions) counts 0.
- **elementwise ops**, which that counter misses but which are most of the predictive's extra work
  (the probit rescaling runs over every [N, K] logit). :func:`count_elementwise` measures them with a
  dispatch mode: one op per element of the largest operand of every non-matmul, non-view aten op (a
  fused op such as log_softmax counts once per element though it does several arithmetic operations
  per element; a matrix-vector product counts its matrix's elements once, not 2x). The leading [N, K]
  term is also given by formula (:data:`NK_PASSES`), checked against the measurement in the tests.

Encoders are counted with the attention math path forced (torch's fused attention kernels on CPU and
``nn.MultiheadAttention``'s fast path are invisible to the flop counter) so attention is included.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from uqvlm.features import Features
from uqvlm.laplace.kfac import KFACPosterior
from uqvlm.methods import BayesVLM, cosine_logits

__all__ = [
    "NK_PASSES",
    "PredictiveCost",
    "bayesvlm_log_probs",
    "count_elementwise",
    "count_flops",
    "encoder_flops",
    "map_log_probs",
    "overhead_summary",
    "per_image_overhead",
    "plot_overhead",
    "predictive_costs",
    "synthetic_kfac_inputs",
    "time_call",
]

# Passes over an [N, K] array per predictive, in the unit of count_elementwise (one per element per aten
# op, so the count follows the code as dispatched):
# MAP (cosine_logits + log_softmax): scale, + bias, log_softmax = 3.
# BayesVLM KFAC + probit (methods.BayesVLM.log_probs -> probcosine.probit_log_probs_rank1, fused): the
#   mean logits are a matmul (FlopCounterMode's) written into the output; then per row chunk 1 + the
#   rank-2 variance (addcmul, addcmul_) = 2, rsqrt = 1, * mean = 1, log_softmax = 1: 5 passes, + 1 with a
#   logit bias; the inputs are checked once, on O(N D + K D) tensors. The counter also counts the two
#   allocations, the output and the chunk buffer (no pass over memory; the buffer is N x K only while
#   N is below a chunk): 7 without a logit bias, as the tests measure. (Before the fused predictive of
#   issue 13: 20, with 12 passes of input checks on the [N, K] moments and the variance as a matmul.)
NK_PASSES = {"map": 3, "bayesvlm": 7}


# ----------------------------------------------------------------------------------------- counting


def count_flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Matmul-like FLOPs of ``fn(*args, **kwargs)`` by FlopCounterMode (elementwise ops count 0)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


class _ElementCounter(TorchDispatchMode):
    """Counts, per non-matmul, non-view aten op, the element count of its largest tensor operand."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket not in flop_registry and not func.is_view:
            leaves, _ = tree_flatten((args, kwargs, out))
            self.total += max((t.numel() for t in leaves if isinstance(t, Tensor)), default=0)
        return out


def count_elementwise(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """Elementwise ops of ``fn(*args, **kwargs)``: for every aten op that FlopCounterMode does not count
    and that is not a view, the number of elements of its largest tensor operand (input or output).

    So ``a * b`` on [N, K] counts N*K, ``x.sum(1)`` on [N, D] counts N*D, a dtype copy counts its size.
    """
    with _ElementCounter() as counter:
        fn(*args, **kwargs)
    return counter.total


# ----------------------------------------------------------------------------- the two predictives


def map_log_probs(image: Features, text: Features, logit_scale: float, logit_bias: float | None) -> Tensor:
    """The deterministic predictive exactly as :class:`uqvlm.methods.MAP` computes it."""
    return cosine_logits(image.embeddings, text.embeddings, logit_scale, logit_bias).log_softmax(-1)


def bayesvlm_log_probs(
    image: Features,
    text: Features,
    posts: dict[str, Any],
    logit_scale: float,
    logit_bias: float | None,
    predictive: str = "probit",
) -> Tensor:
    """The BayesVLM predictive through :meth:`uqvlm.methods.BayesVLM.log_probs` itself (the KFAC
    rank-one path when both posteriors have ``variance_factors``), with the prior already set."""
    ctx = SimpleNamespace(text=text, logit_scale=logit_scale, logit_bias=logit_bias)
    return BayesVLM(structure="kfac", predictive=predictive).log_probs(ctx, image, posts)


def _random_psd(dim: int, generator: torch.Generator) -> Tensor:
    x = torch.randn(dim, 2 * dim, generator=generator, dtype=torch.float64)
    return x @ x.T / (2 * dim)


def synthetic_kfac_inputs(
    n_images: int,
    n_classes: int,
    embed_dim: int,
    image_in: int,
    text_in: int,
    *,
    image_bias: bool = False,
    text_bias: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """Random cached features (float32, as the feature cache stores them) and fitted KFAC posteriors of
    the given sizes: costs depend on shapes only. Returns image, text (Features) and posts."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"posts": {}}
    for tower, rows, p, bias in (
        ("image", n_images, image_in, image_bias),
        ("text", n_classes, text_in, text_bias),
    ):
        weight = torch.randn(embed_dim, p, generator=g) / math.sqrt(p)
        b = torch.randn(embed_dim, generator=g) if bias else None
        act = torch.randn(rows, p, generator=g)
        emb = act @ weight.T + (b if b is not None else 0.0)
        out[tower] = Features(act.to(device), emb.to(device))
        post = KFACPosterior.from_factors(
            _random_psd(p + int(bias), g), _random_psd(embed_dim, g), weight=weight, bias=b, n=10.0
        )
        out["posts"][tower] = post.to(device)
    return out


@dataclass(frozen=True)
class PredictiveCost:
    """Work of one predictive for ``n_images`` x ``n_classes`` on cached features.

    matmul_flops: FlopCounterMode; elementwise_ops: :func:`count_elementwise` (all sizes);
    elementwise_ops_nk: the [N, K] part by formula, ``NK_PASSES[method] * N * K``.
    """

    method: str
    n_images: int
    n_classes: int
    matmul_flops: int
    elementwise_ops: int
    elementwise_ops_nk: int


def predictive_costs(
    n_images: int,
    n_classes: int,
    embed_dim: int,
    image_in: int,
    text_in: int,
    *,
    image_bias: bool = False,
    text_bias: bool = False,
    logit_bias: float | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, PredictiveCost]:
    """Counted cost of MAP and of BayesVLM (KFAC, probit) for N images x K classes with embedding dim D
    and last-layer input dims ``image_in`` / ``text_in`` (p, q; + 1 each with a bias).

    BayesVLM's matmuls: the mean cosine 2*N*D*K, a^T A~^-1 a via the eigenbasis projection 2*N*p'^2
    (+ 2*p'^2 for the one-row probe that returns diag B~^-1) and the same for the K class prompts (the
    rank-2 variance is elementwise, fused into the probit pass). MAP: 2*N*D*K.
    """
    inputs = synthetic_kfac_inputs(
        n_images,
        n_classes,
        embed_dim,
        image_in,
        text_in,
        image_bias=image_bias,
        text_bias=text_bias,
        device=device,
    )
    image, text, posts = inputs["image"], inputs["text"], inputs["posts"]
    scale = math.log(100.0)
    runs = {
        "map": lambda: map_log_probs(image, text, scale, logit_bias),
        "bayesvlm": lambda: bayesvlm_log_probs(image, text, posts, scale, logit_bias),
    }
    return {
        name: PredictiveCost(
            method=name,
            n_images=n_images,
            n_classes=n_classes,
            matmul_flops=count_flops(fn),
            elementwise_ops=count_elementwise(fn),
            elementwise_ops_nk=NK_PASSES[name] * n_images * n_classes,
        )
        for name, fn in runs.items()
    }


# -------------------------------------------------------------------------------------- encoders


@contextlib.contextmanager
def _countable_attention() -> Iterator[None]:
    """nn.MultiheadAttention's fused fast path and SDPA's fused kernels are invisible to (or, on CPU,
    not registered with) the flop counter; the math path runs attention as countable bmm's."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _image_size(model: torch.nn.Module) -> tuple[int, int]:
    size = getattr(model.visual, "image_size", None)
    if size is None:
        raise ValueError(f"{type(model.visual).__name__} has no image_size: cannot build an input to count")
    return (size, size) if isinstance(size, int) else tuple(size)


def _context_length(model: torch.nn.Module) -> int:
    length = getattr(model, "context_length", None) or getattr(
        getattr(model, "text", None), "context_length", None
    )
    if not length:
        raise ValueError(f"{type(model).__name__} has no context_length: cannot build an input to count")
    return int(length)


@torch.no_grad()
def encoder_flops(vlm: Any, batch: int = 1) -> dict[str, int]:
    """Matmul FLOPs of one forward of each tower on ``batch`` inputs (a zero image at the model's input
    size; a full-length token sequence), in fp32 on the model's device: {"image": ..., "text": ...}.

    ``vlm`` is a :class:`uqvlm.models.VLM` (random init is fine: FLOPs depend on shapes only).
    """
    model = vlm.model
    device = next(model.parameters()).device
    h, w = _image_size(model)
    pixels = torch.zeros(batch, 3, h, w, device=device)
    tokens = torch.zeros(batch, _context_length(model), dtype=torch.long, device=device)
    # The counter's module tracker hooks the gradient of every module input that requires one; a view of
    # a parameter made under no_grad (SigLIP's attention-pool latent, expanded) requires one but has no
    # grad_fn, which the tracker refuses. Nothing requires a gradient while counting.
    grads = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grads:
            p.requires_grad_(False)
        with _countable_attention():
            return {
                "image": count_flops(model.encode_image, pixels),
                "text": count_flops(model.encode_text, tokens),
            }
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------- summary


def overhead_summary(encoder: dict[str, int], costs: dict[str, PredictiveCost]) -> dict[str, float]:
    """Extra work of BayesVLM over MAP for the whole zero-shot pipeline of one evaluation: N images and K
    class prompts encoded once (``encoder`` per input, from :func:`encoder_flops` with batch 1) plus
    the predictive.

    flops_overhead: extra matmul FLOPs / the deterministic pipeline's matmul FLOPs.
    flops_overhead_with_elementwise: (extra matmul FLOPs + extra elementwise ops) / the same denominator;
    an upper bound, since the encoders' own elementwise work is not in the denominator.
    """
    m, b = costs["map"], costs["bayesvlm"]
    if (m.n_images, m.n_classes) != (b.n_images, b.n_classes):
        raise ValueError("costs['map'] and costs['bayesvlm'] were counted for different N x K")
    base = m.n_images * encoder["image"] + m.n_classes * encoder["text"] + m.matmul_flops
    extra_matmul = b.matmul_flops - m.matmul_flops
    extra_elementwise = b.elementwise_ops - m.elementwise_ops
    return {
        "pipeline_flops_map": float(base),
        "extra_matmul_flops": float(extra_matmul),
        "extra_elementwise_ops": float(extra_elementwise),
        "flops_overhead": extra_matmul / base,
        "flops_overhead_with_elementwise": (extra_matmul + extra_elementwise) / base,
    }


def per_image_overhead(
    image_encoder_flops: int, costs: dict[str, PredictiveCost], more: dict[str, PredictiveCost]
) -> float:
    """Extra matmul FLOPs of BayesVLM per additional image, over MAP's per image (encoder + predictive):
    the steady state of a long evaluation, where the K class prompts' costs (their encoding and, for
    BayesVLM, their variances) are paid once. From the costs at two batch sizes with the same K (the
    cost is affine in N)."""
    if (
        costs["map"].n_classes != more["map"].n_classes
        or costs["bayesvlm"].n_classes != more["map"].n_classes
    ):
        raise ValueError("costs and more must be counted for the same K")
    images = more["map"].n_images - costs["map"].n_images
    if images <= 0 or more["bayesvlm"].n_images - costs["bayesvlm"].n_images != images:
        raise ValueError("more must be counted for more images than costs, the same for both methods")
    map_per = more["map"].matmul_flops - costs["map"].matmul_flops
    bayes_per = more["bayesvlm"].matmul_flops - costs["bayesvlm"].matmul_flops
    return (bayes_per - map_per) / (images * image_encoder_flops + map_per)


# ---------------------------------------------------------------------------------------- timing


def time_call(
    fn: Callable[[], Any], repeats: int = 10, device: torch.device | str | None = None, warmup: int = 1
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` untimed ones.

    On a CUDA device the GPU is synchronised before and after each call, so queued kernels are timed.
    For study outputs only: never assert on it.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ---------------------------------------------------------------------------------------- figure


def plot_overhead(
    rows: Sequence[Mapping[str, Any]],
    path: Path,
    bounds: tuple[float, float] = (0.0011, 0.05),
    title: str = "",
) -> Path:
    """Two panels of grouped bars, one group per model and one bar per K: the extra matmul FLOPs of the
    BayesVLM pipeline (``flops_overhead``, log scale) and its extra wall time end to end from pixels
    (``runtime_overhead``), both in percent of the deterministic pipeline's, with the paper's bounds
    (``bounds``: FLOPs, runtime, as fractions) dashed. ``rows``: dicts with ``model``, ``classes`` and
    those two columns."""
    from uqvlm.plots import _save, plt

    models = list(dict.fromkeys(str(r["model"]) for r in rows))
    ks = sorted({int(r["classes"]) for r in rows})
    width = 0.8 / len(ks)
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(models) + 3.0), 3.4))
    for ax, key, bound, label in (
        (axes[0], "flops_overhead", bounds[0], "extra FLOPs (%)"),
        (axes[1], "runtime_overhead", bounds[1], "extra wall time from pixels (%)"),
    ):
        for j, k in enumerate(ks):
            values = [
                next((100 * float(r[key]) for r in rows if r["model"] == m and int(r["classes"]) == k), 0.0)
                for m in models
            ]
            ax.bar(
                [i + (j - (len(ks) - 1) / 2) * width for i in range(len(models))],
                values,
                width,
                label=f"K={k}",
            )
        ax.axhline(100 * bound, color="tab:red", linestyle="--", linewidth=1, label="paper's bound")
        ax.set_xticks(range(len(models)), models, rotation=20, fontsize=7)
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)
