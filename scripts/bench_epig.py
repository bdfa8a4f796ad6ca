"""Benchmark greedy EPIG: 50 picks from a 10,000-point pool with 2,000 targets, S = 100, K = 10.

Synthetic features (D = 32, p = 64 like uqvlm-tiny) and KFAC posteriors built from synthetic curvature.
Prints the wall time of the selection (target: <= 60 s on a laptop-class CPU). ``--check`` also runs the
non-lazy greedy (every candidate re-scored at every step) on a smaller problem and compares the picks.

    python scripts/bench_epig.py [--pool 10000 --targets 2000 --samples 100 --classes 10 --budget 50]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from uqvlm.active.strategies import AcquisitionConfig, ActiveProblem, greedy_epig
from uqvlm.features import Features
from uqvlm.laplace import InfoNCE, KFACPosterior

LOGIT_SCALE = math.log(30.0)
LIKELIHOOD = InfoNCE(LOGIT_SCALE)  # EPIG's updates add curvature under it


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


def problem(n_pool: int, n_target: int, k: int, d: int, p: int, seed: int = 0) -> ActiveProblem:
    gen = torch.Generator().manual_seed(seed)
    text_acts = torch.randn(k, p, generator=gen)
    text_post = _posterior(gen, d, p, torch.randn(64, d, generator=gen, dtype=torch.float64))
    text = Features(text_acts, (text_acts.double() @ text_post.last_layer.weight.T).float())
    image_post = _posterior(gen, d, p, text.embeddings.double())

    def image(n: int) -> Features:
        acts = torch.randn(n, p, generator=gen)
        return Features(acts, (acts.double() @ image_post.last_layer.weight.T).float())

    return ActiveProblem(image(n_pool), image(n_target), text, LOGIT_SCALE, None, image_post, text_post)


def timed(prob: ActiveProblem, budget: int, cfg: AcquisitionConfig):
    start, cpu = time.perf_counter(), time.process_time()
    sel = greedy_epig(prob, budget, seed=0, cfg=cfg)
    return sel, time.perf_counter() - start, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=10_000)
    ap.add_argument("--targets", type=int, default=2_000)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--dim", type=int, default=32, help="embedding dim D")
    ap.add_argument("--act", type=int, default=64, help="activation dim p")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float32")
    ap.add_argument("--check", action="store_true", help="compare lazy and full greedy on a smaller problem")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    cfg = AcquisitionConfig(samples=args.samples, epig_candidates="pool", epig_dtype=dtype)

    prob = problem(args.pool, args.targets, args.classes, args.dim, args.act)
    sel, wall, cpu = timed(prob, args.budget, cfg)
    print(
        f"greedy EPIG: {args.budget} picks, pool {args.pool}, targets {args.targets}, S={args.samples}, "
        f"K={args.classes}, D={args.dim}, p={args.act}, {args.dtype}, {torch.get_num_threads()} threads: "
        f"{wall:.1f} s wall, {cpu:.1f} s CPU"
    )
    print(f"  scores of the picks: first {sel.scores[0]:.3e}, last {sel.scores[-1]:.3e}")

    if args.check:
        small = problem(1000, 200, args.classes, args.dim, args.act, seed=1)
        budget = min(20, args.budget)
        lazy, t_lazy, _ = timed(small, budget, cfg)
        full_cfg = AcquisitionConfig(
            samples=args.samples, epig_candidates="pool", epig_dtype=dtype, epig_lazy=False
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
