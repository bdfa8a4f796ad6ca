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
from typing import TYPE_CHECKING, Any, Literal, Protocol, get_args

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
from uqvlm.probvlm import (
    ProbVLMAdapters,
    pair_retrieval_nll,
    probvlm_log_probs_mc,
    probvlm_log_probs_probit,
)
from uqvlm.validation import check_choice, check_positive, check_positive_int

if TYPE_CHECKING:
    from uqvlm.settings import PosteriorSettings

# The BayesVLM predictive of the logits' Gaussian: probit approximation or Monte Carlo samples.
Predictive = Literal["probit", "mc"]
PREDICTIVES: tuple[str, ...] = get_args(Predictive)
# ``posterior.prior_precision`` beside a number: the evidence optimum, or a validation-NLL grid search.
PriorPrecisionMode = Literal["evidence", "grid"]
PRIOR_PRECISION_MODES: tuple[str, ...] = get_args(PriorPrecisionMode)
# How ProbVLM's cross-modal weight is chosen from a grid: held-out image-caption pairs (label-free), or
# the validation NLL of the evaluated dataset (uses its labels).
ProbVLMSelection = Literal["pairs", "val"]
PROBVLM_SELECTIONS: tuple[str, ...] = get_args(ProbVLMSelection)


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
    # ProbVLM's adapters, trained on the Hessian data's image-caption pairs (tasks.probvlm).
    probvlm_provider: Callable[[AdapterFit], PairAdapters] | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def validation(self) -> tuple[Features, Tensor]:
        return self.validation_provider()

    def logits(self, image: Features) -> Tensor:
        return cosine_logits(image.embeddings, self.text.embeddings, self.logit_scale, self.logit_bias)


class Method(ABC):
    """A zero-shot predictive. ``uses_labels``: fitted on labelled data of the evaluated dataset;
    ``needs_pairs``: trained on the Hessian data's image-caption pairs (which published factors lack)."""

    uses_labels: bool = False
    needs_pairs: bool = False
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
                mean, var, samples=self.samples, generator=torch.Generator(mean.device).manual_seed(self.seed)
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


@dataclass(frozen=True)
class AdapterFit:
    """How ProbVLM's adapters are trained, every setting but the cross-modal weight (see
    :func:`uqvlm.probvlm.fit_probvlm`); ``holdout``: the fraction of the pairs held out to choose the
    weight, drawn by ``seed``, which also seeds the fits."""

    hidden: int = 64
    layers: int = 3
    dropout: float = 0.1
    lr: float = 2e-3
    epochs: int = 20
    batch_size: int = 256
    holdout: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "epochs", "batch_size"):
            check_positive_int(name, getattr(self, name))
        check_positive("lr", self.lr)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be a fraction in (0, 1), got {self.holdout!r}")


class PairAdapters(Protocol):
    """ProbVLM adapters of one :class:`AdapterFit` on the run's image-caption pairs (the task caches them)."""

    def fit(self, cross_modal: float, subset: Literal["train", "all"]) -> ProbVLMAdapters:
        """Adapters trained with ``cross_modal`` on all pairs, or on the pairs not held out."""
        ...

    def heldout(self) -> tuple[Tensor, Tensor]:
        """The held-out pairs' image and text embeddings [M, D] each."""
        ...


class ProbVLM(Method):
    """ProbVLM-style probabilistic embeddings (Upadhyay et al. 2023; :mod:`uqvlm.probvlm`): a small adapter
    per tower, trained post hoc on the Hessian data's image-caption pairs (no class labels), gives every
    image and class-prompt embedding a per-coordinate generalised Gaussian. ``predictive``: ``mc`` samples
    the embeddings (``samples`` rounds) and averages the softmaxes; ``probit`` moment-matches them through
    ProbCosine and the probit approximation, as BayesVLM does.

    ``cross_modal``: the weight of the cross-modal term (ProbVLM's published 1e-4), or a grid chosen by
    ``select``: ``pairs`` fits each on the pairs not held out and keeps the lowest held-out
    :func:`~uqvlm.probvlm.pair_retrieval_nll` (image-to-caption matching in batches of ``retrieval_batch``,
    with this predictive; label-free); ``val`` keeps the lowest NLL on the evaluated dataset's labelled
    validation split (the row then uses labels). The chosen weight is refitted on all pairs.
    ``center``: the embeddings' distributions are centred at the frozen embeddings (default; with
    vanishing uncertainty the predictive is MAP's) or at the adapters' means.
    """

    needs_pairs = True

    def __init__(
        self,
        predictive: Predictive = "mc",
        samples: int = 100,
        cross_modal: float | list[float] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0),
        select: ProbVLMSelection = "pairs",
        retrieval_batch: int = 256,
        center: Literal["frozen", "adapter"] = "frozen",
        hidden: int = AdapterFit.hidden,
        layers: int = AdapterFit.layers,
        dropout: float = AdapterFit.dropout,
        lr: float = AdapterFit.lr,
        epochs: int = AdapterFit.epochs,
        batch_size: int = AdapterFit.batch_size,
        holdout: float = AdapterFit.holdout,
        seed: int = AdapterFit.seed,
    ):
        self.predictive = check_choice("predictive", predictive, PREDICTIVES)
        self.samples = check_positive_int("samples", samples)
        grid = [cross_modal] if isinstance(cross_modal, int | float) else list(cross_modal)
        if not grid:
            raise ValueError("cross_modal must be a number or a non-empty list of numbers")
        self.cross_modal = tuple(check_positive("cross_modal", w) for w in grid)
        self.select = check_choice("select", select, PROBVLM_SELECTIONS)
        self.retrieval_batch = check_positive_int("retrieval_batch", retrieval_batch)
        self.center = check_choice("center", center, ("frozen", "adapter"))
        self.fit_settings = AdapterFit(
            hidden=hidden,
            layers=layers,
            dropout=float(dropout),
            lr=float(lr),
            epochs=epochs,
            batch_size=batch_size,
            holdout=float(holdout),
            seed=int(seed),
        )
        self.seed = int(seed)
        self.uses_labels = self.select == "val" and len(self.cross_modal) > 1

    def log_probs(
        self, adapters: ProbVLMAdapters, ctx: ZeroShotContext, image: Tensor, classes: Tensor
    ) -> Tensor:
        """log of the predictive [N, K] of image embeddings [N, D] against class embeddings [K, D]."""
        if self.predictive == "probit":
            return probvlm_log_probs_probit(
                adapters, image, classes, ctx.logit_scale, ctx.logit_bias, center=self.center
            )
        return probvlm_log_probs_mc(
            adapters,
            image,
            classes,
            ctx.logit_scale,
            ctx.logit_bias,
            samples=self.samples,
            generator=torch.Generator(image.device).manual_seed(self.seed),
            center=self.center,
        )

    def choose_cross_modal(
        self, ctx: ZeroShotContext, source: PairAdapters
    ) -> tuple[float, dict[float, float]]:
        """The weight of the grid with the lowest criterion (``select``), and every weight's criterion."""
        if len(self.cross_modal) == 1:
            return self.cross_modal[0], {}
        scores: dict[float, float] = {}
        if self.select == "pairs":
            image, text = source.heldout()
            for weight in self.cross_modal:
                adapters = source.fit(weight, "train")
                scores[weight] = pair_retrieval_nll(
                    lambda x, c, a=adapters: self.log_probs(a, ctx, x, c),
                    image,
                    text,
                    batch=self.retrieval_batch,
                )
        else:
            val_features, val_labels = ctx.validation
            for weight in self.cross_modal:
                log_probs = self.log_probs(
                    source.fit(weight, "all"), ctx, val_features.embeddings, ctx.text.embeddings
                )
                scores[weight] = float(negative_log_likelihood(log_probs, val_labels))
        best = min(scores.values())
        return next(w for w in self.cross_modal if scores[w] == best), scores  # ties: the first listed

    def predict_log_probs(self, ctx: ZeroShotContext) -> Tensor:
        if ctx.probvlm_provider is None:
            raise ValueError("ProbVLM needs image-caption pairs (ZeroShotContext.probvlm_provider)")
        source = ctx.probvlm_provider(self.fit_settings)
        weight, scores = self.choose_cross_modal(ctx, source)
        criterion = "held-out pair retrieval NLL" if self.select == "pairs" else "validation NLL"
        ctx.notes[f"probvlm/{self.predictive}/{self.select}"] = {
            "cross_modal": weight,
            "criterion": criterion if scores else "fixed",
            "scores": {str(w): s for w, s in scores.items()},
        }
        adapters = source.fit(weight, "all")
        return self.log_probs(adapters, ctx, ctx.image.embeddings, ctx.text.embeddings)
