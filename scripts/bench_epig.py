"""Benchmark greedy EPIG: wall time and peak memory of a selection, or of its first picks extrapolated.

Synthetic features and KFAC posteriors built from synthetic curvature (the cost does not depend on the
values). Default: 50 picks from a 10,000-point pool with 2,000 targets, S = 100, K = 10, D = 32, p = 64
(like uqvlm-tiny), every pool point a candidate. ``--published``: the published code's sizes (ImageNet-R:
K = 200 classes, CLIP ViT-B/32: D = 512, p = 768, a target set of 20,000, a pool of 40,000 restricted to
the targets' nearest pool points, S = 100): time ``--picks`` picks (1 by default) and extrapolate to
``--budget`` (50); the kNN restriction is timed once, apart. ``--device cuda`` runs on the GPU.

Peak memory: the process's peak resident set (ru_maxrss, which includes the synthetic problem), and on
CUDA torch.cuda.max_memory_allocated. ``--check`` also runs the non-lazy greedy (every candidate re-scored
at every step) on a smaller problem and compares the picks.

``--score N`` times one pick's pieces instead of the pick: the target side, the bounds of every candidate
and the exact EPIG of N candidates, and extrapolates the pick with every candidate scored (the bounds skip
none at the first pick of these problems). For the published sizes on a CPU, where one pick takes days.

    python scripts/bench_epig.py [--pool 10000 --targets 2000 --samples 100 --classes 10 --budget 50]
    python scripts/bench_epig.py --published [--picks 1 --budget 50 --device cpu]
    python scripts/bench_epig.py --published --score 8
"""

from __future__ import annotations

import argparse
import math
import resource
import time

import torch

from uqvlm.active.acquisition import epig, epig_upper_bound
from uqvlm.active.strategies import (
    AcquisitionConfig,
    ActiveProblem,
    _class_samples,
    _epig_targets,
    _image_samples,
    _probs,
    epig_candidates,
    greedy_epig,
    make_generator,
)
from uqvlm.features import Features
from uqvlm.laplace import InfoNCE, KFACPosterior

LOGIT_SCALE = math.log(30.0)
LIKELIHOOD = InfoNCE(LOGIT_SCALE)  # EPIG's updates add curvature under it
PUBLISHED = {"pool": 40_000, "targets": 20_000, "samples": 100, "classes": 200, "dim": 512, "act": 768}


def _posterior(
    gen: torch.Generator, d: int, p: int, targets: torch.Tensor, n_data: int = 5000
) -> KFACPosterior:
    weight = torch.randn(d, p, generator=gen, dtype=torch.float64) / math.sqrt(p)
    acts = torch.randn(n_data, p, generator=gen, dtype=torch.float64)
    root = math.sqrt(n_data)
    a = acts.T @ acts / root
    b = LIKELIHOOD.ggn(acts @ weight.T, targets) / root
    return KFACPosterior.from_factors(
        a, b, num_data=n_data, weight=weight, likelihood=LIKELIHOOD, n=10.0, prior_precision=1.0
    )


def problem(
    n_pool: int, n_target: int, k: int, d: int, p: int, seed: int = 0, device: str = "cpu"
) -> ActiveProblem:
    gen = torch.Generator().manual_seed(seed)
    text_acts = torch.randn(k, p, generator=gen)
    text_post = _posterior(gen, d, p, torch.randn(64, d, generator=gen, dtype=torch.float64))
    text = Features(text_acts, (text_acts.double() @ text_post.last_layer.weight.T).float())
    image_post = _posterior(gen, d, p, text.embeddings.double())

    def image(n: int) -> Features:
        acts = torch.randn(n, p, generator=gen)
        return Features(acts.to(device), (acts.double() @ image_post.last_layer.weight.T).float().to(device))

    text = Features(text.activations.to(device), text.embeddings.to(device))
    return ActiveProblem(
        image(n_pool), image(n_target), text, LOGIT_SCALE, None, image_post.to(device), text_post.to(device)
    )


def peak_gib() -> float:
    """Peak resident set of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(
    prob: ActiveProblem,
    budget: int,
    cfg: AcquisitionConfig,
    candidates: torch.Tensor | None = None,
    trace: list | None = None,
):
    start, cpu = time.perf_counter(), time.process_time()
    sel = greedy_epig(prob, budget, seed=0, cfg=cfg, candidates=candidates, trace=trace)
    return sel, time.perf_counter() - start, time.process_time() - cpu


def score_pieces(
    prob: ActiveProblem, cfg: AcquisitionConfig, cand: torch.Tensor, count: int, cuda: bool
) -> None:
    """Time one greedy step's pieces (the greedy_epig step, written out) and extrapolate the step."""

    def clock(fn):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        return out, time.perf_counter() - start

    text_gen = make_generator(0, "epig", "text", device="cuda" if cuda else "cpu")
    classes = _class_samples(prob, cfg.samples, text_gen, cfg.epig_dtype)
    w, b = _image_samples(prob.image_post, cfg, 0)
    targets, t_targets = clock(lambda: _epig_targets(prob, w, b, classes, cfg))
    rows = torch.arange(len(cand))
    chunk = max(1, cfg.max_elements // (cfg.samples * classes.shape[1]))

    def bounds() -> torch.Tensor:
        return torch.cat(
            [
                epig_upper_bound(_probs(prob, prob.pool, cand[r], w, b, classes, cfg), targets)
                for r in rows.split(chunk)
            ]
        )

    _, t_bounds = clock(bounds)
    probs = _probs(prob, prob.pool, cand[:count], w, b, classes, cfg)
    scores, t_scores = clock(
        lambda: epig(probs, targets, dtype=cfg.epig_dtype, max_elements=cfg.max_elements)
    )
    per = t_scores / count
    step = t_targets + t_bounds + per * len(cand)
    print(
        f"  one step's pieces: target side {t_targets:.1f} s, bounds of all {len(cand)} candidates {t_bounds:.1f} s"
    )
    print(
        f"  exact EPIG of {count} candidates: {t_scores:.1f} s ({per:.2f} s a candidate; scores {scores[0]:.3e} ...)"
    )
    print(
        f"  one step scoring every candidate (the first pick): about {step:.0f} s = {step / 3600:.1f} h; a budget"
        f" of 50 at most 50 times that, less as the bounds skip candidates"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=10_000)
    ap.add_argument("--targets", type=int, default=2_000)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--picks", type=int, default=None, help="picks to time (default: the budget)")
    ap.add_argument("--dim", type=int, default=32, help="embedding dim D")
    ap.add_argument("--act", type=int, default=64, help="activation dim p")
    ap.add_argument("--candidates", choices=["pool", "targeted"], default="pool")
    ap.add_argument("--k-nearest", type=int, default=1)
    ap.add_argument("--published", action="store_true", help="the published sizes (see the docstring)")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--check", action="store_true", help="compare lazy and full greedy on a smaller problem")
    ap.add_argument("--score", type=int, default=None, help="time a step's pieces, N candidates scored")
    args = ap.parse_args()
    if args.published:
        for key, value in PUBLISHED.items():
            setattr(args, key, value)
        args.candidates = "targeted"
        args.picks = args.picks or 1
    picks = args.picks or args.budget
    dtype = getattr(torch, args.dtype)
    cuda = args.device.startswith("cuda")
    cfg = AcquisitionConfig(
        samples=args.samples, k_nearest=args.k_nearest, epig_candidates=args.candidates, epig_dtype=dtype
    )

    prob = problem(args.pool, args.targets, args.classes, args.dim, args.act, device=args.device)
    base = peak_gib()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cand = epig_candidates(prob, cfg)
    knn_s = time.perf_counter() - start
    if args.score:
        sizes = (
            f"pool {args.pool} ({len(cand)} candidates, {args.candidates}), targets {args.targets}, "
            f"S={args.samples}, K={args.classes}, D={args.dim}, p={args.act}, {args.dtype}, {args.device}"
        )
        print(f"greedy EPIG, {sizes}\n  candidate restriction: {knn_s:.1f} s (once per selection)")
        score_pieces(prob, cfg, cand, min(args.score, len(cand)), cuda)
        print(f"  peak resident memory {peak_gib():.2f} GiB (the problem itself: {base:.2f} GiB)")
        return
    trace: list[dict[str, torch.Tensor]] = []
    sel, wall, cpu = timed(prob, picks, cfg, cand, trace)
    scored = [int((~torch.isnan(step["scores"])).sum()) for step in trace]
    if cuda:
        torch.cuda.synchronize()
    sizes = (
        f"pool {args.pool} ({len(cand)} candidates, {args.candidates}), targets {args.targets}, "
        f"S={args.samples}, K={args.classes}, D={args.dim}, p={args.act}, {args.dtype}, {args.device}"
        + ("" if cuda else f", {torch.get_num_threads()} threads")
    )
    print(f"greedy EPIG, {sizes}")
    print(f"  candidate restriction: {knn_s:.1f} s (once per selection)")
    print(f"  {picks} picks: {wall:.1f} s wall, {cpu:.1f} s CPU ({wall / picks:.1f} s a pick)")
    print(f"  candidates scored per pick (the rest skipped by their bounds): {scored}")
    if picks < args.budget:
        print(f"  extrapolated to a budget of {args.budget}: {knn_s + wall / picks * args.budget:.0f} s")
    memory = f"  peak resident memory {peak_gib():.2f} GiB (the problem itself: {base:.2f} GiB)"
    if cuda:
        memory += f", peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    print(memory)
    print(f"  scores of the picks: first {sel.scores[0]:.3e}, last {sel.scores[-1]:.3e}")

    if args.check:
        small = problem(1000, 200, args.classes, args.dim, args.act, seed=1, device=args.device)
        budget = min(20, args.budget)
        lazy, t_lazy, _ = timed(small, budget, cfg)
        full_cfg = AcquisitionConfig(
            samples=args.samples,
            k_nearest=args.k_nearest,
            epig_candidates=args.candidates,
            epig_dtype=dtype,
            epig_lazy=False,
        )
        full, t_full, _ = timed(small, budget, full_cfg)
        same = torch.equal(lazy.indices, full.indices)
        print(
            f"check (pool 1000, targets 200, {budget} picks): lazy {t_lazy:.1f} s, full {t_full:.1f} s, "
            f"identical picks: {same}"
        )
        if not same:
            print(f"  lazy {lazy.indices.tolist()}\n  full {full.indices.tolist()}")


if __name__ == "__main__":
    main()
