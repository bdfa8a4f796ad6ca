"""Helpers shared by the dataset sources: image decoding, seeded subsets, bad-image handling, text files,
and the labelled-files base of the folder sources."""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uqvlm.config_utils import to_plain
from uqvlm.data.base import ZeroShotDataset, fingerprint_of
from uqvlm.data.templates import resolve_templates
from uqvlm.errors import DatasetFormatError, DataUnavailableError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
ON_BAD_IMAGE = ("error", "skip")
# Max consecutive undecodable pair items skipped over before giving up (a broken shard, not a bad image).
MAX_REPLACEMENTS = 1000


def _check_on_bad_image(value: str) -> str:
    if value not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {value!r}")
    return value


def decode_image(data: Any) -> Image.Image:
    """An RGB PIL image from bytes, a path, a PIL image or a datasets ``{"bytes", "path"}`` dict.

    The pixels are fully decoded here (``load``), so truncated files fail now, not in a worker later.
    """
    if isinstance(data, Mapping):
        data = data.get("bytes") or data.get("path")
    if isinstance(data, Image.Image):
        img = data
    elif isinstance(data, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(data)))
    elif isinstance(data, (str, os.PathLike)):
        img = Image.open(data)
    else:
        raise TypeError(f"cannot decode an image from {type(data).__name__}")
    img.load()
    return img.convert("RGB")


def _subsample(count: int, n: int | None, seed: int) -> np.ndarray:
    """Positions ``0..count-1``, or a seeded random subset of ``n`` of them, in ascending order."""
    if n is None or n >= count:
        return np.arange(count)
    if n < 0:
        raise ValueError(f"n must be positive, got {n}")
    rng = np.random.default_rng(seed)
    return np.sort(rng.permutation(count)[:n])


def _select(
    count: int, n: int | None, seed: int, is_good: Callable[[int], bool] | None = None
) -> tuple[np.ndarray, list[int]]:
    """Positions to keep (ascending) and those skipped as undecodable.

    Without ``is_good`` this is :func:`_subsample`. With it, items are visited in the same seeded order
    and undecodable ones are replaced by the next in that order, so a dataset without bad images gives
    the same subset under ``skip`` and ``error``.
    """
    if is_good is None:
        return _subsample(count, n, seed), []
    order = np.arange(count) if n is None or n >= count else np.random.default_rng(seed).permutation(count)
    kept, skipped = [], []
    for i in order:
        if n is not None and len(kept) >= n:
            break
        (kept if is_good(int(i)) else skipped).append(int(i))
    return np.sort(np.asarray(kept, dtype=np.int64)), skipped


def _read_lines(path: str | Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def _clean_name(name: str) -> str:
    return name.replace("_", " ").strip()


def _with_replacement(ds: Any, index: int) -> tuple[Image.Image, str]:
    """``ds._item(index)``; with on_bad_image=skip an undecodable item yields the next decodable one."""
    for step in range(MAX_REPLACEMENTS):
        j = (index + step) % len(ds)
        try:
            return ds._item(j)
        except (OSError, SyntaxError, ValueError, TypeError) as e:  # PIL's decode errors
            if ds.on_bad_image == "error":
                raise DatasetFormatError(
                    f"{ds.name}: item {j} cannot be decoded ({e}); set on_bad_image=skip to replace such items"
                ) from e
            ds.skipped += 1
            log.warning("%s: item %d cannot be decoded (%s); using item %d", ds.name, j, e, (j + 1) % len(ds))
    raise DatasetFormatError(f"{ds.name}: {MAX_REPLACEMENTS} consecutive undecodable items from {index}")


class LabelledFiles(ZeroShotDataset):
    """Labelled image files under one ``root`` folder: what the folder sources (class folders, split files,
    the ImageNet-R folder) share once they have listed their ``(relative path, label)`` items."""

    root: Path
    on_bad_image: str
    n: int | None
    seed: int

    def _set_classes(
        self, own: list[str], classnames: Any, own_spec: str, templates: Any, where: str
    ) -> None:
        """Class names (``classnames == own_spec``: the source's own, ``own``; else a list of as many) and
        templates (a set name or a list: these sources have no templates file)."""
        spec = to_plain(classnames)
        self.classnames = list(own) if spec == own_spec else [str(c) for c in spec]
        if len(self.classnames) != len(own):
            raise DatasetFormatError(
                f"{len(self.classnames)} class names for the {len(own)} classes of {where}"
            )
        self.templates = resolve_templates(to_plain(templates)) or []
        if not self.templates:
            raise ValueError(f"{where} has no templates file: give a template set name or a list")

    def _index_files(self, files: list[str], labels: list[int]) -> None:
        """Keep the listed items (a seeded subset of ``n``; undecodable ones dropped under ``skip``)."""
        check = (lambda i: self._decodes(files[i])) if self.on_bad_image == "skip" else None
        order, self.skipped_indices = _select(len(files), self.n, self.seed, check)
        if len(order) == 0:
            raise DataUnavailableError(f"{self.name}: no decodable image under {str(self.root)!r}")
        self._files = [files[i] for i in order]
        self._labels = [labels[i] for i in order]
        self._sizes = [(self.root / f).stat().st_size for f in self._files]

    @property
    def skipped(self) -> int:
        return len(self.skipped_indices)

    def _decodes(self, rel: str) -> bool:
        try:
            decode_image(self.root / rel)
            return True
        except Exception as e:
            log.warning("skipping undecodable image %s: %s", self.root / rel, e)
            return False

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        path = self.root / self._files[index]
        try:
            img = decode_image(path)
        except Exception as e:
            raise DatasetFormatError(
                f"image {path} cannot be decoded ({e}); set on_bad_image=skip to drop such images"
            ) from e
        return img, self._labels[index]

    def labels(self) -> np.ndarray:
        return np.asarray(self._labels, dtype=np.int64)

    def listing_fingerprint(self) -> str:
        """The kept files, their labels and sizes, hashed."""
        return fingerprint_of(self._files, self._labels, self._sizes)
