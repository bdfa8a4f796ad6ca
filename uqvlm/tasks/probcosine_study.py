"""``task=probcosine_study``: how accurate is ProbCosine? Its closed-form mean and variance of the cosine,
and the Gaussian the predictive assumes, against Monte Carlo draws of the embeddings, over posterior
widths (the pseudo-data count n; lambda stays as the run's posterior settings chose it at their n).

Pairs: the first ``task.pairs`` test images, each with its true class and with one other class drawn
from a seeded generator. Per width and kind of pair (true, other, all) the table gives the mean and
largest |E_MC - E_analytic| (and in units of its Monte Carlo standard error), the mean relative error of
the variance, and the mean Wasserstein-1 distance between the Monte Carlo law and N(E, Var), absolute
and standardised (:func:`uqvlm.studies.probcosine_accuracy.compare`). Density figures (histogram vs the
analytic Gaussian) show ``task.density_pairs`` pairs at each width of ``task.density_widths``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from uqvlm.console import console
from uqvlm.probcosine import probcosine
from uqvlm.settings import ProbCosineStudySettings, RunSettings
from uqvlm.studies.probcosine_accuracy import compare, mc_cosine_samples, plot_densities, pseudo_data_count
from uqvlm.tasks.common import TaskResult
from uqvlm.tasks.study import finished_at, open_evaluation, output_location, set_prior, write_study

STUDY = "probcosine"


def finished_record(settings: RunSettings) -> Path | None:
    return finished_at(*output_location(settings, STUDY), settings)


def pair_indices(labels: torch.Tensor, classes: int, pairs: int, seed: int) -> dict[str, torch.Tensor]:
    """Image and class indices of the pairs: the first ``pairs`` images with their true class, and the
    same images with another class each, drawn uniformly from the other K - 1 by a seeded generator."""
    images = torch.arange(min(pairs, labels.numel()))
    true = labels[images].long().cpu()
    if classes < 2:
        return {"image": images, "true": true}
    shift = torch.randint(1, classes, (images.numel(),), generator=torch.Generator().manual_seed(seed))
    return {"image": images, "true": true, "other": (true + shift) % classes}


def run(settings: RunSettings) -> TaskResult:
    task: ProbCosineStudySettings = settings.task
    ev = open_evaluation(settings)
    dataset, ctx, provenance = ev.dataset, ev.ctx, ev.provenance
    posts = ctx.posterior_provider(task.structure)
    lambdas = set_prior(ctx, task.structure, posts)
    idx = pair_indices(ctx.labels, len(dataset.classnames), task.pairs, settings.seed)
    kinds = [k for k in ("true", "other") if k in idx]
    image_rows = idx["image"].repeat(len(kinds))
    class_rows = torch.cat([idx[k] for k in kinds])
    kind_of = [k for k in kinds for _ in range(idx["image"].numel())]
    act_g, mu_g = ctx.image.activations[image_rows], ctx.image.embeddings[image_rows].double()
    act_h, mu_h = ctx.text.activations[class_rows], ctx.text.embeddings[class_rows].double()
    directory, stem = output_location(settings, STUDY)

    def variances(n: float) -> tuple[torch.Tensor, torch.Tensor]:
        with pseudo_data_count(list(posts.values()), n):
            return (
                posts["image"].embedding_variance(act_g).double(),
                posts["text"].embedding_variance(act_h).double(),
            )

    is_true = torch.tensor([k == "true" for k in kind_of], device=mu_g.device)
    subsets = {"all": torch.ones_like(is_true), "true": is_true, "other": ~is_true}
    rows = []
    for n in task.widths:
        var_g, var_h = variances(n)
        gen = torch.Generator(device=mu_g.device).manual_seed(settings.seed)
        result = compare(mu_g, var_g, mu_h, var_h, samples=task.samples, generator=gen)
        for name in ("all", *kinds):
            sel = subsets[name]
            err = result["mean_error"][sel].abs()
            rows.append(
                {
                    "n": n,
                    "kind": name,
                    "pairs": int(sel.sum()),
                    "cosine_sd": float(result["mc_var"][sel].sqrt().mean()),
                    "mean_abs_error": float(err.mean()),
                    "max_abs_error": float(err.max()),
                    "mean_error_in_se": float((err / result["mean_se"][sel]).mean()),
                    "var_rel_error": float(result["var_rel_error"][sel].mean()),
                    "w1": float(result["w1"][sel].mean()),
                    "w1_rel": float(result["w1_rel"][sel].mean()),
                }
            )
        every = rows[-1 - len(kinds)]
        console.print(
            f"n={n:g}: |mean error| {every['mean_abs_error']:.2e} ({every['mean_error_in_se']:.2f} MC s.e.), "
            f"variance rel. error {every['var_rel_error']:.3f}, W1/sd {every['w1_rel']:.3f}"
        )
    # The density figures: about half true-class pairs, half other-class pairs.
    per_kind = idx["image"].numel()
    shown = list(range(min(per_kind, -(-task.density_pairs // 2))))
    if "other" in kinds:
        shown += [per_kind + i for i in range(min(per_kind, task.density_pairs - len(shown)))]
    shown_rows = torch.tensor(shown)
    labels = [
        f"image {int(image_rows[i])} / {dataset.classnames[int(class_rows[i])]} ({kind_of[i]})" for i in shown
    ]
    figures = []
    for n in task.density_widths:
        var_g, var_h = variances(n)
        g, vg, h, vh = mu_g[shown_rows], var_g[shown_rows], mu_h[shown_rows], var_h[shown_rows]
        gen = torch.Generator(device=mu_g.device).manual_seed(settings.seed)
        draws = mc_cosine_samples(g, vg, h, vh, task.samples, gen)
        mean, var = probcosine(g, vg, h, vh)
        path = directory / f"{stem}_densities_n{n:g}.png"
        title = f"ProbCosine vs Monte Carlo, n={n:g}"
        plot_densities(draws, mean.diagonal(), var.diagonal(), path, labels=labels, title=title)
        figures.append(path.name)
    table = pd.DataFrame(rows)
    provenance.update(
        {
            "structure": task.structure,
            "prior_precision": lambdas,
            "samples": task.samples,
            "figures": figures,
            "columns": (
                "n: pseudo-data count (smaller = wider posterior); kind: true-class pairs, other-class pairs, "
                "all; cosine_sd: Monte Carlo sd of the cosine; mean_abs_error / max_abs_error: |E_MC - "
                "E_ProbCosine|; mean_error_in_se: the same in Monte Carlo standard errors; var_rel_error: "
                "|Var_ProbCosine - Var_MC| / Var_MC; w1: Wasserstein-1 between the MC law and N(E, Var); "
                "w1_rel: w1 / MC sd"
            ),
        }
    )
    title = f"ProbCosine vs Monte Carlo {settings.dataset.name} / {settings.model.name}"
    paths = write_study(table, directory, stem, title=title, settings=settings, provenance=provenance)
    return TaskResult(table, None, paths["record"])
