"""Where an open_clip model's weights come from, found offline-first.

A model is named by an open_clip model name with a pretrained tag or a local checkpoint file, or by an
``hf-hub:org/repo`` or ``local-dir:/path`` source (as the model name or as ``pretrained``).
:func:`resolve_weights` looks the weights up in the local caches first; when they are not there and
cannot be downloaded, it raises :class:`~uqvlm.errors.WeightsUnavailableError` within seconds instead of
open_clip's retry loops or its silent fallback to random weights. It hands back what to give open_clip
(:class:`WeightSource`); building the model is :func:`uqvlm.models.vlm.load_vlm`'s job.
"""

from __future__ import annotations

import difflib
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
from open_clip.pretrained import (
    download_pretrained_from_url,
    get_pretrained_cfg,
    list_pretrained_tags_by_model,
)
from open_clip.transform import merge_preprocess_dict

from uqvlm import hub
from uqvlm.artifacts import Artifact
from uqvlm.errors import UqvlmError, WeightsUnavailableError
from uqvlm.models.tiny import register_model_configs

log = logging.getLogger(__name__)

HF_HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
# open_clip's weight file names in hub repos, safetensors first as open_clip prefers them.
HF_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG_FILE = "open_clip_config.json"
CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".npz", ".ckpt")


class ModelNameError(UqvlmError, ValueError):
    """Unknown open_clip model name or pretrained tag (the message lists close matches)."""


def _schema(value: str | None) -> str | None:
    if value is None:
        return None
    if value.startswith(HF_HUB_PREFIX):
        return "hf-hub"
    if value.startswith(LOCAL_DIR_PREFIX):
        return "local-dir"
    return None


def check_model_name(model_name: str) -> str:
    """The open_clip config name for ``model_name`` ('/' as '-'); ValueError with close matches if unknown."""
    register_model_configs()
    cleaned = model_name.replace("/", "-")
    known = open_clip.list_models()
    if cleaned in known:
        return cleaned
    by_lower = {m.lower(): m for m in known}
    close = difflib.get_close_matches(cleaned.lower(), list(by_lower), n=5, cutoff=0.6)
    hint = f" Did you mean: {', '.join(by_lower[c] for c in close)}?" if close else ""
    raise ModelNameError(
        f"unknown open_clip model {model_name!r}.{hint} "
        "(open_clip.list_models() lists all; hf-hub:org/repo and local-dir:/path also work)"
    )


def weights_unavailable(
    what: str, repo: str | None = None, checkpoint_hint: bool = True
) -> WeightsUnavailableError:
    """The error for weights that are missing: ``what`` went wrong, then the ways to provide them."""
    ways = []
    if repo is not None:
        ways.append(hub.how_to_populate(repo))
    if checkpoint_hint:
        ways.append("or pass model.pretrained=/path/to/checkpoint.bin (an open_clip checkpoint file)")
    return WeightsUnavailableError(f"{what}. To provide it: " + "; ".join(ways) + ".")


def _hub_weights(repo_id: str, filenames: Sequence[str], what: str, cache_dir: str | None) -> str:
    """A weight file of ``repo_id`` from the cache, else downloaded; fails fast when offline."""
    for fn in filenames:
        path = hub.cached_file(repo_id, fn, cache_dir=cache_dir)
        if path is not None:
            return path
    if hub.is_offline():
        raise weights_unavailable(
            f"weights for {what} are not in the local Hugging Face cache ({cache_dir or hub.hub_cache_dir()}) "
            f"and the hub cannot be reached (offline): looked for {', '.join(filenames)} in {repo_id}",
            repo_id,
        )
    for fn in filenames:
        path = hub.fetch_file(repo_id, fn, cache_dir=cache_dir)
        if path is not None:
            return path
    raise weights_unavailable(
        f"could not download weights for {what} from {repo_id} ({', '.join(filenames)})", repo_id
    )


def _safe_alternatives(filename: str) -> list[str]:
    # open_clip prefers a .safetensors sibling when the hub repo has one.
    if filename == "open_clip_pytorch_model.bin":
        return ["open_clip_model.safetensors", filename]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def _url_target(url: str, cache_dir: str | None) -> str:
    """Where open_clip's URL downloader keeps ``url``."""
    return os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(url))


def _url_weights(url: str, what: str, cache_dir: str | None) -> str:
    target = _url_target(url, cache_dir)
    if os.path.isfile(target):
        return target
    if hub.is_offline() or not hub.reachable(url):
        raise weights_unavailable(
            f"weights for {what} are not cached at {target} and {url} cannot be reached (offline)"
        )
    try:
        return download_pretrained_from_url(url, cache_dir=cache_dir)
    except Exception as e:
        raise weights_unavailable(f"could not download weights for {what} from {url} ({e})") from e


@dataclass
class WeightSource:
    """What to hand to open_clip: a (schema or built-in) model name, a checkpoint path and preprocessing."""

    oc_name: str
    checkpoint: str | None
    force_preprocess: dict[str, Any]
    offline: bool = False


def _resolve_tag(name: str, tag: str, cache_dir: str | None) -> WeightSource:
    pcfg = get_pretrained_cfg(name, tag)
    what = f"{name} ({tag})"
    if "file" in pcfg:
        path = pcfg["file"]
        if not os.path.isfile(path):
            raise weights_unavailable(f"checkpoint file {path!r} of tag {tag!r} does not exist")
    elif pcfg.get("hf_hub"):
        repo_id, filename = os.path.split(pcfg["hf_hub"])
        candidates = _safe_alternatives(filename or "open_clip_pytorch_model.bin")
        cached = any(hub.cached_file(repo_id, fn, cache_dir=cache_dir) for fn in candidates)
        url = pcfg.get("url")
        if not cached and url and os.path.isfile(_url_target(url, cache_dir)):
            path = _url_target(url, cache_dir)  # an earlier download through open_clip's URL path
        else:
            path = _hub_weights(repo_id, candidates, what, cache_dir)
    elif pcfg.get("url"):
        path = _url_weights(pcfg["url"], what, cache_dir)
    else:
        raise weights_unavailable(f"pretrained tag {tag!r} of {name} names no weight source")
    # open_clip merges the tag's normalisation into preprocessing only when given the tag itself; we hand
    # it the resolved file, so pass those keys explicitly (size still comes from the model).
    pre = merge_preprocess_dict({}, pcfg)
    pre = {k: pre[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pre}
    model_cfg = open_clip.get_model_config(name) or {}
    if bool(pcfg.get("quick_gelu", False)) != bool(model_cfg.get("quick_gelu", False)):
        warnings.warn(
            f"QuickGELU mismatch between model {name} and pretrained tag {tag!r}; "
            f"use {name}-quickgelu for weights trained with QuickGELU",
            UserWarning,
            stacklevel=3,
        )
    return WeightSource(name, path, pre)


def _resolve_hf_hub(repo_id: str, cache_dir: str | None) -> WeightSource:
    what = f"hf-hub:{repo_id}"
    offline = hub.is_offline()
    config = hub.cached_file(repo_id, HF_CONFIG_FILE, cache_dir=cache_dir)
    if config is None and not offline:
        config = hub.fetch_file(repo_id, HF_CONFIG_FILE, cache_dir=cache_dir)
    if config is None:
        state = "offline and not in the local Hugging Face cache" if offline else "could not be downloaded"
        raise weights_unavailable(
            f"{HF_CONFIG_FILE} of {what} is {state} ({cache_dir or hub.hub_cache_dir()})", repo_id
        )
    # open_clip only warns and initialises randomly when the hub weights are missing: check them first.
    _hub_weights(repo_id, HF_WEIGHT_FILES, what, cache_dir)
    # Everything is cached now; open_clip reads it from there without contacting the hub.
    return WeightSource(HF_HUB_PREFIX + repo_id, None, {}, offline=True)


def _resolve_local_dir(path: str) -> WeightSource:
    d = Path(path).expanduser()
    if not d.is_dir():
        raise weights_unavailable(f"local-dir:{path}: directory not found", checkpoint_hint=True)
    if not (d / HF_CONFIG_FILE).is_file():
        raise weights_unavailable(
            f"local-dir:{path}: {HF_CONFIG_FILE} is missing (save one with open_clip's push_to_hf_hub)"
        )
    if not any(p.suffix in (".safetensors", ".bin", ".pth") for p in d.iterdir()):
        raise weights_unavailable(
            f"local-dir:{path}: no checkpoint (*.safetensors, *.bin, *.pth) in the directory"
        )
    return WeightSource(LOCAL_DIR_PREFIX + str(d), None, {})


def resolve_weights(model_name: str, pretrained: str | None, cache_dir: str | None) -> WeightSource:
    """The checked weight source of ``model_name`` / ``pretrained`` (see :func:`uqvlm.models.vlm.load_vlm`)."""
    source = model_name if _schema(model_name) else pretrained if _schema(pretrained) else None
    if source is not None:
        if source is model_name and pretrained:
            log.warning("ignoring pretrained=%r: model %r names its own weights", pretrained, model_name)
        if _schema(source) == "hf-hub":
            repo_id = source[len(HF_HUB_PREFIX) :].strip("/")
            if not repo_id:
                raise ModelNameError("empty repo id after 'hf-hub:'")
            return _resolve_hf_hub(repo_id, cache_dir)
        return _resolve_local_dir(source[len(LOCAL_DIR_PREFIX) :])

    name = check_model_name(model_name)
    if pretrained in (None, "", "none", "None"):
        return WeightSource(name, None, {})
    if get_pretrained_cfg(name, pretrained):
        return _resolve_tag(name, pretrained, cache_dir)
    if os.path.isfile(pretrained):
        return WeightSource(name, pretrained, {})
    looks_like_path = (
        os.sep in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES) or pretrained.startswith("~")
    )
    if looks_like_path:
        raise weights_unavailable(
            f"checkpoint file {pretrained!r} for {name} does not exist", checkpoint_hint=True
        )
    tags = list_pretrained_tags_by_model(name)
    close = difflib.get_close_matches(pretrained, tags, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ModelNameError(
        f"pretrained={pretrained!r} is neither a known tag of {name} nor an existing file.{hint} "
        f"Tags of {name}: {', '.join(tags) if tags else '(none)'}"
    )


# Files a transformers tokenizer may read from its hub repo (which ones a given repo has: not known ahead,
# so every small file; the weights are left out).
TOKENIZER_PATTERNS = ("*.json", "*.model", "*.txt")


def _tokenizer_artifacts(oc_name: str) -> list[Artifact]:
    text_cfg = (open_clip.get_model_config(oc_name) or {}).get("text_cfg") or {}
    repo = text_cfg.get("hf_tokenizer_name")
    if not repo:
        return []
    return [
        Artifact(
            kind="hf_repo",
            what=f"model {oc_name}: tokenizer ({repo})",
            repo_id=repo,
            repo_type="model",
            allow_patterns=TOKENIZER_PATTERNS,
        )
    ]


def weight_artifacts(model_name: str, pretrained: str | None) -> list[Artifact]:
    """What loading ``model_name`` with ``pretrained`` needs on this machine, without touching it: the hub
    repo and weight file names of a pretrained tag (or of an ``hf-hub:`` model), a tokenizer repo, a local
    checkpoint or folder. uqvlm's own ``shapes`` checkpoint is trained locally and needs nothing."""
    what = f"model {model_name} ({pretrained})"
    source = model_name if _schema(model_name) else pretrained if _schema(pretrained) else None
    if source is not None and _schema(source) == "hf-hub":
        repo = source[len(HF_HUB_PREFIX) :].strip("/")
        return [
            Artifact(kind="hf_repo", what=f"{what}: config", repo_id=repo, allow_patterns=(HF_CONFIG_FILE,)),
            Artifact(
                kind="hf_repo",
                what=f"{what}: weights",
                repo_id=repo,
                allow_patterns=HF_WEIGHT_FILES,
                one_of=True,
            ),
        ]
    if source is not None:
        return [
            Artifact(
                kind="manual",
                what=what,
                path=source[len(LOCAL_DIR_PREFIX) :],
                hint="model.name=local-dir:/path",
            )
        ]
    name = check_model_name(model_name)
    out = _tokenizer_artifacts(name)
    if pretrained in (None, "", "none", "None", "shapes"):
        return out
    pcfg = get_pretrained_cfg(name, pretrained)
    if pcfg.get("hf_hub"):
        repo_id, filename = os.path.split(pcfg["hf_hub"])
        alternatives = tuple(_safe_alternatives(filename or "open_clip_pytorch_model.bin"))
        return [
            Artifact(
                kind="hf_repo",
                what=f"{what}: weights",
                repo_id=repo_id,
                allow_patterns=alternatives,
                one_of=True,
            ),
            *out,
        ]
    if pcfg.get("url") or pcfg.get("file"):
        target = pcfg.get("file") or _url_target(pcfg["url"], None)
        hint = f"open_clip downloads it from {pcfg['url']} on first use" if pcfg.get("url") else ""
        return [Artifact(kind="manual", what=f"{what}: weights", path=target, hint=hint), *out]
    # A checkpoint file (an existing one is present; a missing one is reported here too).
    return [
        Artifact(
            kind="manual",
            what=f"{what}: checkpoint file",
            path=os.path.expanduser(pretrained),
            hint="model.pretrained=/path/to/checkpoint",
        ),
        *out,
    ]
