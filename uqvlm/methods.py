"""Zero-shot prediction methods compared on the same cached features.

A method is one small class: ``predict_log_probs(ctx) -> log p [N, K]`` (float64, in log space so
a class the predictive all but rules out keeps its exact NLL). ``configs/task/zeroshot.yaml`` lists
them with ``_target_`` entries, so adding a method is a class here plus a line there.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch
from torch import Tensor

from uqvlm.features import Features
from uqvlm.laplace import KFACPosterior, grid_search_prior
from uqvlm.metrics import negative_log_likelihood
from uqvlm.probcosine import (
    mc_log_probs,
    probcosine,
    probcosine_rank1,
    probit_log_probs,
    probit_log_probs_rank1,
)
from uqvlm.validation import check_choice

if TYPE_CHECKING:
    from uqvlm.settings import PosteriorSettings

# The BayesVLM predictive of the logits' Gaussian: probit approximation or Monte Carlo samples.
Predictive = Literal["probit", "mc"]
PREDICTIVES: tuple[str, ...] = get_args(Predictive)
# ``posterior.prior_precision`` beside a number: the evidence optimum, or a validation-NLL grid search.
PriorPrecisionMode = Literal["evidence", "grid"]
PRIOR_PRECISION_MODES: tuple[str, ...] = get_args(PriorPrecisionMode)


def cosine_logits(img: Tensor, txt: Tensor, logit_scale: float, logit_bias: float | None) -> Tensor:
    """exp(logit_scale) * cosine similarity (+ logit_bias) between every image and class embedding."""
    normalize = torch.nn.functional.normalize
    cos = normalize(img.double(), dim=-1) @ normalize(txt.double(), dim=-1).T
    return math.exp(logit_scale) * cos + (logit_bias or 0.0)


@dataclass
class ZeroShotContext:
    """What methods may use. Expensive inputs (validation features, augmented views, posteriors) are
    computed on first use by the providers the task supplies, and only for methods that need them."""

    logit_scale: float
    logit_bias: float | None
    image: Features
    labels: Tensor
    text: Features
    posterior: PosteriorSettings | None  # n and the prior precision of BayesVLM's posteriors
    validation_provider: Callable[[], tuple[Features, Tensor]]
    views_provider: Callable[[int], list[Features]]
    posterior_provider: Callable[[str], dict[str, Any]]
    notes: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def validation(self) -> tuple[Features, Tensor]:
        return self.validation_provider()

    def logits(self, image: Features) -> Tensor:
        return cosine_logits(image.embeddings, self.text.embeddings, self.logit_scale, self.logit_bias)


class Method(ABC):
    """A zero-shot predictive. ``uses_labels``: fitted on labelled data of the evaluated dataset."""

    uses_labels: bool = False
    structure: str | None = None

    @abstractmethod
    def predict_log_probs(self, ctx: ZeroShotContext) -> Tensor:
        """log p(class | test image) [N, K], float64."""


class MAP(Method):
    """The deterministic model: softmax of the scaled cosine logits."""

    def predict_log_probs(self, ctx: ZeroShotContext) -> Tensor:
        return ctx.logits(ctx.image).log_softmax(-1)


class Temperature(Method):
    """Temperature scaling: one T fitted by NLL on the labelled validation split."""

    uses_labels = True

    def predict_log_probs(self, ctx: ZeroShotContext) -> Tensor:
        val_features, val_labels = ctx.validation
        t = fit_temperature(ctx.logits(val_features), val_labels)
        ctx.notes["temperature"] = t
        return (ctx.logits(ctx.image) / t).log_softmax(-1)


def fit_temperature(logits: Tensor, labels: Tensor) -> float:
    """argmin_T NLL(softmax(logits / T)), by L-BFGS on log T (the NLL is convex in 1/T)."""
    log_t = torch.zeros((), dtype=torch.float64, device=logits.device, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    logits = logits.double()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


class TTA(Method):
    """Test-time augmentation: softmax probabilities averaged over ``views`` augmented copies."""

    def __init__(self, views: int = 8):
        if views < 1:
            raise ValueError(f"tta views must be >= 1, got {views}")
        self.views = views

    def predict_log_probs(self, ctx: ZeroShotContext) -> Tensor:
        views = ctx.views_provider(self.views)
        # log of the mean of the views' softmaxes, in log space.
        log_probs = torch.stack([ctx.logits(v).log_softmax(-1) for v in views])
        return log_probs.logsumexp(0) - math.log(len(views))


def _rank_one(post: Any) -> bool:
    """Whether the posterior's embedding variances are rank one (KFAC's ``variance_factors``)."""
    return hasattr(post, "variance_factors")


class BayesVLM(Method):
    """BayesVLM: last-layer Laplace posteriors -> embedding variances -> ProbCosine -> predictive."""

    def __init__(
        self,
        structure: str = KFACPosterior.structure,
        predictive: Predictive = "probit",
        samples: int = 1000,
        seed: int = 0,
    ):
        check_choice("predictive", predictive, PREDICTIVES)
        self.structure, self.predictive, self.samples, self.seed = structure, predictive, samples, seed

    def logit_moments(
        self, ctx: ZeroShotContext, image: Features, posts: dict[str, Any]
    ) -> tuple[Tensor, Tensor]:
        img_post, txt_post = posts["image"], posts["text"]
        img_mean, txt_mean = image.embeddings.double(), ctx.text.embeddings.double()
        if _rank_one(img_post) and _rank_one(txt_post):
            # KFAC: rank-one variances, so the predictive costs about one extra pass over [N, K].
            c, b = img_post.variance_factors(image.activations)
            e, f = txt_post.variance_factors(ctx.text.activations)
            mean_cos, var_cos = probcosine_rank1(img_mean, c, b, txt_mean, e, f)
        else:
            img_var = img_post.embedding_variance(image.activations)
            txt_var = txt_post.embedding_variance(ctx.text.activations)
            mean_cos, var_cos = probcosine(img_mean, img_var, txt_mean, txt_var)
        scale = math.exp(ctx.logit_scale)
        return mean_cos.mul_(scale).add_(ctx.logit_bias or 0.0), var_cos.mul_(scale**2)

    def log_probs(self, ctx: ZeroShotContext, image: Features, posts: dict[str, Any]) -> Tensor:
        """log of the predictive [N, K] of ``image``, float64."""
        img_post, txt_post = posts["image"], posts["text"]
        if self.predictive == "probit" and _rank_one(img_post) and _rank_one(txt_post):
            # KFAC: the probit predictive fused over row chunks, never an [N, K] moment in memory.
            c, b = img_post.variance_factors(image.activations)
            e, f = txt_post.variance_factors(ctx.text.activations)
            # float64 throughout (c, b, e, f are): the embeddings are converted block by block inside.
            return probit_log_probs_rank1(
                image.embeddings,
                c,
                b,
                ctx.text.embeddings,
                e,
                f,
                ctx.logit_scale,
                ctx.logit_bias,
            )
        mean, var = self.logit_moments(ctx, image, posts)
        if self.predictive == "mc":
            return mc_log_probs(
                mean, var, samples=self.samples, generator=torch.Generator().manual_seed(self.seed)
            )
        return probit_log_probs(mean, var).double()

    def predict_log_probs(self, ctx: ZeroShotContext) -> Tensor:
        posts = ctx.posterior_provider(self.structure)
        self.configure_prior(ctx, posts)
        return self.log_probs(ctx, ctx.image, posts)

    def configure_prior(self, ctx: ZeroShotContext, posts: dict[str, Any]) -> None:
        """Set n and lambda on both towers: a number, the evidence optimum, or a validation-NLL grid."""
        settings = ctx.posterior
        if settings is None:
            raise ValueError("BayesVLM needs the posterior settings (ZeroShotContext.posterior)")
        lam = settings.prior_precision
        for post in posts.values():
            post.n = settings.n
        if lam == "evidence":
            for post in posts.values():
                post.optimize_prior_precision(method="evidence", variant=settings.evidence_variant)
        elif lam == "grid":
            self.uses_labels = True
            val_features, val_labels = ctx.validation

            def val_nll(x: float) -> float:
                for post in posts.values():
                    post.prior_precision = x
                return float(negative_log_likelihood(self.log_probs(ctx, val_features, posts), val_labels))

            best = grid_search_prior(val_nll, [10.0 ** (e / 2) for e in range(-4, 17)])
            for post in posts.values():
                post.prior_precision = best
        else:
            for post in posts.values():
                post.prior_precision = lam
        ctx.notes[f"prior_precision/{self.structure}"] = {t: p.prior_precision for t, p in posts.items()}
