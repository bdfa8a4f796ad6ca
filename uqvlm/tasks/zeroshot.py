"""``task=zeroshot``: MAP and BayesVLM predictions on cached features, scored and written as a table."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from uqvlm.console import console
from uqvlm.extraction import encode_prompts, extract
from uqvlm.features import Features
from uqvlm.metrics import evaluate_probs
from uqvlm.results import model_slug, write_results
from uqvlm.tasks.common import load_model, prepare_dirs
from uqvlm.tasks.hessian import fit_posteriors


def map_logits(img: Tensor, txt: Tensor, logit_scale: float, logit_bias: float | None) -> Tensor:
    """exp(logit_scale) * cosine similarity (+ logit_bias) between every image and class embedding."""
    cos = torch.nn.functional.normalize(img.double(), dim=-1) @ torch.nn.functional.normalize(txt.double(), dim=-1).T
    return math.exp(logit_scale) * cos + (logit_bias or 0.0)


def bayes_probs(
    img: Features, txt: Features, img_post, txt_post, vlm, posterior_cfg: DictConfig
) -> Tensor:
    """BayesVLM predictive: embedding variances -> ProbCosine -> probit (or Monte Carlo) softmax."""
    from uqvlm.probcosine import mc_probs, probcosine, probit_probs

    img_var = img_post.embedding_variance(img.activations)
    txt_var = txt_post.embedding_variance(txt.activations)
    mean_cos, var_cos = probcosine(img.embeddings.double(), img_var, txt.embeddings.double(), txt_var)
    scale = math.exp(vlm.logit_scale)
    mean, var = scale * mean_cos + (vlm.logit_bias or 0.0), scale**2 * var_cos
    if posterior_cfg.predictive == "mc":
        return mc_probs(mean, var, samples=int(posterior_cfg.mc_samples),
                        generator=torch.Generator().manual_seed(0))
    if posterior_cfg.predictive != "probit":
        raise ValueError(f"posterior.predictive must be 'probit' or 'mc', got {posterior_cfg.predictive!r}")
    return probit_probs(mean, var)


def configure_prior(posts: dict[str, Any], posterior_cfg: DictConfig) -> dict[str, float]:
    """Set n and the prior precision of each tower's posterior; returns the lambdas chosen."""
    chosen = {}
    for tower, post in posts.items():
        post.n = float(posterior_cfg.n)
        lam = posterior_cfg.prior_precision
        if isinstance(lam, str):
            if lam != "evidence":
                raise ValueError(f"posterior.prior_precision must be a positive number or 'evidence', got {lam!r}")
            post.optimize_prior_precision(method="evidence", variant=posterior_cfg.evidence_variant)
        else:
            post.prior_precision = float(lam)
        chosen[tower] = float(post.prior_precision)
    return chosen


def run(cfg: DictConfig) -> pd.DataFrame:
    from uqvlm.data.registry import build_zeroshot_dataset

    dirs = prepare_dirs(cfg)
    model = load_model(cfg, dirs)
    vlm = model.vlm
    dataset = build_zeroshot_dataset(cfg.dataset)
    feats = extract(
        vlm, dataset, cache_dir=dirs.cache, model_id=model.identity, dataset_id=dataset.fingerprint(),
        batch_size=model.batch_size, device=cfg.device, precision=model.precision,
        description=f"{cfg.dataset.name} {dataset.split}",
    )
    img, labels = feats["image"], feats["targets"]
    if int(labels.max()) >= len(dataset.classnames):
        from uqvlm.errors import DatasetFormatError

        raise DatasetFormatError(
            f"dataset {cfg.dataset.name!r} has label {int(labels.max())} but only "
            f"{len(dataset.classnames)} class names"
        )
    txt = encode_prompts(vlm, dataset.prompts(), cache_dir=dirs.cache, model_id=model.identity,
                         device=cfg.device, precision=model.precision)

    ece_bins = int(cfg.task.ece_bins)
    logits = map_logits(img.embeddings, txt.embeddings, vlm.logit_scale, vlm.logit_bias)
    rows = [{"method": "map", **evaluate_probs(logits.softmax(-1), labels, ece_bins)}]
    provenance: dict[str, Any] = {"features": dataset.fingerprint(), "model": model.identity}
    for structure in cfg.posterior.structures:
        posts, ident = fit_posteriors(cfg, model, dirs, structure)
        lambdas = configure_prior(posts, cfg.posterior)
        probs = bayes_probs(img, txt, posts["image"], posts["text"], vlm, cfg.posterior)
        rows.append({"method": f"bayesvlm-{structure}", **evaluate_probs(probs, labels, ece_bins)})
        provenance[f"bayesvlm-{structure}"] = {"posterior": ident, "prior_precision": lambdas,
                                               "n": float(cfg.posterior.n)}

    table = pd.DataFrame(rows, columns=["method", "acc", "nll", "ece", "n"])
    write_results(
        table,
        dirs.results / "zeroshot" / cfg.dataset.name,
        model_slug(cfg.model),
        title=f"zero-shot {cfg.dataset.name} / {cfg.model.name}",
        extra={"config": OmegaConf.to_container(cfg, resolve=True), "provenance": provenance},
    )
    return table
