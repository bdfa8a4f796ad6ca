"""Benchmark the contrastive output-space GGNs of ``uqvlm.laplace.hessians``.

For each class-batch size C (B = C sources, float32, CLIP-like paired embeddings) it times, each in its own
child process so that the peak-RSS growth of one measurement is not hidden by another's:

- ``infonce_hessian`` and ``siglip_hessian`` (optionally the per-source diagonals), through the likelihood
  objects the posteriors use (``InfoNCE(...).ggn``, ``SigLIP(...).ggn_diagonals``, ...),
- the published per-source algorithm (``naive_infonce_hessian``) on a subsample of sources, extrapolated
  linearly to B = C (its cost is exactly linear in the number of sources),
- one bare C x C x D logits matmul, computed in the same row chunks as the fast path into a reused buffer
  (the FLOP floor: every source needs all C logits; the fast InfoNCE path does about three of these).

Usage: ``python scripts/bench_laplace.py [--dim 512] [--classes 4096 32768] [--repeats 3] [--naive-sources 128]``
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

from uqvlm.laplace.likelihoods import InfoNCE, SigLIP

LOG_SCALE_CLIP = math.log(100.0)
LOG_SCALE_SIGLIP = math.log(10.0)
BIAS_SIGLIP = -10.0
# Timed likelihoods by kind: "<kind>" times .ggn, "<kind>_diag" .ggn_diagonals.
LIKELIHOODS = {InfoNCE.kind: InfoNCE(LOG_SCALE_CLIP), SigLIP.kind: SigLIP(LOG_SCALE_SIGLIP, BIAS_SIGLIP)}
DIAG_SUFFIX = "_diag"
KINDS = ("matmul", *LIKELIHOODS, "naive", *(kind + DIAG_SUFFIX for kind in LIKELIHOODS))


def _current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _child(
    kind: str, n_classes: int, dim: int, repeats: int, naive_sources: int, seed: int, threads: int | None
) -> dict:
    """Run one measurement in this (fresh) process; return timings and peak-RSS growth."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    from uqvlm.laplace import hessians as hs

    # Warm up threads and kernels on a small problem, so the timed runs measure steady state.
    small = torch.randn(64, dim), torch.randn(64, dim)
    for likelihood in LIKELIHOODS.values():
        likelihood.ggn(*small)
    del small

    gen = torch.Generator().manual_seed(seed)
    # CLIP-like pairs: source b and target b share a component, so each row has one clear match.
    source = torch.randn(n_classes, dim, generator=gen)
    target = torch.randn(n_classes, dim, generator=gen)
    target.mul_(0.8).add_(source)
    source.add_(torch.randn(n_classes, dim, generator=gen), alpha=0.8).mul_(3.0)

    # The bare logits matmul, in the fast path's row chunks, into a reused buffer (made on first use so that
    # it does not count towards another measurement's memory).
    mm_chunk = min(n_classes, hs.LOGITS_BUDGET_BYTES // (4 * n_classes))
    mm_buf: list[torch.Tensor] = []

    def matmul() -> None:
        if not mm_buf:
            mm_buf.append(torch.empty(mm_chunk, n_classes))
        y = torch.nn.functional.normalize(target, dim=1)
        for start in range(0, n_classes, mm_chunk):
            stop = min(start + mm_chunk, n_classes)
            torch.matmul(source[start:stop], y.T, out=mm_buf[0][: stop - start])

    n_sources = n_classes
    if kind == "matmul":
        fn = matmul
    elif kind == "naive":
        n_sources = min(naive_sources, n_classes)
        sub = source[:n_sources].clone()

        def fn() -> None:
            hs.naive_infonce_hessian(sub, target, LOG_SCALE_CLIP)

    else:
        name = kind.removesuffix(DIAG_SUFFIX)
        ggn = LIKELIHOODS[name].ggn if name == kind else LIKELIHOODS[name].ggn_diagonals

        def fn() -> None:
            ggn(source, target)

    def timed(f) -> float:
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    # First run alone, for the peak RSS; then bare matmuls interleaved with further runs, so that the ratio
    # to the matmul is taken under the same load (the CPU is shared).
    rss_before = _current_rss_bytes()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = [timed(fn)]
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mm_times = []
    for i in range(repeats):
        if kind != "matmul":
            mm_times.append(timed(matmul))
        if i < repeats - 1:
            times.append(timed(fn))
    return {
        "kind": kind,
        "C": n_classes,
        "D": dim,
        "sources_timed": n_sources,
        "times": times,
        "matmul_times": mm_times or times,
        "peak_growth": peak_after - rss_before,
        # if the set-up's own peak was never exceeded, the growth above is only an upper bound
        "growth_hidden": peak_after == peak_before and peak_before > rss_before,
        "peak_rss": peak_after,
    }


def _run_child(kind: str, n_classes: int, args: argparse.Namespace, repeats: int) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        kind,
        "--dim",
        str(args.dim),
        "--classes",
        str(n_classes),
        "--repeats",
        str(repeats),
        "--naive-sources",
        str(args.naive_sources),
        "--seed",
        str(args.seed),
    ] + (["--threads", str(args.threads)] if args.threads else [])
    env = dict(os.environ)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension D")
    parser.add_argument(
        "--classes", type=int, nargs="+", default=[4096, 32768], help="class-batch sizes C (B = C)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repeats per measurement (min is reported)"
    )
    parser.add_argument(
        "--repeats-large", type=int, default=1, help="timed repeats when C > 8192 (each run takes long)"
    )
    parser.add_argument(
        "--naive-sources", type=int, default=128, help="sources the naive algorithm is timed on"
    )
    parser.add_argument(
        "--diagonals", action="store_true", help="also time the per-source diagonal functions"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(
            json.dumps(
                _child(
                    args.child,
                    args.classes[0],
                    args.dim,
                    args.repeats,
                    args.naive_sources,
                    args.seed,
                    args.threads,
                )
            )
        )
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; D = {args.dim}, float32 inputs, B = C; "
        f"each row is one child process"
    )
    kinds = (
        ["matmul", *LIKELIHOODS]
        + ([kind + DIAG_SUFFIX for kind in LIKELIHOODS] if args.diagonals else [])
        + ["naive"]
    )
    rows = []
    for n_classes in args.classes:
        repeats = args.repeats if n_classes <= 8192 else args.repeats_large
        res = {}
        for kind in kinds:
            r = _run_child(kind, n_classes, args, 1 if kind == "naive" else repeats)
            r["best"] = min(r["times"]) * n_classes / r["sources_timed"]  # naive: extrapolated to B = C
            r["three_mm"] = 3 * min(r["matmul_times"])
            r["ratio"] = r["best"] / r["three_mm"]
            res[kind] = r
            print(f"  done C={n_classes} {kind}: {min(r['times']):.3f} s", file=sys.stderr, flush=True)
        for kind in kinds:
            r = res[kind]
            notes = []
            if kind == "naive":
                notes.append(
                    f"timed on {r['sources_timed']} sources ({min(r['times']):.2f} s) x {n_classes // r['sources_timed']}"
                )
                raw = r["best"] / res[InfoNCE.kind]["best"]
            if len(r["times"]) > 1:
                notes.append("runs " + ", ".join(f"{x:.3f}" for x in r["times"]))
            if kind != "matmul":
                notes.append("matmuls " + ", ".join(f"{x:.3f}" for x in r["matmul_times"]))
            rows.append(
                [
                    str(n_classes),
                    kind + (" (extrap.)" if kind == "naive" else ""),
                    f"{r['best']:.3f}",
                    f"{r['three_mm']:.3f}",
                    f"{r['ratio']:.2f}",
                    f"{r['ratio'] / res[InfoNCE.kind]['ratio']:.0f} (raw {raw:.0f})"
                    if kind == "naive"
                    else "",
                    _fmt_mib(r["peak_growth"]) + ("*" if r["growth_hidden"] else ""),
                    "; ".join(notes),
                ]
            )

    header = ["C", "method", "time s", "3x matmul s", "time / 3x matmul", "naive / fast", "peak MiB", "notes"]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    print(
        "time = best run. 3x matmul = 3 x the best bare C x C x D logits matmul (same row chunks, reused output\n"
        "buffer) timed in the same child process, interleaved with the runs, so each ratio is taken under the\n"
        "same CPU load. naive = the published per-source algorithm ([5, D, D] per 5 sources), timed on a\n"
        "subsample of sources and extrapolated linearly to B = C; naive / fast = ratio of the matmul-normalised\n"
        "times of naive and infonce (raw = ratio of wall times from different processes). peak MiB = peak-RSS\n"
        "growth of the first run over the inputs (* = upper bound: the set-up's own peak was never exceeded)."
    )


if __name__ == "__main__":
    main()
