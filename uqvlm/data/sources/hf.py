"""Hugging Face datasets behind the one interface, offline-first.

- :class:`HFZeroShot`: a labelled Hugging Face dataset (hub id, ``save_to_disk`` folder, or a local copy
  of a hub repo such as clip-benchmark's ``wds_*`` webdataset repos with ``classnames.txt`` and
  ``zeroshot_classification_templates.txt`` at the root).
- :class:`HFPairs`: a Hugging Face image-caption dataset.

Hub datasets are served from the local caches, and a dataset that is not on this machine raises
:class:`~uqvlm.errors.DataUnavailableError` quickly, naming what to provide.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uqvlm import hub
from uqvlm.config_utils import to_plain
from uqvlm.data.base import PairDataset, ZeroShotDataset, fingerprint_of
from uqvlm.data.sources.common import (
    CLASSNAMES_FILE,
    TEMPLATES_FILE,
    _check_on_bad_image,
    _clean_name,
    _read_lines,
    _select,
    _subsample,
    _with_replacement,
    decode_image,
)
from uqvlm.data.sources.webdataset import WDS_IMAGE_EXTS
from uqvlm.data.templates import resolve_templates
from uqvlm.errors import DatasetFormatError, DataUnavailableError

log = logging.getLogger(__name__)

NSHARDS_FILE = "nshards.txt"
# webdataset's sample key column; CLIP_benchmark's keys are the source dataset's item index, "s%07d".
WDS_KEY = "__key__"


def _is_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not os.path.exists(source)


def _numbered_shards(split: str, nshards_file: str | os.PathLike) -> list[str]:
    text = Path(nshards_file).read_text().strip()
    if not text.isdigit():
        raise DatasetFormatError(f"{nshards_file}: expected a shard count, got {text[:40]!r}")
    return [f"{split}/{i}.tar" for i in range(int(text))]


def wds_split_files(folder: Path, split: str) -> list[str] | None:
    """The shards of a CLIP_benchmark webdataset split (``<split>/0.tar`` ... ``<split>/<n-1>.tar`` with
    ``<split>/nshards.txt``, as clip_benchmark/webdataset_builder.py writes them), relative to ``folder``
    and in shard order; without nshards.txt the tars present, by number. None when there are no tars."""
    split_dir = folder / split
    if (split_dir / NSHARDS_FILE).is_file():
        shards = _numbered_shards(split, split_dir / NSHARDS_FILE)
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise DataUnavailableError(
                f"{folder}: {len(missing)} of the {len(shards)} shards {split}/{NSHARDS_FILE} lists are missing "
                f"(first: {missing[0]}); complete the download"
            )
        return shards
    if not split_dir.is_dir():
        return None
    tars = sorted(
        split_dir.glob("*.tar"),
        key=lambda p: (not p.stem.isdigit(), int(p.stem or 0) if p.stem.isdigit() else 0, p.name),
    )
    return [f"{split}/{p.name}" for p in tars] or None


def _rows_digest(rows: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64).tobytes()).hexdigest()[:16]


# ----------------------------------------------------------------------------- Hugging Face loading


class _HFSource:
    """A Hugging Face dataset split loaded offline-first, plus access to files at the repo root."""

    def __init__(self, source: str, split: str, root: str | None = None, revision: str | None = None):
        import datasets

        self.source, self.split, self.revision = source, split, revision
        self.local_dir: Path | None = None  # where repo-root files (classnames.txt, ...) live
        location = root if root is not None else source
        if location is None:
            raise DataUnavailableError("a Hugging Face dataset needs `source` (hub id or path) or `root`")
        location = os.path.expanduser(str(location))
        self.hub_id = source if source and _is_hub_id(source) else None

        if os.path.exists(location):
            self.local_dir = Path(location)
            self.dataset = self._load_local(Path(location))
        elif root is not None or not _is_hub_id(location):
            hint = f" (dataset {self.hub_id})" if self.hub_id else ""
            raise DataUnavailableError(f"dataset path {location!r} does not exist{hint}")
        else:
            self.dataset = self._load_hub(location)
        if not isinstance(self.dataset, datasets.Dataset):
            raise DatasetFormatError(
                f"{location}: expected a map-style dataset, got {type(self.dataset).__name__}"
            )

    # A dataset folder written by save_to_disk has state.json (Dataset) or dataset_dict.json (DatasetDict).
    def _load_local(self, path: Path):
        import datasets

        if path.is_file():
            raise DatasetFormatError(f"{path} is a file; expected a dataset folder")
        try:
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if self.split not in ds:
                        raise DataUnavailableError(
                            f"split {self.split!r} is not in {path}; available: {', '.join(ds)}"
                        )
                    ds = ds[self.split]
                return ds
            # A webdataset repo: read this split's shards only (a local copy may hold the test split alone).
            shards = wds_split_files(path, self.split)
            data_files = {self.split: shards} if shards else None
            with hub.offline_mode():
                return datasets.load_dataset(
                    str(path), split=self.split, data_files=data_files, cache_dir=hub.datasets_cache_dir()
                )
        except (DataUnavailableError, DatasetFormatError):
            raise
        except ValueError as e:  # datasets reports unknown splits as ValueError
            raise DataUnavailableError(f"{path}: {e}") from e
        except FileNotFoundError as e:
            raise DataUnavailableError(f"{path}: no data files for split {self.split!r} ({e})") from e
        except Exception as e:  # datasets' own failures on malformed folders (e.g. an empty save)
            raise DatasetFormatError(f"{path} cannot be read as a dataset ({type(e).__name__}: {e})") from e

    def _load_hub(self, repo_id: str):
        import datasets

        offline = hub.is_offline()
        how = (
            f"{hub.how_to_populate(repo_id, 'dataset')}; or download it and set root=/path/to/copy in the "
            "config (dataset.root=... or hessian_data.root=...; a local copy of the repo, or a folder "
            "written by datasets' save_to_disk)"
        )
        if offline:
            snapshot = hub.cached_snapshot(repo_id, repo_type="dataset", revision=self.revision)
            if snapshot is not None:
                try:
                    ds = self._load_local(snapshot)
                    self.local_dir = snapshot
                    return ds
                except (DataUnavailableError, DatasetFormatError) as e:
                    # A partial snapshot (e.g. only classnames.txt): datasets' own cache may still have it.
                    log.info("hub snapshot %s of %s is not loadable (%s)", snapshot, repo_id, e)
        try:
            nshards = hub.fetch_file(
                repo_id, f"{self.split}/{NSHARDS_FILE}", repo_type="dataset", revision=self.revision
            )
            # A CLIP_benchmark webdataset repo: download this split's shards only, not the others'.
            data_files = {self.split: _numbered_shards(self.split, nshards)} if nshards else None
            with hub.offline_mode(offline):
                return datasets.load_dataset(
                    repo_id,
                    split=self.split,
                    revision=self.revision,
                    data_files=data_files,
                    cache_dir=hub.datasets_cache_dir(),
                )
        except Exception as e:
            state = "is not available offline" if offline else "could not be loaded"
            raise DataUnavailableError(
                f"dataset {repo_id} (split {self.split!r}) {state} ({type(e).__name__}: {e}). To provide it: {how}."
            ) from e

    def repo_file(self, filename: str) -> str | None:
        """A file at the repo root: from the local folder, else the hub cache, else downloaded."""
        if self.local_dir is not None:
            for d in (self.local_dir, self.local_dir.parent):
                if (d / filename).is_file():
                    return str(d / filename)
        if self.hub_id is not None:
            return hub.fetch_file(self.hub_id, filename, repo_type="dataset", revision=self.revision)
        return None

    def fingerprint(self) -> str | None:
        return getattr(self.dataset, "_fingerprint", None)


def _first_image_column(ds) -> str | None:
    import datasets

    for name, feature in ds.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in WDS_IMAGE_EXTS:
        if name in ds.features:
            return name
    return None


def _column(ds, name: str) -> list[Any]:
    """One column as a Python list, without decoding the others."""
    return ds.select_columns([name])[:][name]


# ----------------------------------------------------------------------------- labelled datasets


class HFZeroShot(ZeroShotDataset):
    """A labelled Hugging Face dataset for zero-shot classification.

    ``classnames``: a list; ``"features"`` / ``{from: features}`` (the label column's ClassLabel names,
    underscores as spaces); ``"file"`` / ``{from: file, path: classnames.txt}`` (one name per line, at the
    repo root or a given path). ``templates``: a set name (see :mod:`uqvlm.data.templates`), a list, or
    ``{from: file}`` for the repo's ``zeroshot_classification_templates.txt``. ``image_key`` defaults to
    the first Image column; ``label_key`` to ``label`` (or ``cls`` for webdataset repos).

    Items of a webdataset repo are ordered by their sample key: CLIP_benchmark wrote each sample under the
    key ``s%07d`` of its index in the source dataset (clip_benchmark/webdataset_builder.py @ 48de38c), so
    this order is the source's own (torchvision ImageFolder: sorted class folders, sorted file names),
    whatever order the shards are read in. Seeded protocol splits (``subset``) are cut in this order.
    """

    def __init__(
        self,
        source: str | None,
        split: str = "test",
        *,
        image_key: str | None = None,
        label_key: str | None = None,
        classnames: Any = "features",
        templates: Any = "paper",
        name: str | None = None,
        root: str | None = None,
        revision: str | None = None,
        on_bad_image: str = "error",
        n: int | None = None,
        seed: int = 0,
    ) -> None:
        import datasets

        self.on_bad_image = _check_on_bad_image(on_bad_image)
        self.source, self.split, self.revision, self.n, self.seed = source, split, revision, n, seed
        self.name = name or str(source or root)
        self._src = _HFSource(source, split, root=root, revision=revision)
        ds = self._src.dataset
        where = f"dataset {self.name!r} ({split})"
        if len(ds) == 0:
            raise DataUnavailableError(f"{where} is empty")

        self.image_key = image_key or _first_image_column(ds)
        if self.image_key is None or self.image_key not in ds.features:
            raise DatasetFormatError(
                f"{where}: image column {image_key!r} not found; columns: {', '.join(ds.features)}"
            )
        if label_key is None:
            label_key = next((k for k in ("label", "cls", "labels") if k in ds.features), None)
        if label_key is None or label_key not in ds.features:
            raise DatasetFormatError(
                f"{where}: label column {label_key!r} not found; columns: {', '.join(ds.features)}"
            )
        self.label_key = label_key
        rows = np.arange(len(ds))
        if WDS_KEY in ds.features:
            rows = np.argsort(np.asarray(_column(ds, WDS_KEY), dtype=str), kind="stable")
        # Decode images ourselves: to RGB, and with our own handling of undecodable files.
        ds = ds.select_columns([self.image_key, self.label_key])
        if isinstance(ds.features[self.image_key], datasets.Image):
            ds = ds.cast_column(self.image_key, datasets.Image(decode=False))
        self._ds = ds

        self.classnames = self._resolve_classnames(to_plain(classnames), where)
        spec = to_plain(templates)
        tpl = resolve_templates(spec)
        if tpl is None:
            path = spec.get("path") if isinstance(spec, Mapping) else None
            path = path or self._src.repo_file(TEMPLATES_FILE)
            if path is None or not os.path.isfile(path):
                raise DataUnavailableError(f"{where}: templates file {TEMPLATES_FILE} not found")
            tpl = _read_lines(path)
        self.templates = tpl

        labels = np.asarray(_column(ds, self.label_key), dtype=np.int64)[rows]
        bad = (labels < 0) | (labels >= len(self.classnames))
        if bad.any():  # checked over the whole split, before any (slow) image scan
            raise DatasetFormatError(
                f"{where}: label {int(labels[bad][0])} is outside the {len(self.classnames)} class names "
                f"(labels range {int(labels.min())}..{int(labels.max())}); check `classnames`"
            )
        check = (lambda i: self._decodes(int(rows[i]))) if on_bad_image == "skip" else None
        positions, skipped = _select(len(ds), n, seed, check)
        if len(positions) == 0:
            raise DataUnavailableError(f"{where}: no decodable image")
        self.skipped_indices = [int(rows[i]) for i in skipped]
        self._indices = rows[positions]  # the kept rows of the split, in item order
        self._labels = labels[positions]

    @property
    def skipped(self) -> int:
        return len(self.skipped_indices)

    def _decodes(self, i: int) -> bool:
        try:
            decode_image(self._ds[i][self.image_key])
            return True
        except Exception as e:
            log.warning("skipping undecodable image %d of %s: %s", i, self.name, e)
            return False

    def _resolve_classnames(self, spec: Any, where: str) -> list[str]:
        import datasets

        source = spec.get("from") if isinstance(spec, Mapping) else spec
        if isinstance(source, str) and source == "features":
            feature = self._ds.features[self.label_key]
            if not isinstance(feature, datasets.ClassLabel):
                raise DatasetFormatError(
                    f"{where}: label column {self.label_key!r} has no class names (not a ClassLabel); "
                    "set classnames to a list or {from: file}"
                )
            return [_clean_name(c) for c in feature.names]
        if isinstance(source, str) and source == "file":
            path = spec.get("path") if isinstance(spec, Mapping) else None
            path = path or self._src.repo_file(CLASSNAMES_FILE)
            if path is None or not os.path.isfile(path):
                raise DataUnavailableError(
                    f"{where}: {CLASSNAMES_FILE} not found next to the dataset (nor in the hub cache)"
                )
            names = _read_lines(path)
        elif isinstance(source, str):
            if not os.path.isfile(source):
                raise ValueError(
                    f"classnames must be a list, 'features', 'file' or a file path; got {source!r}"
                )
            names = _read_lines(source)
        else:
            names = [str(c) for c in spec]
        if not names:
            raise DatasetFormatError(f"{where}: empty class-name list")
        return names

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        i = int(self._indices[index])
        try:
            img = decode_image(self._ds[i][self.image_key])
        except Exception as e:
            raise DatasetFormatError(
                f"dataset {self.name!r}: image {i} cannot be decoded ({e}); set on_bad_image=skip to drop such images"
            ) from e
        return img, int(self._labels[index])

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def fingerprint(self) -> str:
        # Item-determining only: class names and templates change text features, not items.
        return fingerprint_of(
            "hf-zeroshot",
            self.source,
            self.revision,
            self.split,
            self._src.fingerprint(),
            self.image_key,
            self.label_key,
            self.n,
            self.seed,
            self.on_bad_image,
            _rows_digest(self._indices),
        )


class HFPairs(PairDataset):
    """Image-caption pairs from a Hugging Face dataset (hub id or local path).

    ``caption_key`` may hold a string or a list of strings; ``caption_index`` picks one (default 0) or
    ``"all"`` makes one pair per caption. ``where`` keeps rows whose columns equal the given values
    (a value or a list of allowed values), e.g. ``{split: train}`` for Karpathy-split Flickr30k.
    """

    def __init__(
        self,
        source: str | None,
        split: str = "train",
        *,
        image_key: str | None = None,
        caption_key: str = "caption",
        caption_index: int | str = 0,
        where: Mapping[str, Any] | None = None,
        name: str | None = None,
        root: str | None = None,
        revision: str | None = None,
        n: int | None = None,
        seed: int = 0,
        on_bad_image: str = "error",
    ) -> None:
        import datasets

        self.on_bad_image = _check_on_bad_image(on_bad_image)
        self.source, self.split, self.revision, self.n, self.seed = source, split, revision, n, seed
        self.name = name or str(source or root)
        self.caption_index = caption_index
        self.where = dict(to_plain(where) or {})
        self._src = _HFSource(source, split, root=root, revision=revision)
        ds = self._src.dataset
        label = f"dataset {self.name!r} ({split})"
        self.image_key = image_key or _first_image_column(ds)
        if self.image_key is None or self.image_key not in ds.features:
            raise DatasetFormatError(
                f"{label}: image column {image_key!r} not found; columns: {', '.join(ds.features)}"
            )
        if caption_key not in ds.features:
            raise DatasetFormatError(
                f"{label}: caption column {caption_key!r} not found; columns: {', '.join(ds.features)}"
            )
        self.caption_key = caption_key

        rows = np.arange(len(ds))
        for column, allowed in self.where.items():
            if column not in ds.features:
                raise DatasetFormatError(f"{label}: `where` column {column!r} not found")
            allowed = set(allowed) if isinstance(allowed, (list, tuple, set)) else {allowed}
            values = _column(ds, column)
            rows = rows[[values[i] in allowed for i in rows]]
        captions = _column(ds, caption_key)
        pairs: list[tuple[int, int]] = []
        for r in rows:
            cap = captions[int(r)]
            if isinstance(cap, str):
                pairs.append((int(r), -1))
            elif caption_index == "all":
                pairs.extend((int(r), j) for j in range(len(cap)))
            elif int(caption_index) < len(cap):
                pairs.append((int(r), int(caption_index)))
        if not pairs:
            raise DataUnavailableError(
                f"{label} has no image-caption pairs{' matching ' + str(self.where) if self.where else ''}"
            )
        keep = _subsample(len(pairs), n, seed)
        self._pairs = np.asarray(pairs, dtype=np.int64)[keep]
        ds = ds.select_columns([self.image_key, caption_key])
        if isinstance(ds.features[self.image_key], datasets.Image):
            ds = ds.cast_column(self.image_key, datasets.Image(decode=False))
        self._ds = ds
        self.skipped = 0

    def __len__(self) -> int:
        return len(self._pairs)

    def _item(self, index: int) -> tuple[Image.Image, str]:
        row, j = (int(v) for v in self._pairs[index])
        item = self._ds[row]
        caption = item[self.caption_key] if j < 0 else item[self.caption_key][j]
        return decode_image(item[self.image_key]), str(caption).strip()

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return _with_replacement(self, index % len(self))

    def fingerprint(self) -> str:
        return fingerprint_of(
            "hf-pairs",
            self.source,
            self.revision,
            self.split,
            self._src.fingerprint(),
            self.image_key,
            self.caption_key,
            self.caption_index,
            self.where,
            self.n,
            self.seed,
            self.on_bad_image,
        )
