"""Feature-extraction throughput (images/s) of a random-init open_clip model, two ways:

- encoder: ``vlm.encode_images`` on a batch of pixels already on the device (the ceiling);
- pipeline: ``uqvlm.extraction.extract`` from JPEG bytes to cached features (decode, preprocess and
  collate in DataLoader workers, pinned host memory and non-blocking copies on CUDA, the encoder, the
  shard written to a temporary cache).

Each configuration runs in its own child process, which also reports its peak memory. On the CPU it
measures fp32 eager; on CUDA fp32, bf16 and fp16 (autocast, channels-last), each eager and, with
``--compile``, compiled, with the compiled features' largest difference from eager on the same batch.

Usage: python scripts/bench_features.py [--model ViT-B-32] [--images 256] [--batch-size auto]
       [--workers auto] [--compile] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import io, json, resource, sys, tempfile, time
import numpy as np, torch
from PIL import Image
from uqvlm.data.base import ZeroShotDataset
from uqvlm.devices import largest_fitting_batch, loader_workers
from uqvlm.extraction import extract
from uqvlm.models import load_vlm

model, n, batch, device, precision, compile_, workers = sys.argv[1:8]
n, compile_ = int(n), compile_ == "1"
torch.manual_seed(0)
vlm = load_vlm(model, None, device=device, precision=precision)
dev = vlm.device
cuda = dev.type == "cuda"
if cuda:
    vlm.channels_last()
sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
eager_ref = None
rng = np.random.default_rng(0)
pixels_cpu = torch.stack([vlm.preprocess(Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)))
                          for _ in range(8)])
if compile_:
    eager_ref = vlm.encode_images(pixels_cpu).embeddings.float().cpu()
    vlm.compile()
batch = largest_fitting_batch(vlm.encode_dummy) if batch == "auto" and cuda else (256 if batch == "auto" else int(batch))
workers = loader_workers(workers if workers == "auto" else int(workers), dev)

# encoder alone: pixels already on the device
pixels = pixels_cpu.repeat((batch + 7) // 8, 1, 1, 1)[:batch].to(dev)
f = vlm.encode_images(pixels); sync()  # warm-up (and compilation)
vlm.encode_images(pixels[: max(1, batch // 2)]); sync()
diff = None
if eager_ref is not None:
    got = vlm.encode_images(pixels_cpu).embeddings.float().cpu()
    diff = float((got - eager_ref).abs().max() / eager_ref.abs().max())
reps = max(2, n // batch)
t0 = time.perf_counter()
for _ in range(reps):
    vlm.encode_images(pixels)
sync()
encoder = reps * batch / (time.perf_counter() - t0)

# loader to features: JPEG bytes decoded in the workers, through extract() into a fresh cache
jpegs = []
for i in range(32):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((500, 375)).save(buf, "JPEG", quality=90)
    jpegs.append(buf.getvalue())

class Jpegs(ZeroShotDataset):
    name, split, classnames, templates = "jpegs", "test", ["x"], ["{c}"]
    def __init__(self, size): self.size = size
    def __len__(self): return self.size
    def __getitem__(self, i): return Image.open(io.BytesIO(jpegs[i % len(jpegs)])).convert("RGB"), 0
    def fingerprint(self): return f"jpegs-{self.size}"

with tempfile.TemporaryDirectory() as cache:
    kw = dict(cache_dir=cache, model_id={"name": model}, batch_size=batch, num_workers=workers, precision=precision)
    extract(vlm, Jpegs(batch), dataset_id="warm-up", **kw)
    t0 = time.perf_counter()
    extract(vlm, Jpegs(n), dataset_id="timed", **kw)
    pipeline = n / (time.perf_counter() - t0)
gpu_peak = torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else 0.0
host_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"encoder": encoder, "pipeline": pipeline, "batch": batch, "workers": workers,
                  "compiled_vs_eager": diff, "gpu_peak_mib": gpu_peak, "host_peak_mib": host_peak}))
"""


def measure(
    model: str, n: int, batch: str, device: str, precision: str, compiled: bool, workers: str
) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model, str(n), batch, device, precision, str(int(compiled)), workers],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"measurement {device} {precision} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=None, help="images per measurement (CPU 64, CUDA 16384)")
    ap.add_argument("--batch-size", default="auto", help="auto: the largest that fits (CUDA), 256 (CPU)")
    ap.add_argument("--workers", default="auto", help="DataLoader workers (auto: sized to the machine)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile'd encoders")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    import torch

    from uqvlm.devices import resolve_device

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    runs = [(p, c) for p in (("fp32", "bf16", "fp16") if cuda else ("fp32",)) for c in (False, True)]
    runs = [(p, c) for p, c in runs if args.compile or not c]
    n = args.images or (16384 if cuda else 64)
    batch = args.batch_size if cuda or args.batch_size != "auto" else "32"
    where = torch.cuda.get_device_name(device) if cuda else "CPU"
    print(f"{args.model} (random init) on {where}, torch {torch.__version__}; {n} images per measurement")
    if not torch.cuda.is_available():
        print("CUDA is absent here: CPU figures only (the GPU figures and the 2x goal were not measured)")
    header = f"{'precision':<10}{'compiled':<10}{'batch':>6}{'workers':>8}{'encoder img/s':>15}{'pipeline img/s':>16}"
    print(header + f"{'compiled vs eager':>19}{'host MiB':>10}{'GPU MiB':>9}")
    for precision, compiled in runs:
        r = measure(args.model, n, batch, str(device), precision, compiled, args.workers)
        diff = "" if r["compiled_vs_eager"] is None else f"{r['compiled_vs_eager']:.1e}"
        print(
            f"{precision:<10}{'yes' if compiled else 'no':<10}{r['batch']:>6}{r['workers']:>8}{r['encoder']:>15,.1f}"
            f"{r['pipeline']:>16,.1f}{diff:>19}{r['host_peak_mib']:>10,.0f}{r['gpu_peak_mib']:>9,.0f}"
        )
    print(
        "encoder = encode_images on pixels already on the device; pipeline = extract() from JPEG bytes (500x375)\n"
        "to cached features; compiled vs eager = max |compiled - eager| / max |eager| of the image embeddings."
    )


if __name__ == "__main__":
    main()
