"""BayesVLM prediction overhead on cached features: time of the BayesVLM (KFAC, probit) predictive
relative to the MAP predictive, both through uqvlm.methods, for N images, K classes, D embedding dims.

Usage: python scripts/bench_predict.py [--images 10000] [--classes 1000] [--dim 512] [--act 768] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from uqvlm.features import Features
from uqvlm.laplace import KFACPosterior
from uqvlm.methods import MAP, BayesVLM, ZeroShotContext


def random_posterior(d: int, p: int, g: torch.Generator) -> KFACPosterior:
    def spd(m: int) -> torch.Tensor:
        x = torch.randn(m, m, generator=g, dtype=torch.float64)
        return x @ x.T / m + torch.eye(m, dtype=torch.float64)

    post = KFACPosterior.from_factors(spd(p), spd(d), weight=torch.randn(d, p, generator=g) / p**0.5)
    post.n, post.prior_precision = 10.0, 100.0
    return post


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--classes", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--act", type=int, default=768, help="activation dim p of the image last layer")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    posts = {
        "image": random_posterior(args.dim, args.act, g),
        "text": random_posterior(args.dim, args.dim, g),
    }

    def features(n: int, tower: str) -> Features:
        a = torch.randn(n, posts[tower].in_features, generator=g)
        return Features(a, a @ posts[tower].last_layer.weight.float().T)

    ctx = ZeroShotContext(
        logit_scale=4.6,
        logit_bias=None,
        image=features(args.images, "image"),
        labels=torch.zeros(args.images, dtype=torch.long),
        text=features(args.classes, "text"),
        posterior=None,
        validation_provider=None,
        views_provider=None,
        posterior_provider=lambda s: posts,
    )
    bayes = BayesVLM("kfac")
    t_map = best_of(lambda: MAP().predict_log_probs(ctx), args.repeats)
    t_bayes = best_of(lambda: bayes.log_probs(ctx, ctx.image, posts), args.repeats)
    print(f"N={args.images} K={args.classes} D={args.dim} p={args.act}, {torch.get_num_threads()} threads")
    print(f"MAP predictive      {t_map:8.3f} s")
    print(f"BayesVLM (KFAC)     {t_bayes:8.3f} s")
    print(f"ratio BayesVLM/MAP  {t_bayes / t_map:8.2f}   (target <= 3)")


if __name__ == "__main__":
    main()
