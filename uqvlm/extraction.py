"""Batched feature extraction with a resumable, sharded on-disk cache.

Features are written shard by shard (``shard_size`` items each) under a directory keyed by the model,
its checkpoint, the dataset and split, the preprocessing and the precision; a killed extraction resumes
from the shards already written, and host memory during extraction is bounded by one shard.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import TextColumn
from torch.utils.data import DataLoader, Dataset

from uqvlm.cache import cache_key, get_or_build, load_verified
from uqvlm.console import console, progress
from uqvlm.devices import resolve_device
from uqvlm.features import Features

SHARD_SIZE = 4096


class _Preprocessed(Dataset):
    """Applies the model's image transform in the DataLoader workers."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], transform):
        self.dataset, self.indices, self.transform = dataset, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, target = self.dataset[self.indices[i]]
        return self.transform(image), target


def _collate(batch):
    pixels = torch.stack([b[0] for b in batch])
    targets = [b[1] for b in batch]
    if isinstance(targets[0], int):
        targets = torch.tensor(targets, dtype=torch.long)
    return pixels, targets


def _features_dict(f: Features) -> dict[str, Any]:
    return {"activations": f.activations, "embeddings": f.embeddings, "residuals": f.residuals}


def _features_from(d: dict[str, Any]) -> Features:
    return Features(d["activations"], d["embeddings"], d.get("residuals"))


def extract(
    vlm,
    dataset: Dataset,
    *,
    cache_dir: str | Path,
    model_id: dict[str, Any],
    dataset_id: str,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str = "auto",
    precision: str = "fp32",
    shard_size: int = SHARD_SIZE,
    description: str = "features",
) -> dict[str, Any]:
    """Encode every item of ``dataset`` and return ``{"image": Features, "targets": ...}``.

    For labelled datasets ``targets`` is a LongTensor of labels; for image-caption pairs the captions
    are encoded too and returned as ``"text": Features`` (``targets`` is then None).
    """
    dev = resolve_device(device)
    key = cache_key(
        model=model_id,
        dataset=dataset_id,
        preprocess=repr(vlm.preprocess),
        precision=precision,
        shard_size=shard_size,
    )
    root = Path(cache_dir) / "features" / key
    n = len(dataset)
    if n == 0:
        from uqvlm.errors import DataUnavailableError

        raise DataUnavailableError(f"dataset {dataset_id!r} is empty: nothing to encode")
    n_shards = math.ceil(n / shard_size)
    meta = {"key": key, "n": n}
    shards = [root / f"shard-{i:05d}.pt" for i in range(n_shards)]
    entries = {i: load_verified(p, {**meta, "shard": i}) for i, p in enumerate(shards)}
    todo = [i for i, entry in entries.items() if entry is None]
    if todo:
        if len(todo) < n_shards:
            console.print(f"resuming {description}: {n_shards - len(todo)}/{n_shards} shards cached")
        with progress(TextColumn("{task.fields[rate]}")) as bar:
            task = bar.add_task(f"encoding {description}", total=n, rate="")
            bar.advance(
                task, sum(min(shard_size, n - i * shard_size) for i in range(n_shards) if i not in todo)
            )
            start, encoded = time.perf_counter(), 0

            def on_batch(k: int) -> None:
                nonlocal encoded
                encoded += k
                rate = encoded / max(time.perf_counter() - start, 1e-9)
                bar.update(task, advance=k, rate=f"{rate:,.0f} img/s")

            for i in todo:
                indices = range(i * shard_size, min(n, (i + 1) * shard_size))

                def build(indices=indices, i=i):
                    parts = _encode_shard(
                        vlm, dataset, indices, batch_size, num_workers, dev, precision, on_batch
                    )
                    return {"meta": {**meta, "shard": i}, **parts}

                entries[i] = get_or_build(shards[i], build, {**meta, "shard": i})
    parts = [entries[i] for i in range(n_shards)]
    out: dict[str, Any] = {"image": Features.cat([_features_from(p["image"]) for p in parts])}
    out["text"] = (
        Features.cat([_features_from(p["text"]) for p in parts]) if parts[0].get("text") is not None else None
    )
    out["targets"] = torch.cat([p["targets"] for p in parts]) if parts[0]["targets"] is not None else None
    return out


@torch.no_grad()
def _encode_shard(vlm, dataset, indices, batch_size, num_workers, device, precision, on_batch):
    loader = DataLoader(
        _Preprocessed(dataset, indices, vlm.preprocess),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    images, texts, targets = [], [], []
    for pixels, target in loader:
        # The VLM runs under its own device and precision (AMP on CUDA); features are stored in float32.
        images.append(vlm.encode_images(pixels.to(device, non_blocking=True)).to("cpu", torch.float32))
        if isinstance(target, list):
            texts.append(vlm.encode_texts(target).to("cpu", torch.float32))
        else:
            targets.append(target)
        on_batch(len(pixels))
    return {
        "image": _features_dict(Features.cat(images)),
        "text": _features_dict(Features.cat(texts)) if texts else None,
        "targets": torch.cat(targets) if targets else None,
    }


def encode_prompts(
    vlm,
    prompts: list[list[str]],
    *,
    cache_dir: str | Path,
    model_id: dict[str, Any],
    precision: str = "fp32",
    batch_size: int = 256,
) -> Features:
    """Class text features: per class, the mean over its prompts of activations and embeddings.

    The last layer is linear, so averaging activations and embeddings keeps z = W a (+ b) exact and
    the posterior variance of the class embedding is that of the averaged activation.
    """
    key = cache_key(model=model_id, prompts=prompts, precision=precision)
    path = Path(cache_dir) / "text" / f"{key}.pt"

    @torch.no_grad()
    def build():
        flat = [p for ps in prompts for p in ps]
        chunks = []
        for s in range(0, len(flat), batch_size):
            chunks.append(vlm.encode_texts(flat[s : s + batch_size]).to("cpu", torch.float32))
        f = Features.cat(chunks)
        counts = torch.tensor([len(ps) for ps in prompts])
        owner = torch.repeat_interleave(torch.arange(len(prompts)), counts)

        def mean(x):
            if x is None:
                return None
            return torch.zeros(len(prompts), x.shape[1]).index_add_(0, owner, x) / counts[:, None]

        return {
            "meta": {"key": key},
            **_features_dict(Features(mean(f.activations), mean(f.embeddings), mean(f.residuals))),
        }

    return _features_from(get_or_build(path, build, {"key": key}))
