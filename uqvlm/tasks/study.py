"""What the study tasks (overhead, corruption, probcosine_study, hessian_size, proxy_data, prior_grid,
uncertainty_error) share: where their outputs go, how their tables are written, and the MAP and BayesVLM
scores of cached features.

Each study writes ``results/<study>/<group>/<model>.{csv,md,tex,json}`` (``<group>``: the evaluated
dataset, unless the study says otherwise), a run record under ``runs/`` keyed by the config hash (so a
re-launched sweep skips finished jobs) and its figures beside the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import Tensor

from uqvlm.data.sections import HessianDataSettings
from uqvlm.features import Features
from uqvlm.methods import BayesVLM, ZeroShotContext
from uqvlm.metrics import evaluate_log_probs
from uqvlm.results import model_slug, record_path, write_results
from uqvlm.settings import RunSettings
from uqvlm.tasks.common import LoadedModel, RunDirs, load_model, prepare_dirs
from uqvlm.tasks.hessian import fit_posteriors
from uqvlm.tasks.zeroshot import load_dataset, load_evaluation

# The metrics the study tables keep (of uqvlm.metrics.evaluate_log_probs).
STUDY_METRICS = ("acc", "nll", "ece")


def output_location(settings: RunSettings, study: str, group: str | None = None) -> tuple[Path, str]:
    """``(results/<study>/<group>, <model slug>)``; the group is the evaluated dataset by default."""
    group = settings.dataset.name if group is None else group
    return Path(settings.paths.results_dir) / study / group, model_slug(settings.model)


def finished_at(directory: Path, stem: str, settings: RunSettings) -> Path | None:
    """The run record of this exact config under ``directory``, if a previous run finished it."""
    path = record_path(directory, stem, settings.config)
    return path if path.exists() else None


def write_study(
    table: pd.DataFrame,
    directory: Path,
    stem: str,
    *,
    title: str,
    settings: RunSettings,
    provenance: dict[str, Any],
) -> dict[str, Path]:
    """The study's table as CSV, Markdown and LaTeX (significant digits), and its run record (last: its
    presence means the run finished)."""
    return write_results(
        table,
        directory,
        stem,
        title=title,
        config=settings.config,
        provenance=provenance,
        latex=True,
        significant=True,
    )


def set_prior(ctx: ZeroShotContext, structure: str, posts: dict[str, Any]) -> dict[str, float]:
    """n and lambda on both towers as the run's posterior settings say (the evidence by default), exactly
    as the zero-shot task sets them; returns the prior precision per tower."""
    BayesVLM(structure=structure).configure_prior(ctx, posts)
    return {tower: float(post.prior_precision) for tower, post in posts.items()}


def bayes_log_probs(ctx: ZeroShotContext, structure: str, image: Features, posts: dict[str, Any]) -> Tensor:
    """The BayesVLM predictive (probit) of ``image`` against the context's classes, with the posteriors'
    current n and lambda."""
    return BayesVLM(structure=structure).log_probs(ctx, image, posts)


def scores(log_probs: Tensor, labels: Tensor, ece_bins: int, prefix: str = "") -> dict[str, float]:
    """acc, nll and ece of ``log_probs`` (keys prefixed by ``prefix``)."""
    metrics = evaluate_log_probs(log_probs, labels, ece_bins)
    return {f"{prefix}{k}": metrics[k] for k in STUDY_METRICS}


@dataclass
class Evaluation:
    """The run's zero-shot evaluation as the studies use it: directories, dataset, model, the context
    (cached image and class features, posterior providers) and its provenance."""

    dirs: RunDirs
    dataset: Any
    model: LoadedModel
    ctx: ZeroShotContext
    provenance: dict[str, Any]


def open_evaluation(settings: RunSettings) -> Evaluation:
    """Directories checked, the dataset built (before the model: a missing dataset is reported first),
    the model loaded and the evaluated split's features extracted (or read from the cache)."""
    dirs = prepare_dirs(settings.paths)
    dataset = load_dataset(settings)
    model = load_model(settings, dirs)
    ctx, provenance = load_evaluation(settings, dirs, model, dataset)
    return Evaluation(dirs, dataset, model, ctx, provenance)


def fit_and_score(
    ev: Evaluation, hessian_data: HessianDataSettings, structure: str, ece_bins: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """Posteriors of ``structure`` from ``hessian_data``, n and lambda as the run's posterior settings say,
    and BayesVLM's scores on the evaluation: (acc, nll, ece, lambda_image, lambda_text; the posteriors'
    cache identity)."""
    posts, ident = fit_posteriors(hessian_data, ev.model, ev.dirs, structure)
    lambdas = set_prior(ev.ctx, structure, posts)
    metrics = scores(bayes_log_probs(ev.ctx, structure, ev.ctx.image, posts), ev.ctx.labels, ece_bins)
    return {**metrics, "lambda_image": lambdas["image"], "lambda_text": lambdas["text"]}, ident
