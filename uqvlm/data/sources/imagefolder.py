"""Labelled images in class folders (``root/<class>/**/*.jpg``) behind the one interface."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from uqvlm.config_utils import to_plain
from uqvlm.data.base import ZeroShotDataset, fingerprint_of
from uqvlm.data.sources.common import (
    CLASSNAMES_FILE,
    IMAGE_EXTENSIONS,
    _check_on_bad_image,
    _clean_name,
    _read_lines,
    _select,
    decode_image,
)
from uqvlm.data.templates import resolve_templates
from uqvlm.errors import DatasetFormatError, DataUnavailableError

log = logging.getLogger(__name__)


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
        self.classnames = self._classnames(to_plain(classnames))
        self.templates = resolve_templates(to_plain(templates)) or []
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
