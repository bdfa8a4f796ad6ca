"""Image-caption pairs in local webdataset tar shards (img2dataset layout), indexed once for random access."""

from __future__ import annotations

import glob
import os
import re
import tarfile
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from uqvlm.data.base import PairDataset, fingerprint_of
from uqvlm.data.sources.common import _check_on_bad_image, _with_replacement, decode_image
from uqvlm.errors import DatasetFormatError, DataUnavailableError

WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


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
