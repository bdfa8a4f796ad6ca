"""Image-caption pairs in the webdataset shards of a Hugging Face hub repository, read through the hub cache.

``kind: hf_wds`` (e.g. ``hessian_data=cc12m``: pixparse/cc12m-wds). The shards are named by a brace
pattern (``cc12m-train-{0000..2175}.tar``) and taken in order until ``n`` pairs are indexed: each from the
local hub cache, else downloaded when the hub is reachable (``uqvlm fetch`` downloads the same shards
ahead of time). The pairs are then those of :class:`~uqvlm.data.sources.WebDatasetPairs` over the cached
files, so a run on a machine without internet reads exactly what was fetched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from uqvlm import hub
from uqvlm.data.sources import WebDatasetPairs
from uqvlm.data.sources.webdataset import WDS_IMAGE_EXTS, expand_braces
from uqvlm.errors import DataUnavailableError

__all__ = ["DEFAULT_PAIRS_PER_SHARD", "hub_shard_pairs", "shards_for"]

# The shard size assumed when a section gives none (img2dataset writes up to 10,000 samples a shard).
DEFAULT_PAIRS_PER_SHARD = 5000
# Margin on the estimated shard count for samples a shard lacks (an image or a caption missing).
SHARD_MARGIN = 1.05


def shards_for(n: int | None, pairs_per_shard: int, available: int) -> int:
    """How many shards (of ``available``) to take for ``n`` pairs at about ``pairs_per_shard`` each."""
    if n is None:
        return available
    return min(available, max(1, math.ceil(n * SHARD_MARGIN / pairs_per_shard)))


def _shard_file(repo: str, filename: str, revision: str | None, offline: bool) -> str | None:
    path = hub.cached_file(repo, filename, repo_type="dataset", revision=revision)
    if path is not None or offline:
        return path
    return hub.fetch_file(repo, filename, repo_type="dataset", revision=revision)


def hub_shard_pairs(
    repo: str,
    shards: str | Sequence[str],
    *,
    revision: str | None = None,
    name: str | None = None,
    pairs_per_shard: int = DEFAULT_PAIRS_PER_SHARD,
    image_exts: Sequence[str] = WDS_IMAGE_EXTS,
    caption_ext: str = "txt",
    n: int | None = None,
    on_bad_image: str = "error",
) -> WebDatasetPairs:
    """The first ``n`` pairs (all with ``n: null``) of the shards of hub dataset ``repo``, in shard order.

    ``pairs_per_shard`` sizes the first request (``uqvlm fetch`` uses the same estimate); when the shards
    hold fewer pairs, the next ones are taken until ``n`` is reached. Fewer than ``n`` pairs on this
    machine (offline, or the repo has no more shards) raise :class:`DataUnavailableError`.
    """
    names = [
        f for pattern in ([shards] if isinstance(shards, str) else shards) for f in expand_braces(pattern)
    ]
    if not names:
        raise DataUnavailableError(f"hessian_data: no shard names in {shards!r}")
    offline = hub.is_offline()
    paths: list[str] = []
    take = shards_for(n, pairs_per_shard, len(names))
    while True:
        for filename in names[len(paths) : take]:
            path = _shard_file(repo, filename, revision, offline)
            if path is None:
                break
            paths.append(path)
        pairs = None
        if paths:
            pairs = WebDatasetPairs(
                paths,
                name=name or repo,
                image_exts=image_exts,
                caption_ext=caption_ext,
                n=n,
                on_bad_image=on_bad_image,
            )
            if (n is None and len(paths) == len(names)) or (n is not None and len(pairs) >= n):
                return pairs
        if len(paths) < take or take == len(names):
            have = f"{len(pairs)} pairs in {len(paths)} shard(s)" if pairs is not None else "no shard"
            state = "offline, and the local Hugging Face cache holds" if offline else "the hub gave"
            raise DataUnavailableError(
                f"hessian_data {name or repo!r} needs {n if n is not None else 'all'} pairs from {repo}, but "
                f"{state} {have} (next: {names[len(paths)] if len(paths) < len(names) else 'none'}). To "
                f"provide them: `uqvlm fetch <the same overrides>` on a machine with internet, or "
                f"{hub.how_to_populate(repo, 'dataset')}; or lower hessian_data.n"
            )
        take += 1
