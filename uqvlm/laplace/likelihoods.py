"""The contrastive likelihoods of CLIP (InfoNCE) and SigLIP (sigmoid loss), fixed when a posterior is built.

A likelihood binds the model's log logit scale (and SigLIP's logit bias), checked once, and gives the
output-space GGN w.r.t. the unnormalised source embeddings (method.md section 2): ``ggn`` summed over the
sources ([D, D]) for KFAC, ``ggn_diagonals`` one row per source ([B, D]) for the diagonal posterior, both
by the exact functions of :mod:`uqvlm.laplace.hessians`. The posteriors accept any object with these two
methods (:class:`Likelihood`), e.g. a brute-force reference in tests.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import Tensor

from ..validation import check_finite
from .hessians import infonce_hessian, infonce_hessian_diagonals, siglip_hessian, siglip_hessian_diagonals

__all__ = [
    "LIKELIHOODS",
    "ContrastiveLikelihood",
    "InfoNCE",
    "Likelihood",
    "SigLIP",
    "likelihood_for",
    "likelihood_from_state",
]


@runtime_checkable
class Likelihood(Protocol):
    """What a posterior needs of its likelihood: the output-space GGN of a class batch.

    ``sources``: [B, D] unnormalised source embeddings; ``targets``: [C, D] embeddings of the other
    modality, each source scored against all of them.
    """

    def ggn(self, sources: Tensor, targets: Tensor) -> Tensor:
        """[D, D] GGN summed over the B sources."""
        ...

    def ggn_diagonals(self, sources: Tensor, targets: Tensor) -> Tensor:
        """[B, D] diagonal of each source's GGN."""
        ...


class ContrastiveLikelihood(ABC):
    """A registered likelihood: ``kind`` names it, its dataclass fields are its parameters.

    Its identity (``state()``) goes into a posterior's ``state_dict`` and the posterior cache's key, so a
    cached posterior knows the likelihood it was fitted with.
    """

    kind: ClassVar[str]
    _registry: ClassVar[dict[str, type[ContrastiveLikelihood]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            ContrastiveLikelihood._registry[cls.kind] = cls

    @abstractmethod
    def ggn(self, sources: Tensor, targets: Tensor) -> Tensor: ...

    @abstractmethod
    def ggn_diagonals(self, sources: Tensor, targets: Tensor) -> Tensor: ...

    def state(self) -> dict[str, Any]:
        """``{"kind": ..., <parameter>: <float>, ...}``: plain values, torch.save- and JSON-able."""
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class InfoNCE(ContrastiveLikelihood):
    """CLIP's softmax over the targets, logits ``exp(logit_scale) cos(z, y_c)``; ``logit_scale`` is the LOG
    scale (open_clip's ``model.logit_scale``)."""

    kind: ClassVar[str] = "infonce"
    logit_scale: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "logit_scale", check_finite("logit_scale", self.logit_scale))

    def ggn(self, sources: Tensor, targets: Tensor) -> Tensor:
        return infonce_hessian(sources, targets, self.logit_scale)

    def ggn_diagonals(self, sources: Tensor, targets: Tensor) -> Tensor:
        return infonce_hessian_diagonals(sources, targets, self.logit_scale)


@dataclass(frozen=True)
class SigLIP(ContrastiveLikelihood):
    """SigLIP's independent sigmoids, logits ``exp(logit_scale) cos(z, y_c) + logit_bias`` (LOG scale)."""

    kind: ClassVar[str] = "siglip"
    logit_scale: float
    logit_bias: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "logit_scale", check_finite("logit_scale", self.logit_scale))
        object.__setattr__(self, "logit_bias", check_finite("logit_bias", self.logit_bias))

    def ggn(self, sources: Tensor, targets: Tensor) -> Tensor:
        return siglip_hessian(sources, targets, self.logit_scale, self.logit_bias)

    def ggn_diagonals(self, sources: Tensor, targets: Tensor) -> Tensor:
        return siglip_hessian_diagonals(sources, targets, self.logit_scale, self.logit_bias)


# The likelihood names, as a state or a cache key records them.
LIKELIHOODS: tuple[str, ...] = tuple(ContrastiveLikelihood._registry)


def likelihood_for(model: Any) -> ContrastiveLikelihood:
    """The loss ``model`` (anything with ``logit_scale`` and ``logit_bias``, e.g. a ``VLM``) was trained
    with: SigLIP models carry a logit bias, CLIP models (InfoNCE) do not."""
    if model.logit_bias is not None:
        return SigLIP(model.logit_scale, model.logit_bias)
    return InfoNCE(model.logit_scale)


def likelihood_from_state(state: Mapping[str, Any] | None) -> ContrastiveLikelihood | None:
    """The likelihood ``ContrastiveLikelihood.state()`` recorded (None for None)."""
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise ValueError(f"a likelihood state must be a dict with a 'kind', got {state!r}")
    params = dict(state)
    kind = params.pop("kind", None)
    cls = ContrastiveLikelihood._registry.get(kind)
    if cls is None:
        raise ValueError(f"unknown likelihood {kind!r} in state; known: {', '.join(LIKELIHOODS)}")
    try:
        return cls(**params)
    except TypeError as err:  # missing or extra parameters
        raise ValueError(f"likelihood state {dict(state)!r} does not fit {cls.__name__}: {err}") from None
