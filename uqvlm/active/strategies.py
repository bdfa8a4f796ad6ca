"""Selection strategies (method.md section 7): which pool points to label, given a budget.

Every strategy draws its randomness from its own generator seeded by ``(seed, strategy)`` and never
mutates the shared posteriors (EPIG's greedy updates act on copies), so selections do not depend on which
strategies ran before. A selection for budget B is the prefix of the one for any larger budget.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from uqvlm.active.acquisition import (
    MAX_ELEMENTS,
    assign_nearest_unused,
    bald,
    entropy,
    epig,
    epig_upper_bound,
    joint_sample_probs,
    sampled_embeddings,
)
from uqvlm.features import Features
from uqvlm.laplace import DiagPosterior, KFACPosterior
from uqvlm.laplace.base import LastLayerPosterior
from uqvlm.methods import cosine_logits

__all__ = [
    "STRATEGIES",
    "AcquisitionConfig",
    "ActiveProblem",
    "Selection",
    "add_curvature",
    "greedy_epig",
    "make_generator",
    "select",
]

STRATEGIES = ("random", "random-targeted", "entropy", "entropy-targeted", "bald", "epig")


def make_generator(seed: int, *parts: str) -> torch.Generator:
    """A CPU generator seeded by a stable hash of ``(seed, *parts)`` (Python's hash() is salted)."""
    digest = hashlib.blake2b(repr((int(seed), *parts)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


@dataclass
class AcquisitionConfig:
    """Knobs of the strategies; see configs/task/active_learning.yaml."""

    samples: int = 100
    k_nearest: int = 1
    distance: str = "wasserstein"
    epig_candidates: str = "targeted"
    epig_lazy: bool = True
    epig_batch: int = 16
    epig_update_scale: int = 1
    epig_dtype: torch.dtype = torch.float32
    max_elements: int = MAX_ELEMENTS


@dataclass
class ActiveProblem:
    """Unlabelled pool and target inputs, class text features, and the fitted posteriors (never mutated)."""

    pool: Features
    target: Features
    text: Features
    logit_scale: float
    logit_bias: float | None
    image_post: LastLayerPosterior
    text_post: LastLayerPosterior

    def map_probs(self, image: Features) -> Tensor:
        return cosine_logits(
            image.embeddings, self.text.embeddings, self.logit_scale, self.logit_bias
        ).softmax(-1)

    @cached_property
    def pool_gaussians(self) -> tuple[Tensor, Tensor]:
        """Mean and diagonal variance of the pool's image embeddings under the image posterior."""
        return self.pool.embeddings.double(), self.image_post.embedding_variance(
            self.pool.activations
        ).double()

    @cached_property
    def target_gaussians(self) -> tuple[Tensor, Tensor]:
        return self.target.embeddings.double(), self.image_post.embedding_variance(
            self.target.activations
        ).double()

    def likelihood(self) -> str:
        return "siglip" if self.logit_bias is not None else "infonce"


@dataclass
class Selection:
    """Pool indices in acquisition order; ``scores`` of each pick where the strategy has one;
    ``queries``: the target point each pick was mapped from (targeted strategies)."""

    indices: Tensor
    scores: Tensor | None = None
    queries: Tensor | None = None

    def prefix(self, budget: int) -> Selection:
        def cut(x: Tensor | None) -> Tensor | None:
            return None if x is None else x[:budget]

        return Selection(self.indices[:budget], cut(self.scores), cut(self.queries))


# ------------------------------------------------------------------------------------------- posterior update


def add_curvature(
    post: LastLayerPosterior,
    activation: Tensor,
    embedding: Tensor,
    class_embeddings: Tensor,
    logit_scale: float,
    logit_bias: float | None = None,
    *,
    scale: int = 1,
    num_data: int | None = None,
) -> LastLayerPosterior:
    """A NEW posterior with one more (label-free) data point's curvature; ``post`` is left untouched.

    The point's output GGN H is that of the softmax (sigmoid for SigLIP) over the K class text embeddings.
    The point counts as ``scale`` data points (``scale`` copies of it), so the posterior equals the one
    ``update`` would build from the Hessian data plus those copies, N included:
    KFAC: A = (sqrt(N) A + scale a a^T) / sqrt(N + scale), B likewise with H (the sums are recovered from
    the 1/sqrt(N)-normalised factors, extended, and renormalised by the new count);
    diagonal: GGN += scale * diag(H) (a * a)^T (a plain sum), N + scale recorded.
    ``a`` is augmented with a 1 when the layer has a bias. ``num_data``: N for a KFAC posterior that does
    not record it.
    """
    from uqvlm.laplace import hessians

    if isinstance(scale, bool) or int(scale) != scale or scale < 1:
        raise ValueError(
            f"scale (the data points an acquired point counts as) must be a positive integer, got {scale!r}"
        )
    scale = int(scale)
    a = activation.detach().double().reshape(-1)
    if post.has_bias:
        a = torch.cat([a, a.new_ones(1)])
    z = embedding.detach().double().reshape(1, -1)
    ll = post.last_layer
    if isinstance(post, KFACPosterior):
        n_data = num_data or post.num_data
        if not n_data:
            raise ValueError("the KFAC posterior does not record N; pass num_data (the Hessian-data size)")
        if logit_bias is None:
            h = hessians.infonce_hessian(z, class_embeddings.double(), logit_scale)
        else:
            h = hessians.siglip_hessian(z, class_embeddings.double(), logit_scale, logit_bias)
        # N grows by `scale`, not 1: A (x) B = (sum a a^T) (x) (sum H) / N is KFAC's expectation
        # approximation over one multiset of data, and the point's `scale` copies belong to the sums and to
        # N alike (update() on the copies gives the same factors).
        root, new_root = math.sqrt(n_data), math.sqrt(n_data + scale)
        a = a.to(post.A.device)
        return KFACPosterior.from_factors(
            (root * post.A + scale * torch.outer(a, a)) / new_root,
            (root * post.B + scale * h.to(post.B.device)) / new_root,
            n_data + scale,
            weight=ll.weight,
            bias=ll.bias,
            n=post.n,
            prior_precision=post.prior_precision,
        )
    if isinstance(post, DiagPosterior):
        if logit_bias is None:
            hd = hessians.infonce_hessian_diagonals(z, class_embeddings.double(), logit_scale)[0]
        else:
            hd = hessians.siglip_hessian_diagonals(z, class_embeddings.double(), logit_scale, logit_bias)[0]
        ggn = post.ggn_diagonal
        return DiagPosterior.from_diagonal(
            ggn + scale * torch.outer(hd.clamp_min(0).to(ggn.device), a.to(ggn.device).square()),
            post.num_data + scale if post.num_data else None,
            weight=ll.weight,
            bias=ll.bias,
            n=post.n,
            prior_precision=post.prior_precision,
        )
    raise TypeError(f"EPIG updates need a KFAC or diagonal posterior, got {type(post).__name__}")


# ----------------------------------------------------------------------------------------------- strategies


def _class_samples(problem: ActiveProblem, samples: int, gen: torch.Generator, dtype: torch.dtype) -> Tensor:
    """[S, K, D] class text embeddings under S text-weight samples."""
    w, b = problem.text_post.sample(samples, generator=gen)
    t = problem.text
    return sampled_embeddings(
        t.activations.to(dtype), w.to(dtype), None if b is None else b.to(dtype), t.residuals
    ).transpose(0, 1)


def _probs(
    problem: ActiveProblem,
    feats: Features,
    rows: Tensor | None,
    w: Tensor,
    b: Tensor | None,
    classes: Tensor,
    cfg: AcquisitionConfig,
) -> Tensor:
    acts = feats.activations if rows is None else feats.activations[rows]
    res = feats.residuals if feats.residuals is None or rows is None else feats.residuals[rows]
    return joint_sample_probs(
        acts.to(w.dtype),
        res,
        w,
        b,
        classes,
        problem.logit_scale,
        problem.logit_bias,
        max_elements=cfg.max_elements,
    )


def _image_samples(
    post: LastLayerPosterior, cfg: AcquisitionConfig, seed: int
) -> tuple[Tensor, Tensor | None]:
    # Re-seeded at every greedy step: common random numbers, so picks differ only by the posterior update.
    w, b = post.sample(cfg.samples, generator=make_generator(seed, "epig", "image"))
    return w.to(cfg.epig_dtype), None if b is None else b.to(cfg.epig_dtype)


def epig_candidates(problem: ActiveProblem, cfg: AcquisitionConfig) -> Tensor:
    """EPIG's candidate pool: ``targeted``: every target point (in index order) takes its k nearest pool
    points not taken yet, so there are min(k M, N) distinct candidates; ``pool``: the whole pool."""
    if cfg.epig_candidates == "pool":
        return torch.arange(len(problem.pool))
    if cfg.epig_candidates != "targeted":
        raise ValueError(f"epig candidates must be 'targeted' or 'pool', got {cfg.epig_candidates!r}")
    count = min(cfg.k_nearest * len(problem.target), len(problem.pool))
    picks, _ = assign_nearest_unused(
        *problem.target_gaussians,
        *problem.pool_gaussians,
        budget=count,
        k=cfg.k_nearest,
        metric=cfg.distance,
        max_elements=cfg.max_elements,
    )
    return torch.sort(picks).values


def greedy_epig(
    problem: ActiveProblem,
    budget: int,
    seed: int,
    cfg: AcquisitionConfig,
    candidates: Tensor | None = None,
) -> Selection:
    """Greedy EPIG with the image posterior updated (on copies) after every pick.

    Lazy evaluation (``cfg.epig_lazy``): every candidate carries a bound, at first the exact
    :func:`epig_upper_bound`, afterwards its last computed score; candidates are re-scored from the highest
    bound down in growing batches, and the best fresh score is taken once it is at least every remaining
    bound. The first pick is exactly greedy; later picks are too as long as a curvature update (which only
    shrinks the posterior) never raises a score. ``epig_lazy=false`` re-scores every candidate at every step.
    """
    cand = epig_candidates(problem, cfg) if candidates is None else candidates.long()
    if budget > len(cand):
        raise ValueError(f"EPIG budget {budget} exceeds its {len(cand)} candidates; raise task.k_nearest")
    classes = _class_samples(problem, cfg.samples, make_generator(seed, "epig", "text"), cfg.epig_dtype)
    post = problem.image_post
    bound = torch.empty(len(cand), dtype=torch.float64)
    free = torch.ones(len(cand), dtype=torch.bool)
    picks: list[int] = []
    scores: list[float] = []
    for step in range(budget):
        w, b = _image_samples(post, cfg, seed)
        t_probs = _probs(problem, problem.target, None, w, b, classes, cfg)

        def fresh(pos: Tensor, w=w, b=b, t_probs=t_probs) -> Tensor:
            p_probs = _probs(problem, problem.pool, cand[pos], w, b, classes, cfg)
            return epig(p_probs, t_probs, dtype=cfg.epig_dtype, max_elements=cfg.max_elements)

        positions = free.nonzero().squeeze(1)
        if not cfg.epig_lazy:
            bound[positions] = fresh(positions)
            best = int(positions[int(torch.argmax(bound[positions]))])
        else:
            if step == 0:
                for rows in torch.split(
                    positions, max(1, cfg.max_elements // (cfg.samples * t_probs.shape[2]))
                ):
                    bound[rows] = epig_upper_bound(
                        _probs(problem, problem.pool, cand[rows], w, b, classes, cfg), t_probs
                    )
            best = _lazy_argmax(bound, positions, fresh, cfg.epig_batch)
        free[best] = False
        picks.append(int(cand[best]))
        scores.append(float(bound[best]))
        if step + 1 < budget:
            i = picks[-1]
            post = add_curvature(
                post,
                problem.pool.activations[i],
                problem.pool.embeddings[i],
                problem.text.embeddings,
                problem.logit_scale,
                problem.logit_bias,
                scale=cfg.epig_update_scale,
            )
    return Selection(torch.tensor(picks, dtype=torch.long), torch.tensor(scores, dtype=torch.float64))


def _lazy_argmax(bound: Tensor, positions: Tensor, fresh, batch: int) -> int:
    """Re-score ``positions`` from the highest ``bound`` down (batches doubling from ``batch``) until the
    best fresh score is at least every bound left; fresh scores are written into ``bound``."""
    order = positions[torch.argsort(bound[positions], descending=True, stable=True)]
    best, best_score, start = -1, -math.inf, 0
    while start < len(order):
        rows = order[start : start + batch]
        bound[rows] = fresh(rows)
        i = int(torch.argmax(bound[rows]))
        if float(bound[rows[i]]) > best_score:
            best, best_score = int(rows[i]), float(bound[rows[i]])
        start += len(rows)
        if start >= len(order) or best_score >= float(bound[order[start:]].max()):
            break
        batch *= 2
    return best


def _targeted(
    problem: ActiveProblem, order: Tensor, budget: int, cfg: AcquisitionConfig, scores: Tensor | None = None
) -> Selection:
    t_mean, t_var = problem.target_gaussians
    idx, owners = assign_nearest_unused(
        t_mean[order],
        t_var[order],
        *problem.pool_gaussians,
        budget=budget,
        k=cfg.k_nearest,
        metric=cfg.distance,
        max_elements=cfg.max_elements,
    )
    queries = order[owners]
    return Selection(idx, None if scores is None else scores[queries], queries)


def _ranked(scores: Tensor) -> Tensor:
    return torch.argsort(scores, descending=True, stable=True)


def select(
    problem: ActiveProblem, strategy: str, budget: int, seed: int, cfg: AcquisitionConfig
) -> Selection:
    """The first ``budget`` pool points chosen by ``strategy`` for ``seed``."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; available: {', '.join(STRATEGIES)}")
    if not 0 < budget <= len(problem.pool):
        raise ValueError(f"budget must be in 1..{len(problem.pool)} (the pool size), got {budget}")
    gen = make_generator(seed, strategy)
    if strategy == "random":
        return Selection(torch.randperm(len(problem.pool), generator=gen)[:budget])
    if strategy == "random-targeted":
        return _targeted(problem, torch.randperm(len(problem.target), generator=gen), budget, cfg)
    if strategy == "entropy":
        scores = entropy(problem.map_probs(problem.pool))
        order = _ranked(scores)[:budget]
        return Selection(order, scores[order])
    if strategy == "entropy-targeted":
        scores = entropy(problem.map_probs(problem.target))
        return _targeted(problem, _ranked(scores), budget, cfg, scores)
    if strategy == "bald":
        # float64 throughout: BALD is a difference of entropies, small next to either.
        classes = _class_samples(problem, cfg.samples, make_generator(seed, strategy, "text"), torch.float64)
        w, b = problem.image_post.sample(cfg.samples, generator=make_generator(seed, strategy, "image"))
        scores = bald(_probs(problem, problem.target, None, w, b, classes, cfg))
        return _targeted(problem, _ranked(scores), budget, cfg, scores)
    return greedy_epig(problem, budget, seed, cfg)
