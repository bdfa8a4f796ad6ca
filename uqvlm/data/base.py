"""The one dataset interface every source (shapes world, Hugging Face, folders, webdataset) implements."""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


def fingerprint_of(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts, used in cache keys."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ZeroShotDataset(Dataset, ABC):
    """Labelled images for zero-shot classification.

    Items are ``(PIL.Image in RGB, int label)``; ``classnames[label]`` names the class and
    ``templates`` are prompt templates with a ``{c}`` placeholder for the class name. ``class_ids``, when
    known, gives each class a stable identity across datasets (ImageNet's WordNet ids), by which domains are
    aligned; None when the classes are known by name only.
    """

    name: str
    split: str
    classnames: list[str]
    templates: list[str]
    class_ids: list[str] | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[Image.Image, int]: ...

    @abstractmethod
    def fingerprint(self) -> str:
        """Everything that determines the items (source, revision, split, seed, size), hashed."""

    def labels(self) -> np.ndarray:
        """Every item's label, in item order (sources with an index override this without decoding)."""
        return np.asarray([self[i][1] for i in range(len(self))], dtype=np.int64)

    def prompts(self) -> list[list[str]]:
        """Per class, the prompts made from every template."""
        return [[t.format(c=name) for t in self.templates] for name in self.classnames]


class PairDataset(Dataset, ABC):
    """Image-caption pairs (for Hessian estimation and pretraining). Items are ``(PIL.Image, str)``."""

    name: str

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[Image.Image, str]: ...

    @abstractmethod
    def fingerprint(self) -> str: ...


class PairRange(PairDataset):
    """Pairs ``[start, stop)`` of ``pairs`` as a dataset of their own (its fingerprint names the range), so
    that a job extracting one part of the Hessian data caches the features of that part only."""

    def __init__(self, pairs: PairDataset, start: int, stop: int) -> None:
        if not 0 <= start <= stop <= len(pairs):
            raise ValueError(f"pair range [{start}, {stop}) is not within the {len(pairs)} pairs")
        self.pairs, self.start, self.stop = pairs, start, stop
        self.name = pairs.name

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.pairs[self.start + index]

    def fingerprint(self) -> str:
        return fingerprint_of("pair-range", self.pairs.fingerprint(), self.start, self.stop)
