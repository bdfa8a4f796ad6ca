"""The published evaluation splits: CoOp's split files, and seeded cuts of a source's item list.

A dataset config chooses its protocol (``dataset.protocol``); the protocol selects its split here:

- :class:`ZhouSplitZeroShot` (``kind: zhou``): a split of CoOp's ``split_zhou_<Dataset>.json`` (Zhou et al.;
  KaiyangZhou/CoOp @ ff61507), images under ``root``. BayesVLM evaluates UCF101, SUN397 and EuroSAT on its
  ``test`` key (bayesvlm/data/{ucf101,sun397,eurosat}.py @ 855be8b).
- ``subset`` rules (a dataset section's ``subset: {rule: ..., part: test|train, ...}``), each a function of
  the item count alone, applied to the source's items in its published order:

  - ``numpy_permutation``: BayesVLM's ImageNet-R split (bayesvlm/data/imagenet_r.py @ 855be8b),
    ``np.random.seed(0); perm = np.random.permutation(n)``, the first ``int(0.75 n)`` train, the rest test.
  - ``hf_train_test_split``: Hugging Face ``Dataset.train_test_split(test_size, seed)`` (no stratification),
    BayesVLM's ImageNet-Sketch cut (bayesvlm/data/imagenet_sketch.py @ 855be8b): read from datasets 5.2.0's
    arrow_dataset.py, ``perm = np.random.default_rng(seed).permutation(n)``, test = the first
    ``ceil(test_size n)`` of it, train = the rest.

- :func:`published_domain_split` / :func:`published_pool_order`: BayesVLM's active-learning domain splits
  (bayesvlm/data/homeoffice_da.py and imagenet_da.py @ 855be8b).

:class:`SubsetView` is a dataset restricted to some of its items, in a given order.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uqvlm.cache import file_digest
from uqvlm.config_utils import to_plain
from uqvlm.data.base import ZeroShotDataset, fingerprint_of
from uqvlm.data.sources.common import LabelledFiles, _check_on_bad_image, _subsample
from uqvlm.errors import ConfigError, DatasetFormatError, DataUnavailableError

# ------------------------------------------------------------------------------------------ CoOp split files

# Where each CoOp split file and its images come from (CoOp DATASETS.md @ ff61507, the same links as
# BayesVLM's README): what a missing file's message tells the user.
ZHOU_SPLITS: dict[str, dict[str, str]] = {
    "ucf101": {
        "file": "split_zhou_UCF101.json",
        "url": "https://drive.google.com/file/d/1I0S0q91hJfsV9Gf4xDIjgDq4AqBNJb1y/view",
        "images": "UCF-101-midframes/ (https://drive.google.com/file/d/10Jqome3vtUA2keJkNanAiFpgbyC9Hc2O/view)",
    },
    "sun397": {
        "file": "split_zhou_SUN397.json",
        "url": "https://drive.google.com/file/d/1y2RD81BYuiyvebdN-JymPfyWYcd8_MUq/view",
        "images": "SUN397/ (http://vision.princeton.edu/projects/2010/SUN/SUN397.tar.gz)",
    },
    "eurosat": {
        "file": "split_zhou_EuroSAT.json",
        "url": "https://drive.google.com/file/d/1Ip7yaCWFi0eaOFUGga0lUdVi_DDQth1o/view",
        "images": "2750/ (http://madm.dfki.de/files/sentinel/EuroSAT.zip)",
    },
}
ZHOU_KEYS = ("train", "val", "test")


def read_zhou_split(path: str | os.PathLike) -> dict[str, list[tuple[str, int, str]]]:
    """A CoOp split file: ``{"train"|"val"|"test": [[relative image path, label, classname], ...]}``
    (CoOp's ``OxfordPets.save_split``/``read_split``)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path} is not a JSON split file ({e})") from e
    if not isinstance(data, Mapping) or not any(k in data for k in ZHOU_KEYS):
        raise DatasetFormatError(f"{path}: expected a mapping with keys {', '.join(ZHOU_KEYS)}")
    out: dict[str, list[tuple[str, int, str]]] = {}
    for key, entries in data.items():
        try:
            out[key] = [(str(e[0]), int(e[1]), str(e[2])) for e in entries]
        except (TypeError, ValueError, IndexError) as e:
            raise DatasetFormatError(f"{path}: {key!r} entries must be [path, label, classname] ({e})") from e
    return out


def zhou_classnames(splits: Mapping[str, Sequence[tuple[str, int, str]]], where: str) -> list[str]:
    """Class names by label, as the split file spells them (BayesVLM's ``_label_names_from_split_info``),
    gathered over every split so a class absent from one split still has its name."""
    names: dict[int, str] = {}
    for entries in splits.values():
        for _, label, name in entries:
            if names.setdefault(label, name) != name:
                raise DatasetFormatError(
                    f"{where}: label {label} is named both {names[label]!r} and {name!r}"
                )
    if sorted(names) != list(range(len(names))):
        raise DatasetFormatError(f"{where}: labels must be 0..K-1, got {sorted(names)[:5]}...")
    return [names[i] for i in range(len(names))]


class ZhouSplitZeroShot(LabelledFiles):
    """One split (``test`` by default) of a CoOp split file, images under ``root``.

    ``split_file``: the ``split_zhou_<Dataset>.json``; ``root``: the folder its paths are relative to (UCF101:
    ``UCF-101-midframes``, SUN397: ``SUN397``, EuroSAT: ``2750``). ``coop`` names the CoOp dataset (a key of
    :data:`ZHOU_SPLITS`) so a missing file's message says where to download it. Class names are the file's
    third fields, verbatim as BayesVLM uses them (underscores kept), or a list.
    """

    def __init__(
        self,
        split_file: str | os.PathLike | None,
        root: str | os.PathLike | None,
        split: str = "test",
        *,
        coop: str | None = None,
        classnames: Any = "split_file",
        templates: Any = "paper",
        name: str | None = None,
        on_bad_image: str = "error",
        n: int | None = None,
        seed: int = 0,
    ) -> None:
        self.on_bad_image = _check_on_bad_image(on_bad_image)
        self.name, self.split, self.n, self.seed = name or (coop or "zhou"), split, n, seed
        info = ZHOU_SPLITS.get(coop or "", {})
        file_name = info.get("file", "the split_zhou_<Dataset>.json file")
        if split_file is None or not os.path.isfile(os.path.expanduser(str(split_file))):
            where = f" ({split_file} does not exist)" if split_file is not None else ""
            url = f" from {info['url']}" if info else ""
            raise DataUnavailableError(
                f"dataset {self.name!r} (CoOp's Zhou split) needs its split file{where}: download {file_name}{url} "
                f"and set dataset.split_file=/path/to/{info.get('file', 'split.json')}, with the images under "
                f"dataset.root=/path/to/{info.get('images', 'images/')}"
            )
        if root is None or not os.path.isdir(os.path.expanduser(str(root))):
            where = f" ({root} does not exist)" if root is not None else ""
            raise DataUnavailableError(
                f"dataset {self.name!r} (CoOp's Zhou split) needs its images{where}: set "
                f"dataset.root=/path/to/{info.get('images', 'images/')} (the folder {file_name}'s paths are relative to)"
            )
        self.split_file = Path(os.path.expanduser(str(split_file)))
        self.root = Path(os.path.expanduser(str(root)))
        splits = read_zhou_split(self.split_file)
        if split not in splits:
            raise DataUnavailableError(
                f"{self.split_file} has no {split!r} split; it has {', '.join(splits)}"
            )
        entries = splits[split]
        if not entries:
            raise DataUnavailableError(f"{self.split_file}: the {split!r} split is empty")
        names = zhou_classnames(splits, str(self.split_file))
        self._set_classes(names, classnames, "split_file", templates, str(self.split_file))
        files = [rel for rel, _, _ in entries]
        missing = [f for f in files if not (self.root / f).is_file()]
        if missing:
            raise DataUnavailableError(
                f"{len(missing)} of the {len(files)} {split!r} images of {self.split_file.name} are missing under "
                f"{str(self.root)!r} (first: {missing[0]}); dataset.root must be the folder its paths are relative to"
            )
        self._index_files(files, [label for _, label, _ in entries])

    def fingerprint(self) -> str:
        return fingerprint_of(
            "zhou",
            file_digest(self.split_file),
            str(self.root.resolve()),
            self.split,
            self.listing_fingerprint(),
            self.n,
            self.seed,
        )


# ---------------------------------------------------------------------------------------- seeded subsets


def numpy_permutation_split(
    count: int, train_fraction: float = 0.75, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions of BayesVLM's ImageNet-R split: ``np.random.seed(seed)`` then
    ``np.random.permutation(count)``, the first ``int(train_fraction * count)`` train, the rest test.

    ``RandomState(seed)`` is the generator ``np.random.seed`` reseeds, so the global state is left alone.
    """
    perm = np.random.RandomState(seed).permutation(count)
    cut = int(train_fraction * count)
    return perm[:cut], perm[cut:]


def hf_train_test_split(count: int, test_size: float = 0.025, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) positions of Hugging Face ``Dataset.train_test_split(test_size=..., seed=...)``: a
    ``np.random.default_rng(seed)`` permutation, the first ``ceil(test_size * count)`` test, the rest train."""
    n_test = math.ceil(test_size * count)
    perm = np.random.default_rng(seed).permutation(count)
    return perm[n_test:], perm[:n_test]


SUBSET_RULES: dict[str, Callable[..., tuple[np.ndarray, np.ndarray]]] = {
    "numpy_permutation": numpy_permutation_split,
    "hf_train_test_split": hf_train_test_split,
}
SUBSET_PARTS = ("train", "test")


def subset_positions(count: int, spec: Mapping[str, Any], path: str = "dataset.subset") -> np.ndarray:
    """Positions (in the rule's order) of the part ``spec`` selects from ``count`` items."""
    spec = dict(spec)
    rule = spec.pop("rule", None)
    part = spec.pop("part", "test")
    if rule not in SUBSET_RULES:
        raise ConfigError(f"{path}.rule must be one of {', '.join(SUBSET_RULES)}, got {rule!r}")
    if part not in SUBSET_PARTS:
        raise ConfigError(f"{path}.part must be one of {', '.join(SUBSET_PARTS)}, got {part!r}")
    try:
        train, test = SUBSET_RULES[rule](count, **spec)
    except TypeError as e:
        raise ConfigError(f"{path}: {e}") from None
    return np.asarray(train if part == "train" else test, dtype=np.int64)


class SubsetView(ZeroShotDataset):
    """The items ``positions`` of ``base``, in that order; ``what`` (JSON-serialisable) says how they were
    chosen and enters the fingerprint beside the positions themselves."""

    def __init__(self, base: ZeroShotDataset, positions: Sequence[int] | np.ndarray, what: Any = None):
        self.base, self.what = base, what
        self.positions = np.asarray(positions, dtype=np.int64)
        if len(self.positions) and (self.positions.min() < 0 or self.positions.max() >= len(base)):
            raise IndexError(f"positions outside the {len(base)} items of {base.name!r}")
        self.name, self.split = base.name, base.split
        self.classnames, self.templates, self.class_ids = base.classnames, base.templates, base.class_ids

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.base[int(self.positions[index])]

    def labels(self) -> np.ndarray:
        return self.base.labels()[self.positions]

    def fingerprint(self) -> str:
        digest = fingerprint_of(self.positions.tolist())
        return fingerprint_of("subset", self.base.fingerprint(), self.what, digest)


def select_subset(
    ds: ZeroShotDataset, spec: Mapping[str, Any] | None, n: int | None = None, seed: int = 0
) -> ZeroShotDataset:
    """``ds`` cut to the part of ``spec`` (a ``subset`` rule), then capped to a seeded ``n`` of it."""
    if spec:
        spec = dict(to_plain(spec))
        ds = SubsetView(ds, subset_positions(len(ds), spec), what=spec)
    if n is not None and n < len(ds):
        ds = SubsetView(ds, _subsample(len(ds), n, seed), what={"n": n, "seed": seed})
    return ds


# ------------------------------------------------------------------------------ active-learning domains

# BayesVLM's domain splits (homeoffice_da.py, imagenet_da.py @ 855be8b): per domain, the path-sorted items
# after ``random.seed(42); random.shuffle(data)``; the first int(0.8 n) train+val, of which int(0.8 m) train.
PUBLISHED_DOMAIN_SEED = 42
PUBLISHED_FRACTION = 0.8


def published_domain_split(count: int, seed: int = PUBLISHED_DOMAIN_SEED) -> dict[str, list[int]]:
    """train/val/test positions (in shuffled order) of one domain of ``count`` path-sorted items.

    Python's ``random.shuffle`` draws depend on the list's length alone, so shuffling positions gives the
    published permutation of its items; ``random.Random(seed)`` is the generator ``random.seed`` reseeds.
    """
    order = list(range(count))
    random.Random(seed).shuffle(order)
    trainval = int(PUBLISHED_FRACTION * count)
    train = int(PUBLISHED_FRACTION * trainval)
    return {"train": order[:train], "val": order[train:trainval], "test": order[trainval:]}


def published_pool_order(
    last_domain_count: int, pool_count: int, seed: int = PUBLISHED_DOMAIN_SEED
) -> list[int]:
    """The published pool order: the train splits of the domains concatenated, then shuffled by the RNG as
    the last domain's ``random.seed(42); random.shuffle`` left it. Item ``i`` of the pool is item
    ``order[i]`` of the concatenation."""
    rng = random.Random(seed)
    rng.shuffle(list(range(last_domain_count)))
    order = list(range(pool_count))
    rng.shuffle(order)
    return order
