"""Labelled images in class folders (``root/<class>/**/*.jpg``) behind the one interface."""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from uqvlm.config_utils import to_plain
from uqvlm.data.base import fingerprint_of
from uqvlm.data.sources.common import (
    CLASSNAMES_FILE,
    IMAGE_EXTENSIONS,
    LabelledFiles,
    _check_on_bad_image,
    _clean_name,
    _read_lines,
)
from uqvlm.data.sources.imagenet import imagenet_classname
from uqvlm.data.templates import resolve_templates
from uqvlm.errors import DatasetFormatError, DataUnavailableError

log = logging.getLogger(__name__)


def read_wnid_csv(path: str | os.PathLike) -> dict[str, str]:
    """wnid -> name from a ``classes.csv`` with columns ``wnid`` and ``words``: the first of the comma-separated
    words, as BayesVLM's ``load_class_mapping`` reads it (bayesvlm/data/imagenet_da.py @ 855be8b)."""
    with open(path, encoding="utf-8") as f:
        return {row["wnid"]: row["words"].split(",")[0] for row in csv.DictReader(f)}


class ImageFolderZeroShot(LabelledFiles):
    """Labelled images in ``root/<class>/**/*.{jpg,png,...}`` (or ``root/<split>/<class>/...``).

    Items are in path order (class folders sorted, then files). Classes are the sorted sub-folder names;
    ``classnames`` defaults to (or ``{from: folders}`` asks for) those names with underscores as spaces
    (``{from: folders, verbatim: true}``: as the folders spell them), or is a list aligned with the sorted
    folders, a ``{folder: name}`` mapping, ``{from: file, path: ...}`` or a file path (one name per line),
    ``{from: imagenet}`` (the folders are ImageNet WordNet ids: OpenAI's names of those classes) or
    ``{from: csv, path: classes.csv}`` (wnid -> first of its ``words``). ``extensions`` are matched
    case-insensitively.
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
        self.classnames = self._classnames(to_plain(classnames))
        self.templates = resolve_templates(to_plain(templates)) or []
        if not self.templates:
            raise ValueError("image folders have no templates file: give a template set name or a list")
        self._index_files(files, labels)

    def _classnames(self, spec: Any) -> list[str]:
        source = spec.get("from") if isinstance(spec, Mapping) else spec
        if spec is None or source == "folders":
            verbatim = isinstance(spec, Mapping) and bool(spec.get("verbatim", False))
            return list(self.folders) if verbatim else [_clean_name(f) for f in self.folders]
        if source == "imagenet":
            return [self._imagenet_name(f) for f in self.folders]
        if isinstance(spec, Mapping) and "from" not in spec:
            return [str(spec.get(f, _clean_name(f))) for f in self.folders]
        if isinstance(spec, Mapping) and source == "csv":
            path = spec.get("path") or (self.root / "classes.csv")
            if not os.path.isfile(path):
                raise DataUnavailableError(f"class-name file {path} not found")
            mapping = read_wnid_csv(path)
            if missing := [f for f in self.folders if f not in mapping]:
                raise DatasetFormatError(f"{path} names no class for the folders {missing[:3]}")
            return [mapping[f] for f in self.folders]
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

    def _imagenet_name(self, folder: str) -> str:
        try:
            return imagenet_classname(folder)
        except KeyError:
            raise DatasetFormatError(
                f"image folder {str(self.root)!r}: class folder {folder!r} is not an ImageNet WordNet id "
                "(classnames {from: imagenet} needs wnid folders)"
            ) from None

    def fingerprint(self) -> str:
        return fingerprint_of(
            "imagefolder", str(self.root.resolve()), self.split, self.listing_fingerprint(), self.n, self.seed
        )
