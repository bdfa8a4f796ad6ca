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
import torch

from uqvlm.active.curves import ZERO_SHOT
from uqvlm.active.domains import DomainData, build_domain_data
from uqvlm.active.finetune import embed, finetune_image_layer
from uqvlm.active.strategies import ActiveProblem, make_generator, select
from uqvlm.console import console
from uqvlm.errors import UqvlmError
from uqvlm.extraction import encode_prompts
from uqvlm.features import Features
from uqvlm.methods import BayesVLM, ZeroShotContext
from uqvlm.results import model_slug
from uqvlm.settings import RunSettings, UncertaintyErrorSettings
from uqvlm.studies.uncertainty_error import error_by_uncertainty, plot_uncertainty_error
from uqvlm.tasks.active_learning import dataset_slug
from uqvlm.tasks.common import LoadedModel, RunDirs, TaskResult, extract_features, load_model, prepare_dirs
from uqvlm.tasks.hessian import fit_posteriors
from uqvlm.tasks.study import finished_at, scores, write_study

STUDY = "uncertainty_error"
XLABELS = {"entropy": "predictive entropy (nats)", "one_minus_max": "1 - max probability"}


def output_location(settings: RunSettings) -> tuple[Path, str]:
    task: UncertaintyErrorSettings = settings.task
    return Path(settings.paths.results_dir) / STUDY / dataset_slug(task.data), model_slug(settings.model)


def finished_record(settings: RunSettings) -> Path | None:
    return finished_at(*output_location(settings), settings)


def _load_data(task: UncertaintyErrorSettings, model: LoadedModel, dirs: RunDirs) -> DomainData:
    def extractor(ds, what: str) -> tuple[Features, torch.Tensor]:
        feats = extract_features(model, dirs, ds, what)
        return feats["image"], feats["targets"]

    return build_domain_data(task.data.section, extractor)


def _no_views(_k: int) -> list[Features]:
    raise UqvlmError("the uncertainty-vs-error study has no augmented views")


def run(settings: RunSettings) -> TaskResult:
    task: UncertaintyErrorSettings = settings.task
    dirs = prepare_dirs(settings.paths)
    model = load_model(settings, dirs)
    vlm = model.vlm
    data = _load_data(task, model, dirs)
    budget, seed = task.budgets[-1], task.seeds[0]
    if budget > len(data.pool):
        raise UqvlmError(f"budget {budget} exceeds the pool of {len(data.pool)} images")
    prompts = [[t.format(c=c) for t in data.templates] for c in data.classnames]
    text = encode_prompts(
        vlm, prompts, cache_dir=dirs.cache, model_id=model.identity, precision=model.precision
    )
    posts, post_ident = fit_posteriors(settings.hessian_data, model, dirs, task.structure)
    method = BayesVLM(
        structure=task.structure, predictive=task.predictive, samples=task.mc_samples, seed=settings.seed
    )
    ctx = ZeroShotContext(
        logit_scale=vlm.logit_scale,
        logit_bias=vlm.logit_bias,
        image=data.target,
        labels=data.target_labels,
        text=text,
        posterior=settings.posterior,
        validation_provider=lambda: (data.val, data.val_labels),
        views_provider=_no_views,
        posterior_provider=lambda _structure: posts,
    )
    method.configure_prior(ctx, posts)  # n and lambda on both towers, as in zero-shot
    labels = data.target_labels
    log_probs = {ZERO_SHOT: method.log_probs(ctx, data.target, posts)}
    problem = ActiveProblem(
        data.pool, data.target, text, vlm.logit_scale, vlm.logit_bias, posts["image"], posts["text"]
    )
    map_layer = posts["image"].last_layer
    for strategy in task.strategies:
        sel = select(problem, strategy, budget, seed, task.acquisition())
        idx = sel.indices[:budget]
        result = finetune_image_layer(
            map_layer,
            Features(
                data.pool.activations[idx],
                data.pool.embeddings[idx],
                None if data.pool.residuals is None else data.pool.residuals[idx],
            ),
            data.pool_labels[idx],
            data.val,
            data.val_labels,
            text.embeddings,
            vlm.logit_scale,
            vlm.logit_bias,
            task.finetune,
            make_generator(seed, "finetune", strategy, str(budget)),
        )
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
        "model": model.identity,
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
