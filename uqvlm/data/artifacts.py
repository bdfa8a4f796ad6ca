"""What a data section needs on this machine, from its settings alone (for ``uqvlm fetch``).

A generic declaration by ``kind``: a hub dataset (``source`` a hub id, no local ``root``) is an ``hf_repo``
artefact restricted to the files of the splits read; a hub repo's shards (``hf_wds``) the shards the first
``n`` pairs need; every local path a section names (``root``, ``split_file``, ``shards``) is ``manual``,
present when it exists. Sections whose kind is generated (the shapes world) need nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from uqvlm.artifacts import Artifact
from uqvlm.config_utils import MISSING

__all__ = ["dataset_artifacts", "pair_artifacts", "split_patterns"]

# Keys of a data section that name a local file or folder a person provides.
LOCAL_PATH_KEYS = ("source", "root", "split_file")
ROOT_FILES = ("*.txt", "*.json", "*.md")
GENERATED_KINDS = frozenset({"shapes"})


def _is_hub_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and bool(re.fullmatch(r"[\w.-]+/[\w.-]+", value))
        and not os.path.exists(os.path.expanduser(value))
    )


def _unset(value: Any) -> bool:
    return value is None or value == MISSING


def split_patterns(splits: Iterable[str]) -> tuple[str, ...]:
    """Hub-repo file patterns of these splits: a split folder (clip-benchmark's ``test/0.tar``, a parquet
    conversion's ``TEST/test/0000.parquet``) or split-named files (``data/test-00000-of-00001.parquet``),
    plus the small files at the repo root. (``*`` matches ``/`` in huggingface_hub's patterns.)"""
    out: list[str] = []
    for split in splits:
        out += [f"{split}/*", f"*/{split}/*", f"*{split}-*", f"*{split}_*", f"*{split}.*"]
    return tuple(dict.fromkeys([*out, *ROOT_FILES]))


def _with_protocol(section: Mapping[str, Any]) -> dict[str, Any]:
    # A section offering ``protocols`` reads the chosen one's keys over its own (uqvlm.data.sections).
    section = dict(section)
    protocols = section.pop("protocols", None)
    if isinstance(protocols, Mapping):
        entry = protocols.get(section.get("protocol"))
        if isinstance(entry, Mapping):
            section.update(entry)
    return section


def _local_paths(section: Mapping[str, Any], path: str, what: str) -> list[Artifact]:
    out = []
    for key in LOCAL_PATH_KEYS:
        if key not in section:
            continue
        value = section[key]
        if key == "source" and (_unset(value) or _is_hub_id(value)):
            continue  # a hub source is an hf_repo artefact
        if key == "root" and value is None and not _root_required(section):
            continue
        out.append(
            Artifact(
                kind="manual",
                what=f"{what}: {key}",
                path=None if _unset(value) else os.path.expanduser(str(value)),
                hint=f"set {path}.{key}=/path/to/it",
            )
        )
    return out


def _root_required(section: Mapping[str, Any]) -> bool:
    # ``root`` is optional beside a ``source`` (a local copy instead of it), required without one.
    return _unset(section.get("source"))


def _hub_repo(
    section: Mapping[str, Any],
    repo: str,
    splits: Iterable[str],
    what: str,
    patterns: tuple[str, ...] | None = None,
) -> Artifact:
    splits = [s for s in splits if s]
    return Artifact(
        kind="hf_repo",
        what=what,
        repo_id=repo,
        repo_type="dataset",
        revision=section.get("revision"),
        allow_patterns=patterns or split_patterns(splits),
    )


def dataset_artifacts(
    section: Mapping[str, Any], path: str = "dataset", splits: Iterable[str] = ()
) -> list[Artifact]:
    """The artefacts of a labelled ``dataset`` section (its ``split`` and the other ``splits`` read)."""
    section = _with_protocol(section)
    kind = section.get("kind")
    if kind in GENERATED_KINDS:
        return []
    what = f"{path} {section.get('name', '?')}"
    source, root = section.get("source"), section.get("root")
    out: list[Artifact] = []
    if _is_hub_id(source) and _unset(root):
        out.append(_hub_repo(section, source, [section.get("split"), *splits], f"{what} ({source})"))
    out += _local_paths(section, path, what)
    return out


def pair_artifacts(section: Mapping[str, Any], path: str = "hessian_data") -> list[Artifact]:
    """The artefacts of a ``hessian_data`` section of image-caption pairs."""
    from uqvlm.data.hub_shards import DEFAULT_PAIRS_PER_SHARD, shards_for
    from uqvlm.data.sources.webdataset import expand_braces

    kind = section.get("kind")
    what = f"{path} {section.get('name', '?')}"
    if kind in GENERATED_KINDS:
        return []
    if kind == "hf_wds":
        names = expand_braces(str(section["shards"]))
        take = shards_for(
            section.get("n"), int(section.get("pairs_per_shard") or DEFAULT_PAIRS_PER_SHARD), len(names)
        )
        return [
            _hub_repo(
                section,
                str(section["repo"]),
                (),
                f"{what} ({section['repo']}: {take} of {len(names)} shards, for n={section.get('n')} pairs at "
                f"~{section.get('pairs_per_shard')} per shard)",
                tuple(names[:take]),
            )
        ]
    if kind == "wds":
        root = section.get("root")
        return [
            Artifact(
                kind="manual",
                what=f"{what}: webdataset shards ({section.get('shards')})",
                path=None if _unset(root) else os.path.expanduser(str(root)),
                hint=f"set {path}.root=/path/to/shards (img2dataset output: <key>.jpg + <key>.txt per sample)",
            )
        ]
    return dataset_artifacts(section, path)
