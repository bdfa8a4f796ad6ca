"""``task=proxy_data``: does a Hessian from proxy data calibrate as well as one from in-distribution data?

The same zero-shot evaluation of the run's dataset with posteriors (each of ``posterior.structures``)
fitted from the run's ``hessian_data`` (in-distribution: pairs like the model's pretraining data, e.g.
LAION-400M) and from ``task.proxy`` (another hessian_data option, e.g. CC12M; offline: ``shapes-proxy``,
pairs of a shifted mix of domains and caption styles), n and lambda as the posterior settings say.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from uqvlm.console import console
from uqvlm.errors import ConfigError
from uqvlm.plots import _save, plt
from uqvlm.settings import ProxyDataSettings, RunSettings
from uqvlm.tasks.common import TaskResult
from uqvlm.tasks.study import (
    finished_at,
    fit_and_score,
    open_evaluation,
    output_location,
    scores,
    write_study,
)

STUDY = "proxy_data"
ROLES = ("in_distribution", "proxy")


def finished_record(settings: RunSettings) -> Path | None:
    return finished_at(*output_location(settings, STUDY), settings)


def plot_proxy(table: pd.DataFrame, path: Path, title: str) -> Path:
    """NLL and ECE per structure, in-distribution vs proxy bars, MAP dashed."""
    bayes = table[table["method"] != "map"]
    methods = list(dict.fromkeys(bayes["method"]))
    map_row = table[table["method"] == "map"].iloc[0]
    fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.2))
    x = np.arange(len(methods))
    for ax, metric in zip(axes, ("nll", "ece"), strict=True):
        for j, role in enumerate(ROLES):
            rows = bayes[bayes["hessian_role"] == role].set_index("method")
            values = [float(rows.loc[m, metric]) if m in rows.index else np.nan for m in methods]
            label = f"{role} ({rows['hessian_data'].iloc[0]})" if len(rows) else role
            ax.bar(x + (j - 0.5) * 0.38, values, 0.38, label=label)
        ax.axhline(float(map_row[metric]), color="tab:gray", linestyle="--", label="map")
        ax.set_xticks(x, methods, fontsize=8)
        ax.set_ylabel(metric)
    axes[0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def run(settings: RunSettings) -> TaskResult:
    task: ProxyDataSettings = settings.task
    if task.proxy is None:
        raise ConfigError(
            "task.proxy is not set: choose the proxy Hessian data with hessian_data@task.proxy=<option> "
            "(e.g. hessian_data@task.proxy=shapes-proxy offline, cc12m for the paper's models)"
        )
    structures = settings.posterior.structures
    if not structures:
        raise ConfigError("task=proxy_data needs a posterior structure (posterior=kfac, diag or bayesvlm)")
    ev = open_evaluation(settings)
    ctx, provenance = ev.ctx, ev.provenance
    map_scores = scores(ctx.logits(ctx.image).log_softmax(-1), ctx.labels, task.ece_bins)
    rows = [{"method": "map", "hessian_role": None, "hessian_data": None, "pairs": np.nan, **map_scores}]
    fitted = {}
    for role, hessian_data in zip(ROLES, (settings.hessian_data, task.proxy), strict=True):
        for structure in structures:
            row, ident = fit_and_score(ev, hessian_data, structure, task.ece_bins)
            rows.append(
                {
                    "method": f"bayesvlm-{structure}",
                    "hessian_role": role,
                    "hessian_data": hessian_data.name,
                    "pairs": ident.get("n_pairs", np.nan),
                    **row,
                }
            )
            fitted[f"{role}/{structure}"] = ident
            console.print(
                f"{role} ({hessian_data.name}) {structure}: NLL {row['nll']:.4f}, ECE {row['ece']:.4f} "
                f"(MAP {map_scores['nll']:.4f} / {map_scores['ece']:.4f})"
            )
    table = pd.DataFrame(rows)
    directory, stem = output_location(settings, STUDY)
    title = (
        f"proxy Hessian data {settings.dataset.name} / {settings.model.name}: "
        f"{settings.hessian_data.name} vs {task.proxy.name}"
    )
    plot_proxy(table, directory / f"{stem}.png", title)
    provenance["posteriors"] = fitted
    provenance["n"] = settings.posterior.n
    provenance["columns"] = (
        "hessian_role: in_distribution (the run's hessian_data) or proxy (task.proxy); pairs: image-caption "
        "pairs of the curvature; lambda_*: the prior precision per tower as posterior.prior_precision chose it"
    )
    paths = write_study(table, directory, stem, title=title, settings=settings, provenance=provenance)
    return TaskResult(table, None, paths["record"])
