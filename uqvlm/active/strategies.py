"""Selection strategies (method.md section 7): which pool points to label, given a budget.

Every strategy draws its randomness from its own generator seeded by ``(seed, strategy)`` and never
mutates the shared posteriors (EPIG's greedy updates act on copies), so selections do not depend on which
strategies ran before. A selection for budget B is the prefix of the one for any larger budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from uqvlm.active.acquisition import (
    MAX_ELEMENTS,
    EpigTargets,
    assign_nearest_unused,
    bald,
    entropy,
    epig,
    epig_upper_bound,
    joint_sample_probs,
    sampled_embeddings,
)
from uqvlm.devices import intra_op_threads
from uqvlm.features import Features
from uqvlm.laplace.base import LastLayerPosterior
from uqvlm.methods import cosine_logits

__all__ = [
    "EPIG_CANDIDATES",
    "STRATEGIES",
    "TARGETED_STRATEGIES",
    "AcquisitionConfig",
    "ActiveProblem",
    "Selection",
    "greedy_epig",
    "make_generator",
    "select",
]

STRATEGIES = ("random", "random-targeted", "entropy", "entropy-targeted", "bald", "epig")
# The strategies that pick the pool points nearest the target points (EPIG: with ``targeted`` candidates),
# as ``select`` runs them: a budget beyond k_nearest per target point is out of reach.
TARGETED_STRATEGIES = ("random-targeted", "entropy-targeted", "bald", "epig")
# EPIG's candidate sets (``epig_candidates``): the pool points nearest the targets, or the whole pool.
EPIG_CANDIDATES = ("targeted", "pool")
# Target-side probabilities ([M, S, K] entries) below which a selection runs on one CPU thread.
SMALL_PROBLEM = 1 << 22


def make_generator(seed: int, *parts: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded by a stable hash of ``(seed, *parts)`` (Python's hash() is salted).
    CPU and CUDA generators of one seed draw different numbers."""
    digest = hashlib.blake2b(repr((int(seed), *parts)).encode(), digest_size=8).digest()
    return torch.Generator(device).manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _device(post: LastLayerPosterior) -> torch.device:
    """Where the posterior's tensors (and so its samples) live."""
    return post.last_layer.weight.device


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
    w, b = post.sample(cfg.samples, generator=make_generator(seed, "epig", "image", device=_device(post)))
    return w.to(cfg.epig_dtype), None if b is None else b.to(cfg.epig_dtype)


def _epig_targets(
    problem: ActiveProblem, w: Tensor, b: Tensor | None, classes: Tensor, cfg: AcquisitionConfig
) -> EpigTargets:
    """The target side of a greedy step, from the targets' probabilities computed a chunk of rows at a
    time (the [M, S, K'] tensor is never held: 1.6 GB at the published M = 20,000, S = 100, K' = 200)."""
    count = len(problem.target)
    rows = max(1, cfg.max_elements // (cfg.samples * max(w.shape[1], classes.shape[1])))
    chunks = (
        _probs(problem, problem.target, torch.arange(start, min(count, start + rows)), w, b, classes, cfg)
        for start in range(0, count, rows)
    )
    return EpigTargets.from_chunks(chunks, count, cfg.epig_dtype)


def epig_candidates(problem: ActiveProblem, cfg: AcquisitionConfig) -> Tensor:
    """EPIG's candidate pool: ``targeted``: every target point (in index order) takes its k nearest pool
    points not taken yet, so there are min(k M, N) distinct candidates; ``pool``: the whole pool."""
    if cfg.epig_candidates not in EPIG_CANDIDATES:
        raise ValueError(
            f"epig candidates must be {' or '.join(map(repr, EPIG_CANDIDATES))}, got {cfg.epig_candidates!r}"
        )
    if cfg.epig_candidates == "pool":
        return torch.arange(len(problem.pool))
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
    *,
    trace: list[dict[str, Tensor]] | None = None,
) -> Selection:
    """Greedy EPIG with the image posterior updated after every pick: ``with_point`` gives a new posterior
    with the pick's curvature under the posterior's own likelihood (``cfg.epig_update_scale`` copies).

    At every step each free candidate gets the exact :func:`epig_upper_bound` of its EPIG under the current
    posterior's samples (computed from the same probabilities its EPIG is, plus a margin for the round-off
    of ``cfg.epig_dtype``), and candidates are scored in blocks of ``cfg.epig_batch`` in descending bound
    order. Lazy (``cfg.epig_lazy``): stop once the best score beats the highest bound left; otherwise every
    candidate is scored. The pick is the highest score, the lowest candidate position among equal scores,
    in both modes, and both score each candidate in the same block from the same probabilities, so they
    pick identical sequences. ``trace``, when given, receives per step the candidate positions (into
    ``candidates``), their bounds and their scores (NaN where lazy skipped them).
    """
    cand = epig_candidates(problem, cfg) if candidates is None else candidates.long()
    if budget > len(cand):
        raise ValueError(f"EPIG budget {budget} exceeds its {len(cand)} candidates; raise task.k_nearest")
    if cfg.epig_batch < 1:
        raise ValueError(f"epig batch must be a positive integer, got {cfg.epig_batch}")
    text_gen = make_generator(seed, "epig", "text", device=_device(problem.text_post))
    classes = _class_samples(problem, cfg.samples, text_gen, cfg.epig_dtype)
    post = problem.image_post
    free = torch.ones(len(cand), dtype=torch.bool)
    picks: list[int] = []
    scores: list[float] = []
    for step in range(budget):
        w, b = _image_samples(post, cfg, seed)
        targets = _epig_targets(problem, w, b, classes, cfg)
        positions = free.nonzero().squeeze(1)

        def probs(rows: Tensor, w=w, b=b) -> Tensor:
            return _probs(problem, problem.pool, cand[rows], w, b, classes, cfg)

        best, best_score, bounds, fresh = _epig_step(positions, probs, targets, cfg)
        if trace is not None:
            trace.append({"positions": positions, "bounds": bounds, "scores": fresh})
        free[best] = False
        picks.append(int(cand[best]))
        scores.append(best_score)
        if step + 1 < budget:
            i = picks[-1]
            post = post.with_point(
                problem.pool.activations[i],
                problem.pool.embeddings[i],
                problem.text.embeddings,
                copies=cfg.epig_update_scale,
            )
    return Selection(torch.tensor(picks, dtype=torch.long), torch.tensor(scores, dtype=torch.float64))


def _epig_step(
    positions: Tensor, probs: Callable[[Tensor], Tensor], targets: EpigTargets, cfg: AcquisitionConfig
) -> tuple[int, float, Tensor, Tensor]:
    """One greedy step over the free candidate ``positions``: (pick, its score, bounds, scores).

    Candidates are ranked by (bound descending, position ascending) and scored in blocks of
    ``cfg.epig_batch`` in rank order. Probabilities of at most ``window`` candidates are held at once (the
    next ranks, collected by a pass over all candidates), so memory stays bounded; a further pass is needed
    only when the scores do not beat the bounds of the first window (or to score every candidate of a
    large pool).
    """
    n_free, block = len(positions), cfg.epig_batch
    window = max(block, cfg.max_elements // (targets.samples * targets.classes) // block * block)
    exhaustive = not cfg.epig_lazy
    scores = torch.full((n_free,), math.nan, dtype=torch.float64)
    best, best_score = -1, -math.inf
    bounds, held, held_probs = _bound_pass(positions, probs, targets, cfg, window)
    order = torch.argsort(bounds, descending=True, stable=True)  # ties: the lower position first
    lo = 0
    while True:
        for start in range(0, len(held), block):
            rows = held[start : start + block]
            if not exhaustive and best_score > float(bounds[rows[0]]):
                return int(positions[best]), best_score, bounds, scores
            fresh = epig(
                held_probs[start : start + block],
                targets,
                dtype=cfg.epig_dtype,
                max_elements=cfg.max_elements,
            )
            scores[rows] = fresh.cpu()
            # A score above its bound means the round-off margin failed: score every candidate.
            exhaustive = exhaustive or bool((scores[rows] > bounds[rows]).any())
            top = float(scores[rows].max())
            first = int(rows[scores[rows] == top].min())
            if top > best_score or (top == best_score and first < best):
                best, best_score = first, top
        lo += window
        if lo >= n_free or (not exhaustive and best_score > float(bounds[order[lo]])):
            return int(positions[best]), best_score, bounds, scores
        _, held, held_probs = _bound_pass(positions, probs, targets, cfg, window, order[lo : lo + window])


def _bound_pass(
    positions: Tensor,
    probs: Callable[[Tensor], Tensor],
    targets: EpigTargets,
    cfg: AcquisitionConfig,
    window: int,
    wanted: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Probabilities and bounds of every free candidate, computed in fixed chunks of consecutive positions
    (so every pass and both modes get bitwise the same values). Returns the bounds [n_free] and the indices
    and probabilities of the candidates held: ``wanted`` (in its order) when given, else the top ``window``
    by (bound descending, position ascending), in that order."""
    n_free = len(positions)
    chunk = max(1, cfg.max_elements // (targets.samples * targets.classes))
    bounds = torch.empty(n_free, dtype=torch.float64)
    held = torch.zeros(0, dtype=torch.long)
    held_probs: Tensor | None = None
    for start in range(0, n_free, chunk):
        idx = torch.arange(start, min(n_free, start + chunk))
        p = probs(positions[idx])
        bounds[idx] = epig_upper_bound(p, targets, dtype=cfg.epig_dtype).cpu()
        if wanted is None:
            # Held rows come first and have lower positions than the chunk's, so a stable sort keeps
            # the lower position first among equal bounds.
            held, p = torch.cat([held, idx]), p if held_probs is None else torch.cat([held_probs, p])
            top = torch.argsort(bounds[held], descending=True, stable=True)[:window]
            held, held_probs = held[top], p[top.to(p.device)]
        else:
            mask = torch.isin(idx, wanted)
            held = torch.cat([held, idx[mask]])
            kept = p[mask.to(p.device)]
            held_probs = kept if held_probs is None else torch.cat([held_probs, kept])
    if wanted is not None:
        slot = torch.empty(n_free, dtype=torch.long)
        slot[wanted] = torch.arange(len(wanted))
        perm = torch.argsort(slot[held])
        held, held_probs = held[perm], held_probs[perm.to(held_probs.device)]
    return bounds, held, held_probs


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
    """The first ``budget`` pool points chosen by ``strategy`` for ``seed``. A small problem (the
    targets' joint probabilities [M, S, K] under ``SMALL_PROBLEM`` entries) runs on one CPU thread: its
    ops are too small for several (uqvlm.devices.intra_op_threads)."""
    small = len(problem.target) * cfg.samples * len(problem.text.embeddings) < SMALL_PROBLEM
    with intra_op_threads(1) if small else contextlib.nullcontext():
        return _select(problem, strategy, budget, seed, cfg)


def _select(
    problem: ActiveProblem, strategy: str, budget: int, seed: int, cfg: AcquisitionConfig
) -> Selection:
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
        text_gen = make_generator(seed, strategy, "text", device=_device(problem.text_post))
        classes = _class_samples(problem, cfg.samples, text_gen, torch.float64)
        image_gen = make_generator(seed, strategy, "image", device=_device(problem.image_post))
        w, b = problem.image_post.sample(cfg.samples, generator=image_gen)
        scores = bald(_probs(problem, problem.target, None, w, b, classes, cfg))
        return _targeted(problem, _ranked(scores), budget, cfg, scores)
    return greedy_epig(problem, budget, seed, cfg)
