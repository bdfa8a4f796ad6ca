"""Paper-scale Hessian pipeline benchmark: ``task=hessian`` end to end on synthetic image-caption shards.

1. Writes N synthetic image-caption pairs as img2dataset-layout webdataset shards (``00000.tar``, ...:
   ``<key>.jpg`` + ``<key>.txt`` + ``<key>.json`` per pair, 10,000 pairs a shard), with web-like image
   sizes (shorter side 256-768 px, aspect 3:4 to 16:9, JPEG quality 90, smooth random content). Shards
   are reused when a previous run wrote the same ones to ``--data``.
2. Runs ``uqvlm run task=hessian`` on them in a child process, with a random-init ``--model`` (default
   ViT-B-32) and an empty cache: decode, preprocess, tokenize, encode, GGN and accumulation, timed end
   to end (the process's wall time, model construction and imports included).
3. Times each stage alone on a sample, in images (pairs) per second: decode (read + JPEG decode, one
   process), preprocess (the model's transform, one process), tokenize, encode (both towers, pixels
   already on the device), GGN (both sides of one class batch) and accumulation (the KFAC sums and the
   factorisation). Decode, preprocess and tokenize run in the DataLoader's workers, so their pipeline
   rate is the one-process rate times the workers (capped by the cores): both are printed. The slowest
   stage is named.

Small N on the CPU; N = 327,680 (the paper's: 10 class batches of 32,768) on a GPU machine, where the goal
for ViT-B-32 is under 5 minutes on one H200.

Usage: python scripts/bench_hessian_pipeline.py [--pairs 512] [--class-batch 256] [--model ViT-B-32]
       [--device auto] [--precision fp32] [--batch-size auto] [--workers auto] [--data DIR] [--compile]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

PAIRS_PER_SHARD = 10_000
WORDS = (
    "a photo of the red blue green small large old new wooden metal dog cat car house tree river city "
    "mountain beach street at night in winter with people on a table near the window painting drawing"
).split()


def _image_bytes(rng: np.random.Generator) -> bytes:
    from PIL import Image

    short = int(rng.integers(256, 769))
    aspect = float(rng.uniform(0.75, 16 / 9))
    w, h = (int(short * aspect), short) if rng.random() < 0.7 else (short, int(short * aspect))
    # Smooth content (low-resolution noise, upsampled) compresses like photos, unlike white noise.
    low = rng.integers(0, 256, (int(rng.integers(4, 17)), int(rng.integers(4, 17)), 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((w, h), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_shard(path: str, first: int, count: int, seed: int) -> None:
    rng = np.random.default_rng([seed, first])
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as tar:
        for key in range(first, first + count):
            caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 16)))).encode()
            members = {
                "jpg": _image_bytes(rng),
                "txt": caption,
                "json": json.dumps({"key": f"{key:09d}", "caption": caption.decode()}).encode(),
            }
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def write_shards(root: Path, n: int, seed: int = 0) -> list[Path]:
    """img2dataset-layout shards holding n pairs (reused when the manifest matches)."""
    root.mkdir(parents=True, exist_ok=True)
    manifest = {"pairs": n, "per_shard": PAIRS_PER_SHARD, "seed": seed, "version": 1}
    shards = [root / f"{i:05d}.tar" for i in range(math.ceil(n / PAIRS_PER_SHARD))]
    marker = root / "manifest.json"
    if marker.exists() and json.loads(marker.read_text()) == manifest and all(p.exists() for p in shards):
        return shards
    jobs = [
        (str(p), i * PAIRS_PER_SHARD, min(PAIRS_PER_SHARD, n - i * PAIRS_PER_SHARD), seed)
        for i, p in enumerate(shards)
    ]
    with ProcessPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1)) as pool:
        list(pool.map(_write_shard, *zip(*jobs, strict=True)))
    marker.write_text(json.dumps(manifest))
    return shards


def run_task(args: argparse.Namespace, data: Path, work: Path) -> tuple[float, str]:
    overrides = [
        "task=hessian",
        f"posterior={args.posterior}",
        f"model.name={args.model}",
        "model.pretrained=none",
        f"model.precision={args.precision}",
        f"model.batch_size={args.batch_size}",
        "hessian_data=laion400m",
        f"hessian_data.root={data}",
        f"hessian_data.n={args.pairs}",
        f"hessian_data.class_batch={args.class_batch}",
        f"device={args.device}",
        f"num_workers={args.workers}",
        f"compile={str(args.compile).lower()}",
        f"paths.cache_dir={work / 'cache'}",
        f"paths.results_dir={work / 'results'}",
        f"paths.log_dir={work / 'logs'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-m", "uqvlm.cli", "run", *overrides], capture_output=True, text=True, env=env
    )
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"task=hessian failed:\n{out.stdout}\n{out.stderr}")
    return wall, out.stdout


def rate(fn, items: int, repeats: int = 1, sync=lambda: None) -> float:
    """Items per second of the best of ``repeats`` calls of ``fn`` (after one warm-up call)."""
    fn()
    sync()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return items / best


def stage_rates(args: argparse.Namespace, data: Path) -> dict[str, float]:
    import torch

    from uqvlm.data.sources.webdataset import WebDatasetPairs
    from uqvlm.devices import resolve_device
    from uqvlm.laplace import Laplace, likelihood_for
    from uqvlm.models import load_vlm

    device = resolve_device(args.device)
    vlm = load_vlm(args.model, None, device=device, precision=args.precision)
    if device.type == "cuda":
        vlm.channels_last()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    pairs = WebDatasetPairs("*.tar", root=str(data), n=args.pairs)
    m = min(args.sample, len(pairs))
    items = [pairs[i] for i in range(m)]
    images, captions = [im for im, _ in items], [c for _, c in items]
    out = {"decode": rate(lambda: [pairs[i] for i in range(m)], m)}
    out["preprocess"] = rate(lambda: [vlm.preprocess(im) for im in images], m)
    out["tokenize"] = rate(lambda: vlm.tokenizer(captions), m)
    batch = args.encode_batch
    pixels = torch.stack([vlm.preprocess(images[i % m]) for i in range(batch)]).to(device)
    tokens = vlm.tokenizer([captions[i % m] for i in range(batch)]).to(device)
    out["encode"] = rate(lambda: (vlm.encode_images(pixels), vlm.encode_texts(tokens)), batch, 2, sync)
    # One class batch of both sides, embeddings and activations of the model's sizes.
    c = args.class_batch
    img, txt = vlm.image_head, vlm.text_head
    g = torch.Generator().manual_seed(0)
    a_img = torch.randn(c, img.weight.shape[1], generator=g).to(device)
    a_txt = torch.randn(c, txt.weight.shape[1], generator=g).to(device)
    z_img, z_txt = a_img @ img.weight.T.float(), a_txt @ txt.weight.T.float()
    likelihood = likelihood_for(vlm)
    out["GGN"] = rate(lambda: (likelihood.ggn(z_img, z_txt), likelihood.ggn(z_txt, z_img)), c, 1, sync)

    class FreeGGN:
        """The likelihood's GGN as zeros: the update then does the accumulation alone."""

        def ggn(self, sources, targets):
            return torch.zeros(sources.shape[1], sources.shape[1], dtype=torch.float64, device=sources.device)

        def ggn_diagonals(self, sources, targets):
            return torch.zeros(sources.shape, dtype=torch.float64, device=sources.device)

    posts = []

    def accumulate() -> None:
        posts.clear()
        for head, a, z, y in ((img, a_img, z_img, z_txt), (txt, a_txt, z_txt, z_img)):
            posts.append(Laplace(head, "kfac", likelihood=FreeGGN()))
            posts[-1].update(a, z, y)  # float64 activations, the sum a a^T, the GGN's sum (zeros here)

    out["accumulation"] = rate(accumulate, c, 1, sync)
    # Once per posterior, not per pair: symmetrise and eigendecompose both towers' factors.
    out["factorisation_s"] = 1.0 / rate(lambda: [p.finalize() for p in posts], 1, 1, sync)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=512, help="N image-caption pairs (paper: 327680)")
    ap.add_argument("--class-batch", type=int, default=256, help="pairs per class batch (paper: 32768)")
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--posterior", default="kfac", help="posterior group: kfac (the paper), diag, bayesvlm")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--batch-size", default="auto", help="encoder batch (auto: the largest that fits)")
    ap.add_argument("--workers", default="auto", help="DataLoader workers (auto: sized to the machine)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    ap.add_argument("--data", type=Path, default=None, help="where the shards go (default: a temp dir)")
    ap.add_argument("--sample", type=int, default=64, help="pairs the per-stage rates are measured on")
    ap.add_argument("--encode-batch", type=int, default=32, help="batch of the encode-stage measurement")
    args = ap.parse_args()

    import torch

    from uqvlm.devices import loader_workers, resolve_device

    device = resolve_device(args.device)
    workers = loader_workers(args.workers if args.workers == "auto" else int(args.workers), device)
    cores = len(os.sched_getaffinity(0))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{args.model} (random init), {args.precision}, on {where} ({cores} cores, torch {torch.__version__}); "
        f"N = {args.pairs:,} pairs, class batch {args.class_batch:,}, posterior={args.posterior}, "
        f"{workers} loader workers"
    )
    if not torch.cuda.is_available():
        print(
            "CUDA is absent here: these are CPU figures (the GPU goal, N = 327,680 in < 5 min, is not measured)"
        )

    with tempfile.TemporaryDirectory(prefix="uqvlm-bench-") as tmp:
        data = args.data or Path(tmp) / "shards"
        t0 = time.perf_counter()
        shards = write_shards(data, args.pairs)
        print(
            f"shards: {len(shards)} in {data} ({sum(p.stat().st_size for p in shards) / 2**20:,.0f} MiB, "
            f"{time.perf_counter() - t0:.1f} s to write or find)"
        )
        wall, _ = run_task(args, data, Path(tmp) / "run")
        rates = stage_rates(args, data)

    parallel = {"decode", "preprocess", "tokenize"}
    scale = max(1, min(workers, cores))
    factorisation = rates.pop("factorisation_s")
    print(f"\n{'stage':<14}{'pairs/s (1 process)':>22}{'pairs/s in the pipeline':>26}")
    effective = {}
    for stage, r in rates.items():
        effective[stage] = r * scale if stage in parallel else r
        print(f"{stage:<14}{r:>22,.1f}{effective[stage]:>26,.1f}")
    print(f"{'factorisation':<14}{'once, ' + format(factorisation, '.3f') + ' s':>22}")
    slowest = min(effective, key=effective.get)
    print(
        f"\ntask=hessian end to end: {wall:.1f} s for {args.pairs:,} pairs = {args.pairs / wall:,.1f} pairs/s "
        f"(imports and model construction included)"
    )
    print(f"slowest stage: {slowest} ({effective[slowest]:,.1f} pairs/s)")
    if args.pairs < 327_680:
        print(
            f"at the slowest stage's rate, N = 327,680 would take about {327_680 / effective[slowest] / 60:,.1f} min"
        )


if __name__ == "__main__":
    main()
