"""Hessian estimation: last-layer posteriors of both towers from image-caption pairs, cached on disk.

Image side: sources are the images of a class batch, targets the captions of the same pairs; text
side: the reverse (method.md section 3). The posterior state (factors or diagonals and the likelihood,
without the prior precision, which is cheap to set later) is cached under a key of everything that
determines it, the posterior state's version included: an entry an older uqvlm wrote is rebuilt.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from uqvlm.cache import FORMAT_VERSION, cache_key, get_or_build
from uqvlm.config_utils import require_set
from uqvlm.console import console, progress
from uqvlm.data.registry import build_pair_dataset
from uqvlm.data.sections import HessianDataSettings, PublishedFactorsSettings
from uqvlm.errors import ConfigError, DatasetFormatError, DataUnavailableError, UqvlmError
from uqvlm.laplace import KFACPosterior, Laplace, likelihood_for, load_published_factors
from uqvlm.laplace.base import STATE_VERSION, LastLayerPosterior
from uqvlm.settings import RunSettings
from uqvlm.tasks.common import (
    LoadedModel,
    RunDirs,
    TaskResult,
    extract_features,
    load_model,
    prepare_dirs,
)

TOWERS = ("image", "text")


def _heads(vlm) -> dict[str, Any]:
    return {"image": vlm.image_head, "text": vlm.text_head}


def _published_posteriors(
    published: PublishedFactorsSettings, model: LoadedModel, structure: str
) -> dict[str, Any]:
    if structure != KFACPosterior.structure:
        raise ConfigError(
            f"hessian_data=published provides KFAC factors only; posterior structure {structure!r} "
            "needs Hessian data (e.g. hessian_data=laion400m)"
        )
    require_set(published.section, "hessian_data")
    try:
        factors = load_published_factors(published.dir)
    except FileNotFoundError as err:
        raise DataUnavailableError(f"hessian_data.dir={published.dir}: {err}") from err
    except ValueError as err:  # factors of the wrong shape or kind in the user's directory
        raise DatasetFormatError(f"hessian_data.dir={published.dir}: {err}") from err
    heads = _heads(model.vlm)
    # The model's likelihood, for curvature added later (EPIG's updates).
    likelihood = likelihood_for(model.vlm)
    posts = {}
    for tower, short in (("image", "img"), ("text", "txt")):
        head = heads[tower]
        try:
            posts[tower] = KFACPosterior.from_factors(
                factors[f"A_{short}"],
                factors[f"B_{short}"],
                weight=head.weight,
                bias=head.bias,
                likelihood=likelihood,
            )
        except ValueError as err:
            raise UqvlmError(
                f"the published factors in {published.dir} do not fit {model.identity['name']}'s {tower} "
                f"last layer ({err})"
            ) from None
    return posts


def fit_posteriors(
    hessian_data: HessianDataSettings, model: LoadedModel, dirs: RunDirs, structure: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The image and text posteriors of ``structure`` (kfac | diag), from the cache or estimated now from
    the pairs of ``hessian_data`` (or the published factors).

    Returns the posteriors and the cache identity they were built from.
    """
    if isinstance(hessian_data, PublishedFactorsSettings):
        return _published_posteriors(hessian_data, model, structure), {"published": str(hessian_data.dir)}

    vlm = model.vlm
    pairs = build_pair_dataset(hessian_data.section)
    likelihood = likelihood_for(vlm)
    class_batch = hessian_data.class_batch
    ident = {
        "model": model.identity,
        "data": pairs.fingerprint(),
        "n_pairs": len(pairs),
        "class_batch": class_batch,
        "likelihood": likelihood.state(),
        "dtype": "float64",
        "structure": structure,
        "format": FORMAT_VERSION,
        "state_version": STATE_VERSION,
    }
    key = cache_key(**ident)
    path = Path(dirs.cache) / "posteriors" / f"{structure}-{key}.pt"
    heads = _heads(vlm)

    def build() -> dict[str, Any]:
        feats = extract_features(model, dirs, pairs, f"{hessian_data.name} pairs")
        sides = {"image": (feats["image"], feats["text"]), "text": (feats["text"], feats["image"])}
        posts = {t: Laplace(heads[t], structure, likelihood=likelihood) for t in TOWERS}
        n = len(pairs)
        n_batches = math.ceil(n / class_batch)
        with progress() as bar:
            task = bar.add_task(f"{structure} curvature ({likelihood.kind})", total=2 * n_batches)
            for start in range(0, n, class_batch):
                sl = slice(start, start + class_batch)
                for tower in TOWERS:
                    src, tgt = sides[tower]
                    posts[tower].update(src.activations[sl], src.embeddings[sl], tgt.embeddings[sl])
                    bar.advance(task)
        for p in posts.values():
            p.finalize()
        return {"meta": {"key": key}, "ident": ident, **{t: posts[t].state_dict() for t in TOWERS}}

    entry = get_or_build(path, build, {"key": key})
    try:
        posts = {t: LastLayerPosterior.from_state_dict(entry[t]) for t in TOWERS}
    except (KeyError, ValueError) as err:  # an entry another uqvlm version wrote
        raise UqvlmError(
            f"the cached {structure} posterior {path} cannot be read ({err}); delete it (or the cache "
            "directory) and run again"
        ) from err
    for tower, post in posts.items():
        # The key covers the checkpoint's bytes; this guards against a cache copied between models.
        if not torch.equal(post.last_layer.weight.double(), heads[tower].weight.detach().double().cpu()):
            raise UqvlmError(
                f"the cached {structure} posterior {path} was fitted for another model's {tower} last "
                "layer; delete it (or the cache directory) and run again"
            )
    return posts, ident


def finished_record(settings: RunSettings) -> Path | None:
    """None: the posteriors' own cache makes a re-run cheap, and there is no run record to skip by."""
    return None


def run(settings: RunSettings) -> TaskResult:
    """``task=hessian``: estimate and cache the posteriors of every configured structure."""
    dirs = prepare_dirs(settings.paths)
    model = load_model(settings, dirs)
    for structure in settings.task.fitted_structures(settings.posterior):
        posts, _ident = fit_posteriors(settings.hessian_data, model, dirs, structure)
        for tower, post in posts.items():
            console.print(f"{structure} {tower}: {post!r}")
    console.print(f"posteriors cached under {dirs.cache / 'posteriors'}")
    return TaskResult()
