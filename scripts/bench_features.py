"""Feature-extraction throughput (images/s) and peak memory for a random-init open_clip model.

Usage: python scripts/bench_features.py [--model ViT-B-32] [--images 512] [--batch-size 64]
Runs on the CPU, and on CUDA (fp32 and bf16 autocast) when a GPU is present. Each measurement runs in
a child process that reports its own peak resident memory (ru_maxrss).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from PIL import Image
import numpy as np
from uqvlm.models import load_vlm
model, n, bs, device, precision = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.manual_seed(0)
vlm = load_vlm(model, None, device=device, precision=precision)  # the VLM applies AMP itself
rng = np.random.default_rng(0)
images = [Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)) for _ in range(bs)]
pixels = torch.stack([vlm.preprocess(im) for im in images])
dev = torch.device(device)
def step():
    f = vlm.encode_images(pixels.to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return f
step()  # warm-up
t0 = time.perf_counter(); done = 0
while done < n:
    step(); done += bs
dt = time.perf_counter() - t0
gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else 0.0
host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"images_per_s": done / dt, "gpu_peak_mib": gpu_peak, "host_peak_mib": host_peak}))
"""


def measure(model: str, n: int, bs: int, device: str, precision: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(n), str(bs), device, precision],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()

    import torch

    runs = [("cpu", "fp32")]
    if torch.cuda.is_available():
        runs += [("cuda", "fp32"), ("cuda", "bf16"), ("cuda", "fp16")]
    print(
        f"{args.model} (random init), {args.images} images of 256x256 -> model preprocessing, batch {args.batch_size}"
    )
    print(f"{'device':<8}{'precision':<10}{'images/s':>10}{'host peak MiB':>15}{'GPU peak MiB':>14}")
    for device, precision in runs:
        n = args.images if device == "cpu" else args.images * 16
        r = measure(args.model, n, args.batch_size if device == "cpu" else 256, device, precision)
        print(
            f"{device:<8}{precision:<10}{r['images_per_s']:>10.1f}{r['host_peak_mib']:>15.0f}{r['gpu_peak_mib']:>14.0f}"
        )
    print("host peak = max resident set of the measuring child process (includes the model's weights).")


if __name__ == "__main__":
    main()
