"""BayesVLM prediction overhead on cached features: time of the BayesVLM (KFAC, probit) predictive
relative to the MAP predictive, both through uqvlm.methods, for N images, K classes, D embedding dims.

Precision policy, the same for both: float32 features in, every computation after them in float64 (the
cosines / ProbCosine moments, the logits, the KFAC quadratic forms, the log-softmax), float64 log-probs
out. On CUDA the features and posteriors are on the GPU and every timing is synchronised.

Usage: python scripts/bench_predict.py [--device cpu|cuda] [--images 100000] [--classes 1000] [--dim 512]
       [--act 768] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
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


def interleaved(fns: list, repeats: int, sync=lambda: None) -> list[list[float]]:
    """Times of each function, called in turn ``repeats`` times after one warm-up call each, so that every
    function meets the same load (the CPU may be shared)."""
    times: list[list[float]] = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, out in zip(fns, times, strict=True):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=1_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--act", type=int, default=768, help="activation dim p of the image last layer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine (no GPU figures measured)")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    posts = {
        "image": random_posterior(args.dim, args.act, g).to(device),
        "text": random_posterior(args.dim, args.dim, g).to(device),
    }

    def features(n: int, tower: str) -> Features:
        a = torch.randn(n, posts[tower].in_features, generator=g).to(device)
        return Features(a, a @ posts[tower].last_layer.weight.float().T)

    ctx = ZeroShotContext(
        logit_scale=4.6,
        logit_bias=None,
        image=features(args.images, "image"),
        labels=torch.zeros(args.images, dtype=torch.long, device=device),
        text=features(args.classes, "text"),
        posterior=None,
        validation_provider=None,
        views_provider=None,
        posterior_provider=lambda s: posts,
    )
    bayes = BayesVLM("kfac")
    maps, bayeses = interleaved(
        [lambda: MAP().predict_log_probs(ctx), lambda: bayes.log_probs(ctx, ctx.image, posts)],
        args.repeats,
        sync,
    )
    t_map, t_bayes = min(maps), min(bayeses)
    pair_ratios = sorted(b / m for m, b in zip(maps, bayeses, strict=True))
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads (CUDA {'available' if torch.cuda.is_available() else 'absent'})"
    )
    print(
        f"N={args.images} K={args.classes} D={args.dim} p={args.act}, {where}, load average {os.getloadavg()[0]:.1f}"
    )
    print("precision: float32 features; MAP and BayesVLM both compute in float64 from there")
    print(
        f"MAP predictive      {t_map:8.3f} s   (best of {args.repeats}: "
        + ", ".join(f"{t:.2f}" for t in maps)
        + ")"
    )
    print(
        f"BayesVLM (KFAC)     {t_bayes:8.3f} s   (best of {args.repeats}: "
        + ", ".join(f"{t:.2f}" for t in bayeses)
        + ")"
    )
    target = 3 if device.type == "cuda" else 2
    median = pair_ratios[len(pair_ratios) // 2]
    print(
        f"ratio BayesVLM/MAP  {t_bayes / t_map:8.2f}   (of the best times; median of the back-to-back pairs "
        f"{median:.2f}; target <= {target} on {device.type})"
    )


if __name__ == "__main__":
    main()
