"""Real-world datasets behind the one interface: Hugging Face datasets, image folders, webdataset tars.

- :class:`HFZeroShot`: a labelled Hugging Face dataset (hub id, ``save_to_disk`` folder, or a local copy
  of a hub repo such as clip-benchmark's ``wds_*`` webdataset repos with ``classnames.txt`` and
  ``zeroshot_classification_templates.txt`` at the root).
- :class:`ImageFolderZeroShot`: ``root/<class>/**/*.jpg``.
- :class:`WebDatasetPairs`: local img2dataset-style tar shards (``<key>.jpg`` + ``<key>.txt``), indexed
  once so items can be read by position.
- :class:`HFPairs`: a Hugging Face image-caption dataset.

Everything is offline-first: hub datasets are served from the local caches, and a dataset that is not on
this machine raises :class:`~uqvlm.errors.DataUnavailableError` quickly, naming what to provide.

Bad images: ``on_bad_image="error"`` raises :class:`~uqvlm.errors.DatasetFormatError` naming the item;
``"skip"`` drops undecodable images of the labelled datasets when they are indexed (every selected image is
decoded once then, so evaluation sets never silently change their labels), and for the large pair datasets
replaces an undecodable item by the next decodable one (deterministic; counted per process in ``skipped``).
"""

from __future__ import annotations

import glob
import io
import logging
import os
import re
import tarfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from uqvlm import hub
from uqvlm.data.base import PairDataset, ZeroShotDataset, fingerprint_of
from uqvlm.data.templates import resolve_templates
from uqvlm.errors import DatasetFormatError, DataUnavailableError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "zeroshot_classification_templates.txt"
ON_BAD_IMAGE = ("error", "skip")
# Max consecutive undecodable pair items skipped over before giving up (a broken shard, not a bad image).
MAX_REPLACEMENTS = 1000


# ----------------------------------------------------------------------------- helpers


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


def _plain(cfg: Any) -> Any:
    """OmegaConf containers to plain Python (other values unchanged)."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - hydra is a dependency
        return cfg
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _is_hub_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", source)) and not os.path.exists(source)


def _clean_name(name: str) -> str:
    return name.replace("_", " ").strip()


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
            with hub.offline_mode():
                return datasets.load_dataset(str(path), split=self.split, cache_dir=hub.datasets_cache_dir())
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
            with hub.offline_mode(offline):
                return datasets.load_dataset(
                    repo_id, split=self.split, revision=self.revision, cache_dir=hub.datasets_cache_dir()
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
        # Decode images ourselves: to RGB, and with our own handling of undecodable files.
        ds = ds.select_columns([self.image_key, self.label_key])
        if isinstance(ds.features[self.image_key], datasets.Image):
            ds = ds.cast_column(self.image_key, datasets.Image(decode=False))
        self._ds = ds

        self.classnames = self._resolve_classnames(_plain(classnames), where)
        spec = _plain(templates)
        tpl = resolve_templates(spec)
        if tpl is None:
            path = spec.get("path") if isinstance(spec, Mapping) else None
            path = path or self._src.repo_file(TEMPLATES_FILE)
            if path is None or not os.path.isfile(path):
                raise DataUnavailableError(f"{where}: templates file {TEMPLATES_FILE} not found")
            tpl = _read_lines(path)
        self.templates = tpl

        labels = np.asarray(_column(ds, self.label_key), dtype=np.int64)
        bad = (labels < 0) | (labels >= len(self.classnames))
        if bad.any():  # checked over the whole split, before any (slow) image scan
            raise DatasetFormatError(
                f"{where}: label {int(labels[bad][0])} is outside the {len(self.classnames)} class names "
                f"(labels range {int(labels.min())}..{int(labels.max())}); check `classnames`"
            )
        check = self._decodes if on_bad_image == "skip" else None
        self._indices, self.skipped_indices = _select(len(ds), n, seed, check)
        if len(self._indices) == 0:
            raise DataUnavailableError(f"{where}: no decodable image")
        self._labels = labels[self._indices]

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
            len(self._indices),
        )


class ImageFolderZeroShot(ZeroShotDataset):
    """Labelled images in ``root/<class>/**/*.{jpg,png,...}`` (or ``root/<split>/<class>/...``).

    Classes are the sorted sub-folder names; ``classnames`` defaults to (or ``{from: folders}`` asks for)
    those names with underscores as spaces, or is a list aligned with the sorted folders, a
    ``{folder: name}`` mapping, ``{from: file, path: ...}`` or a file path (one name per line).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "test",
        *,
        classnames: Any = None,
        templates: Any = "paper",
        name: str | None = None,
        on_bad_image: str = "error",
        n: int | None = None,
        seed: int = 0,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.on_bad_image = _check_on_bad_image(on_bad_image)
        if root is None:
            raise DataUnavailableError("an image-folder dataset needs `root`")
        base = Path(os.path.expanduser(str(root)))
        self.name = name or base.name
        if not base.is_dir():
            raise DataUnavailableError(f"image folder {str(base)!r} does not exist")
        self.root = base / split if split and (base / split).is_dir() else base
        self.split, self.n, self.seed = split, n, seed
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise DataUnavailableError(f"image folder {str(self.root)!r} has no class sub-folders")
        exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
        files, labels = [], []
        for label, folder in enumerate(folders):
            for p in sorted((self.root / folder).rglob("*")):
                if p.suffix.lower() in exts and p.is_file():
                    files.append(p.relative_to(self.root).as_posix())
                    labels.append(label)
        if not files:
            raise DataUnavailableError(
                f"image folder {str(self.root)!r} has no images ({', '.join(exts)}) in its class folders"
            )
        self.folders = folders
        self.classnames = self._classnames(_plain(classnames))
        self.templates = resolve_templates(_plain(templates)) or []
        if not self.templates:
            raise ValueError("image folders have no templates file: give a template set name or a list")

        check = (lambda i: self._decodes(files[i])) if on_bad_image == "skip" else None
        order, self.skipped_indices = _select(len(files), n, seed, check)
        if len(order) == 0:
            raise DataUnavailableError(f"image folder {str(self.root)!r}: no decodable image")
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

    def _classnames(self, spec: Any) -> list[str]:
        source = spec.get("from") if isinstance(spec, Mapping) else spec
        if spec is None or source == "folders":
            return [_clean_name(f) for f in self.folders]
        if isinstance(spec, Mapping) and "from" not in spec:
            return [str(spec.get(f, _clean_name(f))) for f in self.folders]
        if isinstance(spec, Mapping):
            path = spec.get("path") or (self.root / CLASSNAMES_FILE)
            names = _read_lines(path) if os.path.isfile(path) else None
            if names is None:
                raise DataUnavailableError(f"class-name file {path} not found")
        elif isinstance(spec, str):
            if not os.path.isfile(spec):
                raise DataUnavailableError(f"class-name file {spec!r} not found")
            names = _read_lines(spec)
        else:
            names = [str(c) for c in spec]
        if len(names) != len(self.folders):
            raise DatasetFormatError(
                f"image folder {str(self.root)!r} has {len(self.folders)} class folders but "
                f"{len(names)} class names were given"
            )
        return names

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

    def fingerprint(self) -> str:
        listing = fingerprint_of(self._files, self._labels, self._sizes)
        return fingerprint_of("imagefolder", str(self.root.resolve()), self.split, listing, self.n, self.seed)


# ----------------------------------------------------------------------------- pairs


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as in webdataset/img2dataset: ``{000..012}`` (zero-padded ranges) and ``{a,b}``."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end() :], m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def _wds_key(member: str) -> tuple[str, str]:
    """webdataset's split of a member name: key = path up to the first dot of the basename."""
    directory, base = os.path.split(member)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


class WebDatasetPairs(PairDataset):
    """Image-caption pairs in local, uncompressed webdataset tar shards (img2dataset layout).

    ``shards``: a path, glob or brace pattern (``laion-{00000..00031}.tar``) or a list of them, relative
    to ``root`` when given. The tars are indexed once (member offsets), so items are read by position.
    ``n`` keeps the first ``n`` pairs in shard order (shards are already random samples, and only the
    shards needed are indexed).
    """

    def __init__(
        self,
        shards: str | Sequence[str],
        *,
        root: str | None = None,
        name: str = "wds",
        image_exts: Sequence[str] = WDS_IMAGE_EXTS,
        caption_ext: str = "txt",
        n: int | None = None,
        on_bad_image: str = "error",
    ) -> None:
        self.on_bad_image = _check_on_bad_image(on_bad_image)
        self.name, self.n = name, n
        self.image_exts = tuple(e.lower().lstrip(".") for e in image_exts)
        self.caption_ext = caption_ext.lower().lstrip(".")
        self.shards = self._expand(shards, root)
        self.skipped = 0
        self.incomplete = 0
        rows: list[tuple[int, int, int, int, int]] = []
        for sid, path in enumerate(self.shards):
            rows.extend(self._index(sid, path))
            if n is not None and len(rows) >= n:
                self.shards = self.shards[: sid + 1]
                break
        if not rows:
            raise DataUnavailableError(
                f"no {'/'.join(self.image_exts)} + {self.caption_ext} pairs in {len(self.shards)} shard(s) "
                f"({self.shards[0]}{', ...' if len(self.shards) > 1 else ''})"
            )
        self._index_rows = np.asarray(rows[:n] if n is not None else rows, dtype=np.int64)
        self._shard_sizes = [os.path.getsize(p) for p in self.shards]
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    @staticmethod
    def _expand(shards: str | Sequence[str], root: str | None) -> list[str]:
        patterns = [shards] if isinstance(shards, str) else list(shards)
        base = os.path.expanduser(str(root)) if root is not None else None
        if base is not None and not os.path.isdir(base):
            raise DataUnavailableError(f"webdataset root {base!r} does not exist")
        out: list[str] = []
        for pattern in patterns:
            for p in expand_braces(os.path.expanduser(str(pattern))):
                p = os.path.join(base, p) if base is not None and not os.path.isabs(p) else p
                matches = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
                out.extend(matches)
        if not out:
            raise DataUnavailableError(
                f"no webdataset shards match {patterns}{f' under {base}' if base else ''}; set the shard "
                "pattern (e.g. hessian_data.root=/data/laion400m hessian_data.shards='{00000..00031}.tar')"
            )
        return out

    def _index(self, sid: int, path: str) -> list[tuple[int, int, int, int, int]]:
        """(shard, image offset, image size, caption offset, caption size) per complete sample."""
        samples: dict[str, dict[str, tuple[int, int]]] = {}
        order: list[str] = []
        try:
            with tarfile.open(path, mode="r:") as tar:
                for m in tar:
                    if not m.isfile():
                        continue
                    key, ext = _wds_key(m.name)
                    if key not in samples:
                        samples[key] = {}
                        order.append(key)
                    samples[key][ext] = (m.offset_data, m.size)
        except tarfile.ReadError as e:
            raise DatasetFormatError(
                f"{path} is not an uncompressed tar ({e}); random access needs plain .tar shards"
            ) from e
        rows = []
        for key in order:
            fields = samples[key]
            img = next((fields[e] for e in self.image_exts if e in fields), None)
            cap = fields.get(self.caption_ext)
            if img is None or cap is None:
                self.incomplete += 1
                continue
            rows.append((sid, img[0], img[1], cap[0], cap[1]))
        return rows

    def _read(self, sid: int, offset: int, size: int) -> bytes:
        if self._pid != os.getpid():  # forked DataLoader worker: never share file positions
            self._handles, self._pid = {}, os.getpid()
        f = self._handles.get(sid)
        if f is None:
            f = self._handles[sid] = open(self.shards[sid], "rb")  # noqa: SIM115 (kept open for reuse)
        f.seek(offset)
        return f.read(size)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def __len__(self) -> int:
        return len(self._index_rows)

    def _item(self, index: int) -> tuple[Image.Image, str]:
        sid, img_off, img_size, cap_off, cap_size = (int(v) for v in self._index_rows[index])
        caption = self._read(sid, cap_off, cap_size).decode("utf-8", errors="replace").strip()
        return decode_image(self._read(sid, img_off, img_size)), caption

    def __getitem__(self, index: int) -> tuple[Image.Image, str]:
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return _with_replacement(self, index % len(self))

    def fingerprint(self) -> str:
        shards = [(os.path.basename(p), s) for p, s in zip(self.shards, self._shard_sizes, strict=True)]
        return fingerprint_of(
            "wds-pairs", shards, self.image_exts, self.caption_ext, self.n, len(self), self.on_bad_image
        )


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
        self.where = dict(_plain(where) or {})
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


__all__ = [
    "HFPairs",
    "HFZeroShot",
    "ImageFolderZeroShot",
    "WebDatasetPairs",
    "decode_image",
    "expand_braces",
]
