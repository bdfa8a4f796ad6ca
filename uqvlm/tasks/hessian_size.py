"""``task=hessian_size``: how many image-caption pairs does the curvature need? The zero-shot evaluation
of the run's dataset with posteriors (each of ``posterior.structures``) fitted from the first N pairs of
``hessian_data``, for N on a log-spaced grid up to all of them, with n and lambda as the posterior
settings say (the evidence's lambda by default, recorded per N: it moves with N, since the curvature
factors are normalised by sqrt(N)).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from uqvlm.console import console
from uqvlm.data.registry import build_pair_dataset
from uqvlm.data.sections import PairDataSettings
from uqvlm.errors import ConfigError
from uqvlm.plots import _save, plt
from uqvlm.settings import HessianSizeSettings, RunSettings
from uqvlm.tasks.common import TaskResult
from uqvlm.tasks.study import (
    STUDY_METRICS,
    finished_at,
    fit_and_score,
    open_evaluation,
    output_location,
    scores,
    write_study,
)

STUDY = "hessian_size"


def finished_record(settings: RunSettings) -> Path | None:
    return finished_at(*output_location(settings, STUDY), settings)


def pair_counts(task: HessianSizeSettings, total: int) -> list[int]:
    """The sizes to fit: ``task.sizes`` (``all`` = ``total``), or ``task.num_sizes`` log-spaced sizes from
    ``task.min_size`` to ``total``; sorted, without repeats, each at most ``total``."""
    if task.sizes is not None:
        sizes = [total if s == HessianSizeSettings.ALL else int(s) for s in task.sizes]
        if too_many := [s for s in sizes if s > total]:
            raise ConfigError(f"task.sizes {too_many} exceed the {total} pairs of the Hessian data")
        return sorted(set(sizes))
    if task.min_size >= total or task.num_sizes == 1:
        return [total]
    grid = np.geomspace(task.min_size, total, task.num_sizes)
    return sorted({int(round(x)) for x in grid})


def plot_sizes(table: pd.DataFrame, path: Path, title: str) -> Path:
    """NLL, ECE, accuracy and the evidence's lambda against the number of pairs (log x), one line per
    structure, MAP dashed."""
    bayes = table[table["method"] != "map"]
    map_row = table[table["method"] == "map"]
    fig, axes = plt.subplots(1, 4, figsize=(13.0, 3.0))
    for ax, metric in zip(axes[:3], STUDY_METRICS, strict=True):
        for method, g in bayes.groupby("method", sort=False):
            ax.plot(g["pairs"], g[metric], "o-", label=method)
        if len(map_row):
            ax.axhline(float(map_row[metric].iloc[0]), color="tab:gray", linestyle="--", label="map")
        ax.set(xscale="log", xlabel="Hessian pairs N", ylabel=metric)
    for method, g in bayes.groupby("method", sort=False):
        axes[3].plot(g["pairs"], g["lambda_image"], "o-", label=f"{method} image")
        axes[3].plot(g["pairs"], g["lambda_text"], "s--", label=f"{method} text")
    axes[3].set(xscale="log", yscale="log", xlabel="Hessian pairs N", ylabel="prior precision lambda")
    axes[0].legend(fontsize=7)
    axes[3].legend(fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def run(settings: RunSettings) -> TaskResult:
    task: HessianSizeSettings = settings.task
    if not isinstance(settings.hessian_data, PairDataSettings):
        raise ConfigError(
            f"task=hessian_size subsamples image-caption pairs; hessian_data={settings.hessian_data.name} "
            "has none (choose pairs, e.g. hessian_data=laion400m)"
        )
    structures = settings.posterior.structures
    if not structures:
        raise ConfigError("task=hessian_size needs a posterior structure (posterior=kfac, diag or bayesvlm)")
    sizes = pair_counts(task, len(build_pair_dataset(settings.hessian_data.section)))
    ev = open_evaluation(settings)
    ctx, provenance = ev.ctx, ev.provenance
    map_scores = scores(ctx.logits(ctx.image).log_softmax(-1), ctx.labels, task.ece_bins)
    rows = [{"method": "map", "pairs": np.nan, **map_scores}]
    fitted = {}
    for size in sizes:
        # The first `size` pairs: every pair kind takes `n` as a cap.
        hessian_data = dataclasses.replace(
            settings.hessian_data, section={**settings.hessian_data.section, "n": size}
        )
        for structure in structures:
            row, ident = fit_and_score(ev, hessian_data, structure, task.ece_bins)
            rows.append({"method": f"bayesvlm-{structure}", "pairs": ident["n_pairs"], **row})
            fitted[f"{structure}/{size}"] = ident
            console.print(
                f"N={ident['n_pairs']} {structure}: lambda {row['lambda_image']:.3g} / "
                f"{row['lambda_text']:.3g}, NLL {row['nll']:.4f}, ECE {row['ece']:.4f}"
            )
    table = pd.DataFrame(rows)
    directory, stem = output_location(settings, STUDY)
    title = (
        f"Hessian data size {settings.dataset.name} / {settings.model.name} ({settings.hessian_data.name})"
    )
    plot_sizes(table, directory / f"{stem}.png", title)
    provenance["posteriors"] = fitted
    provenance["n"] = settings.posterior.n
    provenance["columns"] = (
        "pairs: image-caption pairs of the curvature (the first N of hessian_data); lambda_image / "
        "lambda_text: the prior precision per tower as posterior.prior_precision chose it"
    )
    paths = write_study(table, directory, stem, title=title, settings=settings, provenance=provenance)
    return TaskResult(table, None, paths["record"])
