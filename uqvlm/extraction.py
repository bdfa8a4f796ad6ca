"""Batched feature extraction with a resumable, sharded on-disk cache.

Features are written shard by shard (``shard_size`` items each) under a directory keyed by the model,
its checkpoint, the dataset and split, the preprocessing and the precision; a killed extraction resumes
from the shards already written, and host memory during extraction is bounded by one shard.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from rich.progress import TextColumn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from uqvlm.cache import cache_key, get_or_build, load_verified
from uqvlm.console import console, progress
from uqvlm.data.base import PairDataset
from uqvlm.devices import model_device
from uqvlm.features import Features

SHARD_SIZE = 4096


class _Preprocessed(Dataset):
    """Applies the model's image transform in the DataLoader workers (indexed by the dataset's own indices)."""

    def __init__(self, dataset: Dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image, target = self.dataset[i]
        return self.transform(image), target


class _Collate:
    """Stacks pixels; labels become a LongTensor, captions token ids when a tokenizer is given (so that
    tokenizing runs in the workers too, off the loop that feeds the model)."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def __call__(self, batch):
        pixels = torch.stack([b[0] for b in batch])
        targets = [b[1] for b in batch]
        if isinstance(targets[0], int):
            targets = torch.tensor(targets, dtype=torch.long)
        elif self.tokenizer is not None:
            targets = self.tokenizer(targets)
        return pixels, targets


def _features_dict(f: Features) -> dict[str, Any]:
    return {"activations": f.activations, "embeddings": f.embeddings, "residuals": f.residuals}


def _features_from(d: dict[str, Any]) -> Features:
    return Features(d["activations"], d["embeddings"], d.get("residuals"))


def _shard_batches(shards: Sequence[int], n: int, shard_size: int, batch_size: int) -> list[list[int]]:
    """Index batches over ``shards`` in order; no batch crosses a shard's end."""
    batches = []
    for i in shards:
        stop = min(n, (i + 1) * shard_size)
        batches += [
            list(range(s, min(s + batch_size, stop))) for s in range(i * shard_size, stop, batch_size)
        ]
    return batches


def extract(
    vlm,
    dataset: Dataset,
    *,
    cache_dir: str | Path,
    model_id: dict[str, Any],
    dataset_id: str,
    batch_size: int = 256,
    num_workers: int = 0,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    shard_size: int = SHARD_SIZE,
    description: str = "features",
) -> dict[str, Any]:
    """Encode every item of ``dataset`` and return ``{"image": Features, "targets": ...}`` (on the CPU).

    For labelled datasets ``targets`` is a LongTensor of labels; for image-caption pairs the captions
    are encoded too and returned as ``"text": Features`` (``targets`` is then None).

    The model encodes on its own device (``vlm.device``); ``device`` may only repeat it (None: follow the
    model; another device is a :class:`~uqvlm.devices.DeviceMismatchError`). One DataLoader streams every
    shard still to do, with ``num_workers`` worker processes decoding, preprocessing and tokenizing (pinned
    memory on CUDA); a shard's features stay on the device until the shard is complete.
    """
    dev = model_device(vlm, device, "feature extraction")
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
        tokenizer = getattr(vlm, "tokenizer", None) if isinstance(dataset, PairDataset) else None
        loader = DataLoader(
            _Preprocessed(dataset, vlm.preprocess),
            batch_sampler=_shard_batches(todo, n, shard_size, batch_size),
            num_workers=num_workers,
            collate_fn=_Collate(tokenizer),
            pin_memory=dev.type == "cuda",
            prefetch_factor=prefetch_factor(num_workers),
        )
        batches = iter(loader)
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
                n_batches = math.ceil(min(shard_size, n - i * shard_size) / batch_size)
                built = False

                def build(i=i, n_batches=n_batches):
                    nonlocal built
                    built = True
                    parts = _encode_batches(vlm, (next(batches) for _ in range(n_batches)), on_batch)
                    return {"meta": {**meta, "shard": i}, **parts}

                entries[i] = get_or_build(shards[i], build, {**meta, "shard": i})
                if not built:  # another process wrote this shard meanwhile: skip its batches
                    for _ in range(n_batches):
                        next(batches)
    parts = [entries[i] for i in range(n_shards)]
    out: dict[str, Any] = {"image": Features.cat([_features_from(p["image"]) for p in parts])}
    out["text"] = (
        Features.cat([_features_from(p["text"]) for p in parts]) if parts[0].get("text") is not None else None
    )
    out["targets"] = torch.cat([p["targets"] for p in parts]) if parts[0]["targets"] is not None else None
    return out


def prefetch_factor(num_workers: int) -> int | None:
    """Batches each DataLoader worker keeps ready: a few more when there are few workers."""
    if num_workers == 0:
        return None
    return 4 if num_workers <= 4 else 2


@torch.no_grad()
def _encode_batches(vlm, batches: Iterator[tuple[Tensor, Any]], on_batch) -> dict[str, Any]:
    """Encode one shard's batches; the features move to the CPU (float32) once, at the shard's end."""
    images, texts, targets = [], [], []
    for pixels, target in batches:
        # The VLM runs under its own device and precision (AMP on CUDA).
        images.append(vlm.encode_images(pixels))
        if isinstance(target, Tensor) and target.dtype == torch.long and target.ndim == 1:
            targets.append(target)
        else:  # captions: strings, or token ids [B, L] tokenized in the workers
            texts.append(vlm.encode_texts(target))
        on_batch(len(pixels))
    return {
        "image": _features_dict(Features.cat(images).to("cpu", torch.float32)),
        "text": _features_dict(Features.cat(texts).to("cpu", torch.float32)) if texts else None,
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
