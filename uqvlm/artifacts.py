"""What a run needs on this machine before it can start offline, declared by each source of data or weights.

``uqvlm fetch <overrides>`` gathers the artefacts of every composed run and downloads those it can (hub
repositories, URLs with a known digest) into the caches, then lists those a person must provide (split
files, local shards). Sources declare artefacts from their settings alone, without touching the data, so a
machine that has nothing yet can still say what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ArtifactKind = Literal["hf_repo", "url", "manual"]


@dataclass(frozen=True)
class Artifact:
    """One thing a run needs.

    - ``hf_repo``: files of a Hugging Face repository (``repo_id``, ``repo_type``, ``revision``), restricted
      to ``allow_patterns`` (e.g. ``("test/*", "classnames.txt")``) so only what the run reads is fetched.
      With ``one_of`` the patterns are file names tried in order and the first the repo has is fetched
      (open_clip's weights: ``open_clip_model.safetensors``, else ``open_clip_pytorch_model.bin``).
    - ``url``: one file downloaded from ``url`` into the uqvlm cache at ``dest`` (relative to the cache
      directory), verified by ``sha256`` and ``size`` when given.
    - ``manual``: something no download can provide (a split file, local shards); ``hint`` says where to get
      it and which config key to set. ``path`` is where the run looks for it, when known.
    """

    kind: ArtifactKind
    what: str  # one line for people, e.g. "dataset imagenet-r: test shards"
    repo_id: str | None = None
    repo_type: str | None = None  # "dataset" | "model"
    revision: str | None = None
    allow_patterns: tuple[str, ...] = ()
    one_of: bool = False
    url: str | None = None
    dest: str | None = None
    sha256: str | None = None
    size: int | None = None
    path: str | None = None
    hint: str = ""
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
