"""``task=prior_grid``: NLL, ECE and accuracy of BayesVLM over a grid of the pseudo-data count n and the
prior precision lambda (the same lambda on both towers), per structure, beside the evidence's lambda
(per tower) at each n.

One process, one fit per structure: after ``finalize`` a posterior's n and lambda are cheap to change
(one eigendecomposition serves every pair), and the image and class features are cached.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from uqvlm.console import console
from uqvlm.errors import ConfigError
from uqvlm.plots import _save, plt
from uqvlm.settings import PriorGridSettings, RunSettings
from uqvlm.tasks.common import TaskResult
from uqvlm.tasks.study import (
    bayes_log_probs,
    finished_at,
    open_evaluation,
    output_location,
    scores,
    write_study,
)

STUDY = "prior_grid"
GRID, EVIDENCE = "grid", "evidence"


def finished_record(settings: RunSettings) -> Path | None:
    return finished_at(*output_location(settings, STUDY), settings)


def plot_heatmaps(table: pd.DataFrame, map_scores: dict[str, float], path: Path, title: str) -> Path:
    """One row of panels per metric (NLL, ECE), one column per structure: the metric over n (rows) x
    lambda (columns), with the evidence's lambda at each n marked (image tower: white circle, text
    tower: white cross). Colour scales are shared across structures; MAP's value is in the titles."""
    structures = list(dict.fromkeys(table["structure"]))
    grid = table[table["kind"] == GRID]
    ns = sorted(grid["n"].unique())
    lams = sorted(grid["lambda"].unique())
    fig, axes = plt.subplots(2, len(structures), figsize=(4.2 * len(structures), 6.4), squeeze=False)
    for row, metric in enumerate(("nll", "ece")):
        values = grid[metric]
        vmin, vmax = float(values.min()), float(values.max())
        for col, structure in enumerate(structures):
            ax = axes[row][col]
            g = grid[grid["structure"] == structure].pivot_table(index="n", columns="lambda", values=metric)
            g = g.reindex(index=ns, columns=lams)
            image = ax.imshow(
                g.to_numpy(), origin="lower", aspect="auto", vmin=vmin, vmax=vmax, cmap="viridis"
            )
            ax.set_xticks(range(len(lams)), [f"{x:g}" for x in lams], rotation=45, fontsize=6)
            ax.set_yticks(range(len(ns)), [f"{x:g}" for x in ns], fontsize=7)
            ax.set(xlabel="prior precision lambda", ylabel="pseudo-data count n")
            ax.set_title(f"{structure} {metric} (map {map_scores[metric]:.3f})", fontsize=9)
            ev = table[(table["kind"] == EVIDENCE) & (table["structure"] == structure)]
            # The evidence's lambda on the panel's index axis: log-linear between grid columns.
            position = np.interp(np.log(ev["lambda_image"]), np.log(lams), np.arange(len(lams)))
            ax.plot(
                position,
                [ns.index(n) for n in ev["n"]],
                "o",
                mfc="none",
                mec="white",
                label="evidence (image)",
            )
            position = np.interp(np.log(ev["lambda_text"]), np.log(lams), np.arange(len(lams)))
            ax.plot(position, [ns.index(n) for n in ev["n"]], "x", color="white", label="evidence (text)")
            fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    axes[0][0].legend(fontsize=6, loc="upper left", framealpha=0.5)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def run(settings: RunSettings) -> TaskResult:
    task: PriorGridSettings = settings.task
    structures = settings.posterior.structures
    if not structures:
        raise ConfigError("task=prior_grid needs a posterior structure (posterior=bayesvlm, kfac or diag)")
    ev = open_evaluation(settings)
    ctx, provenance = ev.ctx, ev.provenance
    labels, bins = ctx.labels, task.ece_bins
    map_scores = scores(ctx.logits(ctx.image).log_softmax(-1), labels, bins)
    variant = settings.posterior.evidence_variant
    rows = []
    for structure in structures:
        posts = ctx.posterior_provider(structure)
        for n in task.n_grid:
            for post in posts.values():
                post.n = n
            evidence = {
                t: post.optimize_prior_precision("evidence", variant=variant) for t, post in posts.items()
            }
            metrics = scores(bayes_log_probs(ctx, structure, ctx.image, posts), labels, bins)
            rows.append(
                {
                    "structure": structure,
                    "kind": EVIDENCE,
                    "n": n,
                    "lambda": math.nan,
                    "lambda_image": evidence["image"],
                    "lambda_text": evidence["text"],
                    **metrics,
                }
            )
            for lam in task.lambda_grid:
                for post in posts.values():
                    post.prior_precision = lam
                metrics = scores(bayes_log_probs(ctx, structure, ctx.image, posts), labels, bins)
                rows.append(
                    {
                        "structure": structure,
                        "kind": GRID,
                        "n": n,
                        "lambda": lam,
                        "lambda_image": lam,
                        "lambda_text": lam,
                        **metrics,
                    }
                )
        best = min((r for r in rows if r["structure"] == structure), key=lambda r: r["nll"])
        console.print(
            f"{structure}: lowest NLL {best['nll']:.4f} at n={best['n']:g}, lambda={best['lambda_image']:.3g} "
            f"({best['kind']}); MAP {map_scores['nll']:.4f}"
        )
    table = pd.DataFrame(rows)
    directory, stem = output_location(settings, STUDY)
    title = f"prior grid {settings.dataset.name} / {settings.model.name}"
    plot_heatmaps(table, map_scores, directory / f"{stem}.png", title)
    provenance.update(
        {
            "map": map_scores,
            "evidence_variant": variant,
            "columns": (
                "kind: grid (lambda the same on both towers) or evidence (each tower's lambda maximising its "
                "evidence at that n: lambda_image, lambda_text)"
            ),
        }
    )
    paths = write_study(table, directory, stem, title=title, settings=settings, provenance=provenance)
    return TaskResult(table, None, paths["record"])
