"""``task=corruption``: the evaluated dataset under the published additive Gaussian pixel noise (paper
Fig. 5: the true-class mean similarity falls and its variance rises with the noise).

Per noise std of ``task.levels`` the images get the published ``AddGaussianNoise`` between ToTensor and
Normalize (:mod:`uqvlm.studies.corruption`, seeded per image by the run's seed, the same draw scaled at
every level), their features are extracted (cached per level), and the posterior of ``task.structure``
(fitted once, n and lambda as the run's posterior settings say) gives per image the ProbCosine mean and
variance of the similarity with its true class; MAP and BayesVLM are scored (acc, NLL, ECE) on the same
features. std 0 is the clean dataset (the noise of std 0 is the identity).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from uqvlm.console import console
from uqvlm.settings import CorruptionSettings, RunSettings
from uqvlm.studies.corruption import (
    CorruptedView,
    corrupted_preprocess,
    plot_metrics_vs_noise,
    plot_similarity_vs_noise,
    similarity_stats,
)
from uqvlm.tasks.common import TaskResult, extract_features
from uqvlm.tasks.study import (
    bayes_log_probs,
    finished_at,
    open_evaluation,
    output_location,
    scores,
    set_prior,
    write_study,
)

STUDY = "corruption"


def finished_record(settings: RunSettings) -> Path | None:
    return finished_at(*output_location(settings, STUDY), settings)


def embedding_variances(post: Any, activations) -> Any:
    """What :func:`uqvlm.studies.corruption.true_class_similarity` takes: the KFAC rank-one pair
    (scale [N], direction [D]) where the posterior has one, else the [N, D] diagonal variances."""
    if hasattr(post, "variance_factors"):
        return post.variance_factors(activations)
    return post.embedding_variance(activations)


def run(settings: RunSettings) -> TaskResult:
    task: CorruptionSettings = settings.task
    ev = open_evaluation(settings)
    dirs, dataset, model, ctx, provenance = ev.dirs, ev.dataset, ev.model, ev.ctx, ev.provenance
    posts = ctx.posterior_provider(task.structure)
    lambdas = set_prior(ctx, task.structure, posts)
    txt_var = embedding_variances(posts["text"], ctx.text.activations)
    vlm = model.vlm
    clean_preprocess = vlm.preprocess
    vlm.preprocess = corrupted_preprocess(clean_preprocess)
    rows, metric_rows = [], []
    try:
        for std in task.levels:
            if std == 0:
                image, labels = ctx.image, ctx.labels
            else:
                view = CorruptedView(dataset, std, seed=settings.seed)
                feats = extract_features(model, dirs, view, f"{settings.dataset.name} noise std {std:g}")
                image, labels = feats["image"], feats["targets"]
            stats = similarity_stats(
                std,
                image.embeddings,
                embedding_variances(posts["image"], image.activations),
                ctx.text.embeddings,
                txt_var,
                labels,
            )
            map_scores = scores(ctx.logits(image).log_softmax(-1), labels, task.ece_bins)
            bayes = scores(
                bayes_log_probs(ctx, task.structure, image, posts),
                labels,
                task.ece_bins,
            )
            rows.append(
                {
                    **stats,
                    **{f"map_{k}": v for k, v in map_scores.items()},
                    **{f"bayesvlm_{k}": v for k, v in bayes.items()},
                }
            )
            metric_rows += [
                {"std": std, "method": "map", **map_scores},
                {"std": std, "method": f"bayesvlm-{task.structure}", **bayes},
            ]
            console.print(
                f"std {std:g}: true-class cosine mean {stats['mean_similarity']:.4f}, variance "
                f"{stats['similarity_variance']:.3g}; acc MAP {map_scores['acc']:.3f} / BayesVLM {bayes['acc']:.3f}"
            )
    finally:
        vlm.preprocess = clean_preprocess
    table = pd.DataFrame(rows)
    directory, stem = output_location(settings, STUDY)
    title = f"corruption {settings.dataset.name} / {settings.model.name}"
    plot_similarity_vs_noise(rows, directory / f"{stem}_similarity.png", title=title)
    plot_metrics_vs_noise(metric_rows, directory / f"{stem}_metrics.png", title=title)
    provenance.update(
        {
            "structure": task.structure,
            "prior_precision": lambdas,
            "n": settings.posterior.n,
            "noise_seed": settings.seed,
            "columns": (
                "std: pixel noise on [0, 1] images before Normalize; mean_similarity / similarity_variance: "
                "mean over images of the ProbCosine E[cos] / Var[cos] with the true class (_sd: their sd "
                "over images); map_similarity: mean cosine of the mean embeddings; map_* / bayesvlm_*: "
                "acc, NLL, ECE of the two predictives"
            ),
        }
    )
    paths = write_study(table, directory, stem, title=title, settings=settings, provenance=provenance)
    return TaskResult(table, None, paths["record"])
