"""``task=zeroshot``: every configured method on the same cached features, scored and written."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from uqvlm.console import console
from uqvlm.data.augment import AugmentedView
from uqvlm.data.registry import build_zeroshot_dataset
from uqvlm.data.sections import PublishedFactorsSettings
from uqvlm.errors import DatasetFormatError, DataUnavailableError, UqvlmError
from uqvlm.extraction import encode_prompts
from uqvlm.methods import AdapterFit, BayesVLM, Method, ZeroShotContext
from uqvlm.metrics import METRIC_COLUMNS, evaluate_log_probs, negative_log_likelihood
from uqvlm.results import model_slug, record_path, write_results
from uqvlm.settings import RunSettings
from uqvlm.tasks.common import LoadedModel, RunDirs, TaskResult, extract_features, load_model, prepare_dirs
from uqvlm.tasks.hessian import ensure_hessian_data, fit_posteriors, on_device
from uqvlm.tasks.probvlm import CachedPairAdapters


def output_location(settings: RunSettings) -> tuple[Path, str]:
    return Path(settings.paths.results_dir) / "zeroshot" / settings.dataset.name, model_slug(settings.model)


def finished_record(settings: RunSettings) -> Path | None:
    """The run record of this exact config, if a previous run finished it."""
    path = record_path(*output_location(settings), settings.config)
    return path if path.exists() else None


def pair_data(settings: RunSettings):
    """The image-caption pairs ProbVLM trains on: ``task.pairs`` when set, else the run's Hessian data."""
    return settings.task.pairs if settings.task.pairs is not None else settings.hessian_data


def selected_methods(settings: RunSettings) -> dict[str, Method]:
    """The configured methods, minus BayesVLM rows whose structure the posterior config leaves out, and
    minus rows trained on image-caption pairs (ProbVLM) when there are none (published factors and no
    ``task.pairs``)."""
    structures = set(settings.task.fitted_structures(settings.posterior))
    no_pairs = isinstance(pair_data(settings), PublishedFactorsSettings)
    return {
        name: m
        for name, m in settings.task.methods.items()
        if (m.structure is None or m.structure in structures) and not (m.needs_pairs and no_pairs)
    }


def _features(dataset_name: str, model: LoadedModel, dirs: RunDirs, dataset, what: str):
    feats = extract_features(model, dirs, dataset, what)
    labels = feats["targets"]
    if int(labels.max()) >= len(dataset.classnames) or int(labels.min()) < 0:
        raise DatasetFormatError(
            f"dataset {dataset_name!r} ({what}) has labels in [{int(labels.min())}, {int(labels.max())}] "
            f"but {len(dataset.classnames)} class names"
        )
    return feats["image"], labels


def write_plots(log_probs: dict, labels, dataset, directory, stem: str, title: str, ece_bins: int) -> None:
    """Reliability diagrams, risk-coverage curves, and the most/least uncertain images of the first
    Bayesian method (else the last method)."""
    from uqvlm import plots

    plots.reliability_diagram(
        log_probs, labels, directory / f"{stem}_reliability.png", bins=ece_bins, title=title
    )
    plots.risk_coverage_curves(log_probs, labels, directory / f"{stem}_risk_coverage.png", title=title)
    name = next((m for m in log_probs if m.startswith("bayesvlm")), list(log_probs)[-1])
    plots.uncertain_examples(
        dataset,
        labels,
        log_probs[name],
        dataset.classnames,
        directory / f"{stem}_uncertain.png",
        title=f"{title}: {name}",
    )


def validation_nll(ctx: ZeroShotContext, methods: dict[str, Method]) -> float:
    """NLL on the validation split of the first BayesVLM method, with the prior it was run with."""
    bayes = [m for m in methods.values() if isinstance(m, BayesVLM)]
    if not bayes:
        raise UqvlmError("task.objective=val_nll needs a BayesVLM method (posterior=kfac or diag)")
    method = bayes[0]
    val_features, val_labels = ctx.validation
    log_probs = method.log_probs(ctx, val_features, ctx.posterior_provider(method.structure))
    return float(negative_log_likelihood(log_probs, val_labels))


def label_use(objective: str | None, method: Method) -> str | None:
    """Why a method's row depends on labels of the evaluated dataset (after it predicted), else None.

    Beside methods fitted on the validation split, a BayesVLM row whose settings a sweep selected by
    ``task.objective`` (e.g. experiment=prior_search: Optuna over lambda by the validation NLL) is one.
    """
    reasons = []
    if method.uses_labels:
        reasons.append("fitted on the labelled validation split")
    if objective and isinstance(method, BayesVLM):
        reasons.append(
            f"posterior settings chosen by a sweep minimising task.objective={objective} on the validation split"
        )
    return "; ".join(reasons) or None


def load_evaluation(
    settings: RunSettings, dirs: RunDirs, model: LoadedModel, dataset, device: torch.device | str = "cpu"
) -> tuple[ZeroShotContext, dict[str, Any]]:
    """The zero-shot context of ``dataset`` under this run's model (cached image and class text features,
    and providers of the validation split, augmented views and the posteriors, fitted from
    ``settings.hessian_data`` once per structure) and its provenance, which the providers fill in.

    The context's tensors (features, labels, posteriors) are on ``device``: the model's, for predictions
    made where the model lives; the CPU by default."""
    data = settings.dataset
    device = torch.device(device)
    image, labels = _features(data.name, model, dirs, dataset, f"{data.name} {dataset.split}")
    text = encode_prompts(
        model.vlm,
        dataset.prompts(),
        cache_dir=dirs.cache,
        model_id=model.identity,
        precision=model.precision,
    )

    def validation():
        split = data.val_split
        if not split:
            raise DatasetFormatError(
                f"dataset {data.name!r} has no val_split; methods fitted on labels need one "
                "(set dataset.val_split=... or drop them from task.methods)"
            )
        val = build_zeroshot_dataset(data.split(split))
        features, val_labels = _features(data.name, model, dirs, val, f"{data.name} {split}")
        return features.to(device), val_labels.to(device)

    def views(k: int):
        return [
            _features(
                data.name, model, dirs, AugmentedView(dataset, v, seed=settings.seed), f"tta view {v + 1}/{k}"
            )[0].to(device)
            for v in range(k)
        ]

    provenance: dict[str, Any] = {"dataset": dataset.fingerprint(), "model": model.identity, "posteriors": {}}

    @cache
    def posteriors(structure: str):
        posts, ident = fit_posteriors(settings.hessian_data, model, dirs, structure)
        provenance["posteriors"][structure] = ident
        return {tower: on_device(post, device) for tower, post in posts.items()}

    adapter_sources: dict[AdapterFit, CachedPairAdapters] = {}

    def probvlm_adapters(fit: AdapterFit) -> CachedPairAdapters:
        if fit not in adapter_sources:
            adapter_sources[fit] = CachedPairAdapters(pair_data(settings), model, dirs, fit)
            provenance["probvlm_pairs"] = pair_data(settings).name
        return adapter_sources[fit]

    ctx = ZeroShotContext(
        logit_scale=model.vlm.logit_scale,
        logit_bias=model.vlm.logit_bias,
        image=image.to(device),
        labels=labels.to(device),
        text=text.to(device),
        posterior=settings.posterior,
        validation_provider=validation,
        views_provider=views,
        posterior_provider=posteriors,
        probvlm_provider=probvlm_adapters,
    )
    return ctx, provenance


def load_dataset(settings: RunSettings):
    """The evaluated dataset of the run (before any model is loaded: a missing dataset is reported first)."""
    data = settings.dataset
    dataset = build_zeroshot_dataset(data.section)
    if len(dataset) == 0:
        raise DataUnavailableError(f"dataset {data.name!r} (split {dataset.split!r}) is empty")
    return dataset


def run(settings: RunSettings) -> TaskResult:
    task, data = settings.task, settings.dataset
    dirs = prepare_dirs(settings.paths)
    methods = selected_methods(settings)
    dataset = load_dataset(settings)
    model = load_model(settings, dirs)
    ensure_hessian_data(settings, model, dirs)
    # Features are cached on the CPU; the methods predict on the model's device, scores are taken on the CPU.
    ctx, provenance = load_evaluation(settings, dirs, model, dataset, model.device)
    labels = ctx.labels.cpu()
    ece_bins = task.ece_bins
    rows, log_probs, label_uses = [], {}, {}
    for name, method in methods.items():
        log_probs[name] = method.predict_log_probs(ctx).cpu()
        reason = label_use(task.objective, method)
        if reason:
            label_uses[name] = reason
        rows.append(
            {
                "method": name,
                **evaluate_log_probs(log_probs[name], labels, ece_bins),
                "uses_labels": reason is not None,
            }
        )
    table = pd.DataFrame(rows, columns=["method", *METRIC_COLUMNS, "n", "uses_labels"])
    provenance["notes"] = ctx.notes
    provenance["label_use"] = label_uses
    directory, stem = output_location(settings)
    title = f"zero-shot {data.name} / {settings.model.name}"
    objective = None
    if task.objective == "val_nll":
        provenance["objective"] = objective = validation_nll(ctx, methods)
        console.print(f"objective (validation NLL): {objective:.5f}")
    if task.plots:
        write_plots(log_probs, labels, dataset, directory, stem, title, ece_bins)
    # The record last: its presence means the run finished (a re-launched sweep skips it).
    paths = write_results(table, directory, stem, title=title, config=settings.config, provenance=provenance)
    for name, reason in label_uses.items():
        console.print(f"uses_labels ({data.name}) {name}: {reason}")
    return TaskResult(table, objective, paths["record"])
