"""``task=uncertainty_error``: does predictive uncertainty track error, before and after active learning
(paper Fig. 2)?

The active-learning setup of ``task.data`` (pool, target test and val splits): the zero-shot BayesVLM
predictive on the target test split, and the predictive after fine-tuning the image last layer on each
strategy's selection of the largest budget (first seed) exactly as ``task=active_learning`` does (posterior
centred at the fine-tuned weights, same covariance). Per predictive the test images are cut into
``task.bins`` equal-mass bins of uncertainty (:mod:`uqvlm.studies.uncertainty_error`), each with its
error rate; one figure shows all curves.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from uqvlm.active.curves import ZERO_SHOT
from uqvlm.active.finetune import embed
from uqvlm.active.strategies import select
from uqvlm.console import console
from uqvlm.features import Features
from uqvlm.results import model_slug
from uqvlm.settings import RunSettings, UncertaintyErrorSettings
from uqvlm.studies.uncertainty_error import error_by_uncertainty, plot_uncertainty_error
from uqvlm.tasks.active_learning import Evaluator, dataset_slug, prepare
from uqvlm.tasks.common import TaskResult, prepare_dirs
from uqvlm.tasks.study import finished_at, scores, write_study

STUDY = "uncertainty_error"
XLABELS = {"entropy": "predictive entropy (nats)", "one_minus_max": "1 - max probability"}


def output_location(settings: RunSettings) -> tuple[Path, str]:
    task: UncertaintyErrorSettings = settings.task
    return Path(settings.paths.results_dir) / STUDY / dataset_slug(task.data), model_slug(settings.model)


def finished_record(settings: RunSettings) -> Path | None:
    return finished_at(*output_location(settings), settings)


def run(settings: RunSettings) -> TaskResult:
    task: UncertaintyErrorSettings = settings.task
    dirs = prepare_dirs(settings.paths)
    study = prepare(settings, dirs)  # the active-learning task's model, domains, text, posteriors, problem
    data, posts, post_ident = study.data, study.posts, study.post_ident
    budget, seed = task.budgets[-1], task.seeds[0]
    # The active-learning task's BayesVLM predictive on the target (n and lambda set as in zero-shot).
    evaluator = Evaluator(settings, data, study.text, study.model.vlm, posts)
    method, ctx = evaluator.method, evaluator.ctx
    labels = data.target_labels
    log_probs = {ZERO_SHOT: method.log_probs(ctx, data.target, posts)}
    for strategy in task.strategies:
        sel = select(study.problem, strategy, budget, seed, task.acquisition())
        result = study.finetune(sel.indices[:budget], task.finetune, seed, strategy)
        tuned = Features(data.target.activations, embed(result.layer, data.target))
        log_probs[f"{strategy} ({budget})"] = method.log_probs(ctx, tuned, posts)
        console.print(f"{strategy}: fine-tuned on {budget} pool images, best epoch {result.best_epoch}")
    rows, curves, summary = [], {}, {}
    for name, lp in log_probs.items():
        curve = error_by_uncertainty(lp, labels, bins=min(task.bins, labels.numel()), kind=task.uncertainty)
        curves[name] = curve
        summary[name] = scores(lp, labels, task.ece_bins)
        for b in range(curve["count"].numel()):
            rows.append(
                {
                    "predictive": name,
                    "bin": b,
                    "uncertainty": float(curve["uncertainty"][b]),
                    "lower": float(curve["lower"][b]),
                    "upper": float(curve["upper"][b]),
                    "error_rate": float(curve["error_rate"][b]),
                    "count": int(curve["count"][b]),
                    **summary[name],
                }
            )
        console.print(
            f"{name}: acc {summary[name]['acc']:.3f}, NLL {summary[name]['nll']:.3f}; error rate "
            f"{float(curve['error_rate'][0]):.2f} in the least and {float(curve['error_rate'][-1]):.2f} in the "
            "most uncertain bin"
        )
    table = pd.DataFrame(rows)
    directory, stem = output_location(settings)
    title = f"uncertainty vs error {dataset_slug(task.data)} / {settings.model.name}"
    plot_uncertainty_error(curves, directory / f"{stem}.png", xlabel=XLABELS[task.uncertainty], title=title)
    provenance = {
        "model": study.model.identity,
        "posterior": post_ident,
        "prior_precision": {t: p.prior_precision for t, p in posts.items()},
        "budget": budget,
        "seed": seed,
        "columns": (
            "predictive: the zero-shot BayesVLM predictive, or after fine-tuning the image last layer on a "
            "strategy's selection of `budget` pool images; bins of equal mass by uncertainty (lowest first): "
            "mean / lower / upper uncertainty, error rate of the arg max, count; acc / nll / ece: of the "
            "predictive on the whole target test split"
        ),
    }
    paths = write_study(table, directory, stem, title=title, settings=settings, provenance=provenance)
    return TaskResult(table, None, paths["record"])
