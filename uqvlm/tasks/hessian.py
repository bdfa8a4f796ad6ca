"""Hessian estimation: last-layer posteriors of both towers from image-caption pairs, cached on disk.

Image side: sources are the images of a class batch, targets the captions of the same pairs; text
side: the reverse (method.md section 3). The posterior state (factors or diagonals and the likelihood,
without the prior precision, which is cheap to set later) is cached under a key of everything that
determines it, the posterior state's version included: an entry an older uqvlm wrote is rebuilt.

Map-reduce: the KFAC and diagonal GGN sums are additive over class batches. ``hessian_data.num_parts=K``
splits the class batches into K parts of consecutive batches; ``task=hessian hessian_data.part=i`` computes
part i (its pairs' features and each of its class batches' partial sums, cached: a killed part resumes),
and the job that finds every part done merges them in float64 into the very entry a single job writes
(same key), so zero-shot runs find it; ``task=hessian_merge`` merges explicitly. A single job is the same
with one part.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from uqvlm.cache import FORMAT_VERSION, cache_key, file_digest, get_or_build, load_verified
from uqvlm.console import console, progress
from uqvlm.data.base import PairRange
from uqvlm.data.registry import build_pair_dataset
from uqvlm.data.sections import HessianDataSettings, PairDataSettings, PublishedFactorsSettings
from uqvlm.errors import ConfigError, DatasetFormatError, DataUnavailableError, UqvlmError
from uqvlm.features import Features, LastLayer
from uqvlm.laplace import KFACPosterior, Laplace, likelihood_for, load_published_factors
from uqvlm.laplace.base import STATE_VERSION, LastLayerPosterior
from uqvlm.published import FILES
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


def published_factor_dir(
    published: PublishedFactorsSettings, model_identity: dict[str, Any], cache: Path
) -> Path:
    """The folder of verified published factors for the model (downloaded into the cache when missing)."""
    from uqvlm.published import published_dir

    # A tag (or hf-hub: name) is the identity's ``weights``; a checkpoint file is a digest there, which
    # names no published set (hessian_data.checkpoint or .dir then says which factors to use).
    return published_dir(published.section, model_identity["name"], model_identity["weights"], cache)


def _published_posteriors(
    published: PublishedFactorsSettings, model: LoadedModel, dirs: RunDirs, structure: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    if structure != KFACPosterior.structure:
        raise ConfigError(
            f"hessian_data=published provides KFAC factors only; posterior structure {structure!r} "
            "needs Hessian data (e.g. hessian_data=laion400m)"
        )
    directory = published_factor_dir(published, model.identity, dirs.cache)
    try:
        factors = load_published_factors(directory)
    except FileNotFoundError as err:
        raise DataUnavailableError(f"hessian_data=published: {err}") from err
    except ValueError as err:  # factors of the wrong shape or kind in the user's directory
        raise DatasetFormatError(f"hessian_data=published ({directory}): {err}") from err
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
                num_data=published.num_data,
                weight=head.weight,
                bias=head.bias,
                likelihood=likelihood,
            )
        except ValueError as err:
            raise UqvlmError(
                f"the published factors in {directory} do not fit {model.identity['name']}'s {tower} "
                f"last layer ({err})"
            ) from None
    # What determines the posterior: the factor files' bytes (not where they lie) and N.
    ident = {
        "published": {f: file_digest(directory / f) for f in FILES},
        "num_data": published.num_data,
    }
    return posts, ident


def ensure_hessian_data(settings: RunSettings, model: LoadedModel, dirs: RunDirs) -> None:
    """The published factors fetched and verified now, before any feature is computed: a missing or
    corrupted file stops the run at its start, not after the extraction."""
    published = settings.hessian_data
    if isinstance(published, PublishedFactorsSettings) and settings.task.fitted_structures(
        settings.posterior
    ):
        published_factor_dir(published, model.identity, dirs.cache)


def on_device(post: LastLayerPosterior, device: torch.device) -> LastLayerPosterior:
    """A copy of ``post`` with every tensor on ``device`` (cheap: the factors or diagonals only)."""
    return post.to(device)


def _differences(found: dict[str, Any], expected: dict[str, Any]) -> str:
    keys = sorted(set(found) | set(expected))
    return ", ".join(
        f"{k}: {found.get(k)!r} here, {expected.get(k)!r} in this config"
        for k in keys
        if found.get(k) != expected.get(k)
    )


def part_batches(n_batches: int, part: int, num_parts: int) -> range:
    """The class batches of ``part`` of ``num_parts``: consecutive, as even as can be (none for some parts
    when there are fewer batches than parts)."""
    return range(part * n_batches // num_parts, (part + 1) * n_batches // num_parts)


def part_pairs(pairs, class_batch: int, part: int, num_parts: int):
    """The pairs of ``part``'s class batches: a :class:`PairRange` (its own feature cache entry), or
    ``pairs`` itself when the part holds them all."""
    n = len(pairs)
    batches = part_batches(math.ceil(n / class_batch), part, num_parts)
    start, stop = batches.start * class_batch, min(batches.stop * class_batch, n)
    return pairs if (start, stop) == (0, n) else PairRange(pairs, start, stop)


def pair_features(
    pairs, hessian_data: PairDataSettings, model: LoadedModel, dirs: RunDirs
) -> dict[str, Features]:
    """The features of every pair of ``pairs`` (built from ``hessian_data``), ``image`` and ``text``, read
    from the entries the Hessian's parts cached (``hessian_data.num_parts``), so that nothing is encoded
    twice; extracted where missing."""
    k, name = hessian_data.num_parts, hessian_data.name
    chunks = []
    for part in range(k):
        subset = part_pairs(pairs, hessian_data.class_batch, part, k)
        if len(subset):
            label = f"part {part} of {k}" if k > 1 else ""
            chunks.append(extract_features(model, dirs, subset, f"{name} pairs {label}".rstrip()))
    return {tower: Features.cat([c[tower] for c in chunks]) for tower in TOWERS}


class _Estimate:
    """The estimation of one posterior (a structure, both towers) from image-caption pairs, map-reduced
    over class batches.

    Class batch b holds pairs [b C, (b + 1) C) (C = ``class_batch``; the last may be shorter). Part i of K
    is the consecutive batches [i nb / K, (i + 1) nb / K) (nb batches; a part may hold none when K > nb).
    A part extracts the features of its own pairs only and caches each batch's partial sums (both towers,
    float64, on the CPU) under ``posteriors/parts/<structure>-<key>/``, keyed by the posterior's identity
    and the batch; the merge adds them in float64, in batch order, into the posterior entry.
    """

    def __init__(self, hessian_data: PairDataSettings, model: LoadedModel, dirs: RunDirs, structure: str):
        self.hessian_data, self.model, self.dirs, self.structure = hessian_data, model, dirs, structure
        self.pairs = build_pair_dataset(hessian_data.section)
        self.likelihood = likelihood_for(model.vlm)
        self.class_batch = hessian_data.class_batch
        self.ident = {
            "model": model.identity,
            "data": self.pairs.fingerprint(),
            "n_pairs": len(self.pairs),
            "class_batch": self.class_batch,
            "likelihood": self.likelihood.state(),
            "dtype": "float64",
            "structure": structure,
            "format": FORMAT_VERSION,
            "state_version": STATE_VERSION,
        }
        self.key = cache_key(**self.ident)
        self.path = Path(dirs.cache) / "posteriors" / f"{structure}-{self.key}.pt"
        self.parts_dir = Path(dirs.cache) / "posteriors" / "parts" / f"{structure}-{self.key}"
        self.n_batches = math.ceil(len(self.pairs) / self.class_batch)

    @property
    def meta(self) -> dict[str, Any]:
        return {"key": self.key}

    def batch_path(self, batch: int) -> Path:
        return self.parts_dir / f"batch-{batch:05d}.pt"

    def batch_meta(self, batch: int) -> dict[str, Any]:
        return {"key": self.key, "batch": batch, "n_batches": self.n_batches}

    def part_batches(self, part: int, num_parts: int) -> range:
        return part_batches(self.n_batches, part, num_parts)

    def cached(self) -> dict[str, Any] | None:
        return load_verified(self.path, self.meta)

    # -------------------------------------------------------------------------------------- map
    def run_part(self, part: int, num_parts: int) -> None:
        """Compute and cache the partial sums of every class batch of ``part`` not cached yet."""
        batches = self.part_batches(part, num_parts)
        label = f"part {part} of {num_parts}" if num_parts > 1 else ""
        todo = [b for b in batches if load_verified(self.batch_path(b), self.batch_meta(b)) is None]
        if not batches:
            console.print(
                f"{label}: no class batch falls to it ({self.n_batches} class batches); nothing to do"
            )
        if not todo:
            return
        n, size = len(self.pairs), self.class_batch
        start = batches.start * size
        pairs = part_pairs(self.pairs, size, part, num_parts)
        name = self.hessian_data.name
        feats = extract_features(self.model, self.dirs, pairs, f"{name} pairs {label}".rstrip())
        with progress() as bar:
            task = bar.add_task(
                f"{self.structure} curvature ({self.likelihood.kind}) {label}".rstrip(), total=len(todo)
            )
            for b in todo:
                rows = slice(b * size - start, min((b + 1) * size, n) - start)
                get_or_build(
                    self.batch_path(b),
                    lambda b=b, rows=rows: self._batch_sums(feats, b, rows),
                    self.batch_meta(b),
                )
                bar.advance(task)

    def _batch_sums(self, feats: dict[str, Any], batch: int, rows: slice) -> dict[str, Any]:
        """One class batch's partial sums of both towers, accumulated on the model's device."""
        device = self.model.device
        sides = {"image": (feats["image"], feats["text"]), "text": (feats["text"], feats["image"])}
        heads = _heads(self.model.vlm)
        sums = {}
        for tower in TOWERS:
            src, tgt = sides[tower]
            post = Laplace(heads[tower], self.structure, likelihood=self.likelihood)
            post.update(
                src.activations[rows].to(device),
                src.embeddings[rows].to(device),
                tgt.embeddings[rows].to(device),
            )
            sums[tower] = post.partial_sums()
        return {"meta": self.batch_meta(batch), "ident": self.ident, **sums}

    # ----------------------------------------------------------------------------------- reduce
    def missing_batches(self) -> list[int]:
        """Class batches without a readable partial-sums entry (a foreign one counts as present: the merge
        refuses it)."""
        return [b for b in range(self.n_batches) if load_verified(self.batch_path(b)) is None]

    def merge(self) -> dict[str, Any]:
        """Sum every class batch's partial sums into the posterior entry (cached) and return it. Refuses
        partial sums computed for another config; needs every batch's."""
        entries = []
        for b in range(self.n_batches):
            path = self.batch_path(b)
            entry = load_verified(path)
            if entry is None:
                raise UqvlmError(
                    f"the partial sums of class batch {b} are missing ({path}); run its part first"
                )
            found = entry.get("ident", {}) if isinstance(entry, dict) else {}
            if found != self.ident or entry.get("meta") != self.batch_meta(b):
                diff = _differences(found, self.ident) or _differences(
                    entry.get("meta") or {}, self.batch_meta(b)
                )
                raise UqvlmError(
                    f"the partial sums {path} were computed for another config ({diff}); delete "
                    f"{self.parts_dir} and run the parts again"
                )
            entries.append(entry)

        def build() -> dict[str, Any]:
            heads = {
                t: LastLayer(h.weight.detach().cpu(), None if h.bias is None else h.bias.detach().cpu())
                for t, h in _heads(self.model.vlm).items()
            }
            posts = {
                t: LastLayerPosterior.from_partial_sums(
                    heads[t], [e[t] for e in entries], likelihood=self.likelihood
                )
                for t in TOWERS
            }
            return {"meta": self.meta, "ident": self.ident, **{t: posts[t].state_dict() for t in TOWERS}}

        entry = get_or_build(self.path, build, self.meta)
        if self.n_batches > 1:
            console.print(f"{self.structure}: the partial sums of {self.n_batches} class batches merged")
        return entry

    def posteriors(self, entry: dict[str, Any]) -> dict[str, LastLayerPosterior]:
        """The cached entry's posteriors (on the CPU), checked against the model's last layers."""
        try:
            posts = {t: LastLayerPosterior.from_state_dict(entry[t]) for t in TOWERS}
        except (KeyError, ValueError) as err:  # an entry another uqvlm version wrote
            raise UqvlmError(
                f"the cached {self.structure} posterior {self.path} cannot be read ({err}); delete it (or the "
                "cache directory) and run again"
            ) from err
        heads = _heads(self.model.vlm)
        for tower, post in posts.items():
            # The key covers the checkpoint's bytes; this guards against a cache copied between models.
            if not torch.equal(post.last_layer.weight.double(), heads[tower].weight.detach().double().cpu()):
                raise UqvlmError(
                    f"the cached {self.structure} posterior {self.path} was fitted for another model's {tower} "
                    "last layer; delete it (or the cache directory) and run again"
                )
        return posts


def fit_posteriors(
    hessian_data: HessianDataSettings, model: LoadedModel, dirs: RunDirs, structure: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The image and text posteriors of ``structure`` (kfac | diag), from the cache or estimated now from
    the pairs of ``hessian_data`` (or the published factors). Estimating runs every part still missing in
    this job (``hessian_data.part`` is read by ``task=hessian`` only), then merges.

    Returns the posteriors (on the CPU) and the cache identity they were built from.
    """
    if isinstance(hessian_data, PublishedFactorsSettings):
        # The heads live on the model's device, the factors on the CPU: all on the CPU, as estimated ones.
        posts, ident = _published_posteriors(hessian_data, model, dirs, structure)
        return {t: on_device(p, "cpu") for t, p in posts.items()}, ident
    estimate = _Estimate(hessian_data, model, dirs, structure)
    entry = estimate.cached()
    if entry is None:
        for part in range(hessian_data.num_parts):
            estimate.run_part(part, hessian_data.num_parts)
        entry = estimate.merge()
    return estimate.posteriors(entry), estimate.ident


def fit_part(
    hessian_data: PairDataSettings, model: LoadedModel, dirs: RunDirs, structure: str, part: int
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """Part ``part`` of ``hessian_data.num_parts`` of the estimation; merged into the posteriors when it
    finds every part done (then returned; else None), so the last part of a job array to finish merges."""
    estimate = _Estimate(hessian_data, model, dirs, structure)
    entry = estimate.cached()
    if entry is None:
        estimate.run_part(part, hessian_data.num_parts)
        missing = estimate.missing_batches()
        if missing:
            parts = sorted(
                {
                    p
                    for p in range(hessian_data.num_parts)
                    for b in missing
                    if b in estimate.part_batches(p, hessian_data.num_parts)
                }
            )
            console.print(
                f"{structure}: part {part} of {hessian_data.num_parts} done; waiting for hessian_data.part="
                f"{','.join(map(str, parts))} (the last part to finish merges them)"
            )
            return None, estimate.ident
        entry = estimate.merge()
    return estimate.posteriors(entry), estimate.ident


def merge_posteriors(
    hessian_data: PairDataSettings, model: LoadedModel, dirs: RunDirs, structure: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``task=hessian_merge``: the posteriors merged from the cached parts (every one must be there)."""
    estimate = _Estimate(hessian_data, model, dirs, structure)
    entry = estimate.cached()
    if entry is None:
        missing = estimate.missing_batches()
        if missing:
            k = hessian_data.num_parts
            parts = sorted({p for p in range(k) for b in missing if b in estimate.part_batches(p, k)})
            raise UqvlmError(
                f"{len(missing)} of {estimate.n_batches} class batches have no partial sums yet: run "
                f"task=hessian hessian_data.num_parts={k} hessian_data.part=<i> for parts {parts}"
            )
        entry = estimate.merge()
    return estimate.posteriors(entry), estimate.ident


def finished_record(settings: RunSettings) -> Path | None:
    """None: the posteriors' own cache makes a re-run cheap, and there is no run record to skip by."""
    return None


def run(settings: RunSettings) -> TaskResult:
    """``task=hessian``: estimate and cache the posteriors of every configured structure (with
    ``hessian_data.part``: that part, merged when every part is done)."""
    dirs = prepare_dirs(settings.paths)
    model = load_model(settings, dirs)
    data = settings.hessian_data
    part = data.part if isinstance(data, PairDataSettings) else None
    for structure in settings.task.fitted_structures(settings.posterior):
        if part is None:
            posts, _ident = fit_posteriors(data, model, dirs, structure)
        else:
            posts, _ident = fit_part(data, model, dirs, structure, part)
        for tower, post in (posts or {}).items():
            console.print(f"{structure} {tower}: {post!r}")
    console.print(f"posteriors cached under {dirs.cache / 'posteriors'}")
    return TaskResult()
