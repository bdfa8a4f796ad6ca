"""Shared machinery of the last-layer Laplace posteriors (method.md §3-4).

The random parameters are the augmented weight [W | b] of shape [D, p (+1)]: with a bias, the
activation a becomes [a, 1] so the bias is one more input column. The likelihood (InfoNCE or SigLIP, with
the model's logit scale) is fixed when a posterior is built. Posteriors are built by streaming class
batches through ``update`` and calling ``finalize``; afterwards ``n`` and ``prior_precision`` can be
changed freely without refitting, and ``with_point`` gives a new posterior with one more data point.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..features import LastLayer
from ..validation import check_positive, check_positive_int, check_tensor
from .evidence import grid_search_prior as _grid_search_prior
from .evidence import maximise_evidence
from .likelihoods import ContrastiveLikelihood, Likelihood, likelihood_from_state

__all__ = ["LastLayerPosterior", "STATE_VERSION"]

# 2: the likelihood's identity is part of the state.
STATE_VERSION = 2
# Rows of activations processed at once by embedding_variance: bounds the float64 temporaries.
_ROW_CHUNK = 8192

_check_tensor = check_tensor


class LastLayerPosterior(ABC):
    """Gaussian posterior over the augmented last-layer weight [W | b], centred at the MAP.

    Subclasses implement one curvature structure. ``likelihood`` gives the output-space GGN of the data
    (``InfoNCE`` or ``SigLIP``, or any :class:`~uqvlm.laplace.likelihoods.Likelihood`); it may be None
    for a posterior that is only used for prediction (e.g. built from published factors), and then
    ``update`` and ``with_point`` refuse. ``n`` is the pseudo-data count that scales the likelihood
    curvature, ``prior_precision`` the isotropic Gaussian prior precision lambda.
    """

    structure: ClassVar[str]
    # Whether ``update`` computes curvature (and so needs the likelihood); MAP only counts sources.
    needs_likelihood: ClassVar[bool] = True
    _registry: ClassVar[dict[str, type[LastLayerPosterior]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "structure" in cls.__dict__:
            LastLayerPosterior._registry[cls.structure] = cls

    def __init__(
        self,
        last_layer: LastLayer,
        *,
        likelihood: Likelihood | None = None,
        n: float = 10.0,
        prior_precision: float = 1.0,
    ) -> None:
        if likelihood is not None and not isinstance(likelihood, Likelihood):
            raise ValueError(
                "likelihood must be an InfoNCE or SigLIP object (anything with .ggn and .ggn_diagonals), "
                f"got {likelihood!r}"
            )
        weight = _check_tensor("last_layer.weight", last_layer.weight, 2).detach()
        bias = last_layer.bias
        if bias is not None:
            bias = _check_tensor("last_layer.bias", bias, 1).detach()
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(
                    f"last_layer.bias has {bias.shape[0]} entries, last_layer.weight has {weight.shape[0]} rows"
                )
        self._last_layer = LastLayer(weight, bias)
        self._likelihood = likelihood
        # Cached: evidence sweeps need it for every lambda.
        self._weight_sq_norm = float(self.mean_weight.square().sum())
        self.n = n
        self.prior_precision = prior_precision
        self._num_data = 0
        self._fitted = False
        self._init_curvature()

    # ----------------------------------------------------------------------------- properties
    @property
    def last_layer(self) -> LastLayer:
        """The MAP last layer (the posterior mean)."""
        return self._last_layer

    @property
    def likelihood(self) -> Likelihood | None:
        """The likelihood whose curvature ``update`` and ``with_point`` add (fixed at construction)."""
        return self._likelihood

    @property
    def has_bias(self) -> bool:
        return self._last_layer.bias is not None

    @property
    def out_features(self) -> int:
        """D, the embedding dimension."""
        return self._last_layer.weight.shape[0]

    @property
    def in_features(self) -> int:
        """p of the activations as given (without the appended 1)."""
        return self._last_layer.weight.shape[1]

    @property
    def augmented_in_features(self) -> int:
        """p (+1 with a bias): the dimension of the A factor."""
        return self.in_features + int(self.has_bias)

    @property
    def num_params(self) -> int:
        """P, the number of random parameters."""
        return self.out_features * self.augmented_in_features

    @property
    def mean_weight(self) -> Tensor:
        """[D, p (+1)] augmented MAP weight [W | b] in float64."""
        w = self._last_layer.weight.to(torch.float64)
        if self.has_bias:
            w = torch.cat([w, self._last_layer.bias.to(torch.float64)[:, None]], dim=1)
        return w

    @property
    def weight_sq_norm(self) -> float:
        """||[W | b]||^2 of the MAP, the prior's quadratic term."""
        return self._weight_sq_norm

    @property
    def n(self) -> float:
        return self._n

    @n.setter
    def n(self, value: float) -> None:
        self._n = check_positive("n", value)

    @property
    def prior_precision(self) -> float:
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float) -> None:
        self._prior_precision = check_positive("prior_precision", value)

    @property
    def num_data(self) -> int:
        """N, the number of sources accumulated so far (or given to a from_* constructor)."""
        return self._num_data

    def _set_num_data(self, num_data: Any) -> None:
        """The data count behind factors given to a from_* constructor (so later updates can extend them)."""
        if isinstance(num_data, bool) or int(num_data) != num_data or num_data <= 0:
            raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
        self._num_data = int(num_data)

    @property
    def fitted(self) -> bool:
        return self._fitted

    # ------------------------------------------------------------------------------ helpers
    def _augment(self, activations: Tensor, name: str = "activations") -> Tensor:
        a = _check_tensor(name, activations, 2)
        if a.shape[1] != self.in_features:
            raise ValueError(f"{name} has {a.shape[1]} features, the last layer expects {self.in_features}")
        a = a.detach().to(torch.float64)
        if self.has_bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        return a

    def _require_likelihood(self) -> Likelihood:
        if self._likelihood is None:
            raise ValueError(
                f"this {type(self).__name__} has no likelihood to compute curvature with; build it with "
                "likelihood=InfoNCE(logit_scale) or SigLIP(logit_scale, logit_bias), e.g. likelihood_for(vlm)"
            )
        return self._likelihood

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(f"{type(self).__name__}: call finalize() before using the posterior")

    def _resolve(self, prior_precision: float | None, n: float | None) -> tuple[float, float]:
        lam = (
            self._prior_precision
            if prior_precision is None
            else check_positive("prior_precision", prior_precision)
        )
        nn = self._n if n is None else check_positive("n", n)
        return lam, nn

    # --------------------------------------------------------------------------- accumulation
    def update(self, activations: Tensor, source_emb: Tensor, target_emb: Tensor) -> None:
        """Add one class batch: B sources with activations [B, p] and unnormalised embeddings [B, D],
        scored by the posterior's likelihood against the C targets [C, D] of the other modality.

        Sums are kept unnormalised, so updating after ``finalize`` is allowed (finalize again).
        """
        if self.needs_likelihood:
            self._require_likelihood()
        a = self._augment(activations)
        src = _check_tensor("source_emb", source_emb, 2).detach()
        tgt = _check_tensor("target_emb", target_emb, 2).detach()
        if src.shape[0] != a.shape[0]:
            raise ValueError(f"source_emb has {src.shape[0]} rows, activations has {a.shape[0]}")
        if src.shape[1] != self.out_features:
            raise ValueError(f"source_emb has dim {src.shape[1]}, the last layer outputs {self.out_features}")
        if tgt.shape[1] != self.out_features:
            raise ValueError(f"target_emb has dim {tgt.shape[1]}, the last layer outputs {self.out_features}")
        if tgt.shape[0] == 0:
            raise ValueError("target_emb must contain at least one target")
        if a.shape[0] == 0:
            return
        self._accumulate(a, src, tgt)
        self._num_data += a.shape[0]
        self._fitted = False

    def finalize(self) -> LastLayerPosterior:
        """Normalise and factor the accumulated curvature; returns self."""
        if self._num_data == 0:
            raise RuntimeError(f"{type(self).__name__}: no data accumulated; call update() first")
        self._finalize()
        self._fitted = True
        return self

    @abstractmethod
    def _init_curvature(self) -> None:
        """Set up the structure's (empty) curvature state; called at the end of ``__init__``."""

    @abstractmethod
    def _accumulate(self, a: Tensor, source: Tensor, target: Tensor) -> None:
        """Add the curvature of augmented float64 activations [B, p'] whose sources [B, D] are scored
        against ``target`` [C, D]."""

    @abstractmethod
    def _finalize(self) -> None: ...

    def with_point(
        self, activation: Tensor, embedding: Tensor, targets: Tensor, copies: int = 1
    ) -> LastLayerPosterior:
        """A NEW fitted posterior with one more (label-free) data point's curvature; ``self`` is untouched.

        The point has activation [p] and unnormalised embedding [D], scored by the posterior's likelihood
        against ``targets`` [K, D] (in active learning: the class text embeddings). It counts as ``copies``
        data points, so the result equals the posterior ``update`` would build from this posterior's data
        plus ``copies`` copies of the point, ``num_data`` included (EPIG's greedy updates, method.md §7).
        """
        copies = check_positive_int("copies (the data points the point counts as)", copies)
        self._require_fitted()
        a = self._augment(_check_tensor("activation", activation, 1)[None], "activation")[0]
        z = _check_tensor("embedding", embedding, 1)
        if z.shape[0] != self.out_features:
            raise ValueError(f"embedding has dim {z.shape[0]}, the last layer outputs {self.out_features}")
        y = _check_tensor("targets", targets, 2)
        return self._with_point(a, z.detach().double()[None], y.double(), copies)

    @abstractmethod
    def _with_point(self, a: Tensor, z: Tensor, targets: Tensor, copies: int) -> LastLayerPosterior:
        """``with_point`` for the augmented float64 activation [p'], embedding [1, D], targets [K, D]."""

    # ---------------------------------------------------------------------------- inference
    def embedding_mean(self, activations: Tensor, residuals: Tensor | None = None) -> Tensor:
        """MAP embedding z = a W^T (+ b) (+ residual), [N, D], in the activations' dtype."""
        a = _check_tensor("activations", activations, 2)
        if a.shape[1] != self.in_features:
            raise ValueError(
                f"activations has {a.shape[1]} features, the last layer expects {self.in_features}"
            )
        w = self._last_layer.weight.to(device=a.device, dtype=a.dtype)
        z = a @ w.T
        if self.has_bias:
            z = z + self._last_layer.bias.to(device=a.device, dtype=a.dtype)
        if residuals is not None:
            r = _check_tensor("residuals", residuals, 2)
            if r.shape != z.shape:
                raise ValueError(f"residuals must have shape {tuple(z.shape)}, got {tuple(r.shape)}")
            z = z + r.to(z.dtype)
        return z

    def embedding_variance(self, activations: Tensor) -> Tensor:
        """Diagonal of Cov[z] for each activation row: [N, D], in the activations' dtype."""
        self._require_fitted()
        a_in = _check_tensor("activations", activations, 2)
        out = []
        for start in range(0, a_in.shape[0], _ROW_CHUNK):
            out.append(self._variance(self._augment(a_in[start : start + _ROW_CHUNK])))
        if not out:
            return a_in.new_zeros(0, self.out_features)
        return torch.cat(out).to(device=a_in.device, dtype=a_in.dtype)

    @abstractmethod
    def _variance(self, a: Tensor) -> Tensor:
        """[N, D] float64 variance for augmented float64 activations."""

    @abstractmethod
    def sample(
        self, num_samples: int, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Weight samples (weight [S, D, p], bias [S, D] or None) from the posterior, float64.

        Jointly random across inputs: push every input through the same sample (needed by EPIG).
        """

    def _split_samples(self, w_aug: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.has_bias:
            return w_aug[..., :-1], w_aug[..., -1]
        return w_aug, None

    # ----------------------------------------------------------------------------- evidence
    @abstractmethod
    def log_evidence(
        self, prior_precision: float | None = None, n: float | None = None, variant: str = "exact"
    ) -> float:
        """Laplace log-evidence at (lambda, n), current values by default, up to lambda-free constants."""

    def optimize_prior_precision(
        self,
        method: str = "evidence",
        *,
        nll_fn: Callable[[float], float] | None = None,
        grid: Iterable[float] | None = None,
        bounds: tuple[float, float] = (1e-4, 1e8),
        init: float | None = None,
        variant: str = "exact",
    ) -> float:
        """Choose lambda, set ``self.prior_precision`` to it and return it.

        ``evidence``: maximise ``log_evidence`` over log lambda in ``bounds`` (``variant`` as in
        log_evidence). ``grid``: minimise ``nll_fn(lambda)`` (e.g. validation NLL) over ``grid``
        (default 10^-4 .. 10^8, 4 points per decade); ``self.prior_precision`` is set to each candidate
        before ``nll_fn`` is called, so nll_fn may simply use this posterior.
        """
        if method == "evidence":
            self._require_fitted()
            lam = maximise_evidence(lambda x: self.log_evidence(x, variant=variant), init=init, bounds=bounds)
        elif method == "grid":
            if nll_fn is None:
                raise ValueError("nll_fn is required for method='grid'")
            if grid is None:
                grid = [10.0 ** (e / 4.0) for e in range(-16, 33)]

            def objective(x: float) -> float:
                self.prior_precision = x
                return nll_fn(x)

            old = self._prior_precision
            try:
                lam = _grid_search_prior(objective, list(grid))
            except BaseException:
                self.prior_precision = old
                raise
        else:
            raise ValueError(f"method must be 'evidence' or 'grid', got {method!r}")
        self.prior_precision = lam
        return lam

    # ------------------------------------------------------------------------------ caching
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and metadata (torch.save-able with weights_only loading), the likelihood's
        identity included."""
        return self._state(self._likelihood_state())

    def _state(self, likelihood: dict[str, Any] | None) -> dict[str, Any]:
        self._require_fitted()
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "structure": self.structure,
            "likelihood": likelihood,
            "n": self._n,
            "prior_precision": self._prior_precision,
            "num_data": self._num_data,
            "weight": self._last_layer.weight.detach().cpu().clone(),
        }
        if self.has_bias:
            state["bias"] = self._last_layer.bias.detach().cpu().clone()
        state.update({k: v.detach().cpu().clone() for k, v in self._tensors().items()})
        return state

    def _likelihood_state(self) -> dict[str, Any] | None:
        if self._likelihood is None:
            return None
        if not isinstance(self._likelihood, ContrastiveLikelihood):
            raise ValueError(
                f"the likelihood {self._likelihood!r} has no state() to record; a state_dict needs an "
                "InfoNCE or SigLIP likelihood (or none)"
            )
        return self._likelihood.state()

    @abstractmethod
    def _tensors(self) -> dict[str, Tensor]: ...

    @abstractmethod
    def _load_tensors(self, state: dict[str, Any]) -> None: ...

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LastLayerPosterior:
        """Rebuild a fitted posterior (of the structure recorded in ``state``) from ``state_dict()``."""
        if not isinstance(state, dict):
            raise ValueError("state must be a dict produced by state_dict()")
        # The version first: a state of another format may lack (or mean other things by) any other key.
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"state has version {state.get('version')!r}, expected {STATE_VERSION}")
        missing = [
            k
            for k in ("structure", "likelihood", "n", "prior_precision", "num_data", "weight")
            if k not in state
        ]
        if missing:
            raise ValueError(f"state is missing {missing}")
        target = LastLayerPosterior._registry.get(state["structure"])
        if target is None:
            raise ValueError(f"unknown structure {state['structure']!r} in state")
        if cls is not LastLayerPosterior and not issubclass(target, cls):
            raise ValueError(f"state holds a {state['structure']!r} posterior, not a {cls.__name__}")
        obj = target(
            LastLayer(state["weight"], state.get("bias")),
            likelihood=likelihood_from_state(state["likelihood"]),
            n=state["n"],
            prior_precision=state["prior_precision"],
        )
        obj._num_data = int(state["num_data"])
        obj._load_tensors(state)
        obj._fitted = True
        return obj

    def to(self, device: torch.device | str) -> LastLayerPosterior:
        """A copy with every tensor on ``device`` (and the same likelihood object)."""
        state = self._state(None)  # the likelihood object is carried over as it is, recordable or not
        moved = LastLayerPosterior.from_state_dict(
            {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in state.items()}
        )
        moved._likelihood = self._likelihood
        return moved

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(D={self.out_features}, p={self.in_features}, bias={self.has_bias}, "
            f"n={self._n:g}, prior_precision={self._prior_precision:g}, num_data={self._num_data}, "
            f"fitted={self._fitted})"
        )
