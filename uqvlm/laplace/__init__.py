"""Post-hoc last-layer Laplace posteriors for CLIP / SigLIP (method.md §2-4).

One entry point, ``Laplace(last_layer, structure, likelihood=...)``, one class per curvature structure,
one class per likelihood.
"""

from __future__ import annotations

from ..features import LastLayer
from .base import LastLayerPosterior
from .diag import DiagPosterior
from .evidence import diag_log_evidence, grid_search_prior, kfac_log_evidence, maximise_evidence
from .hessians import infonce_hessian, infonce_hessian_diagonals, siglip_hessian, siglip_hessian_diagonals
from .kfac import KFACPosterior
from .likelihoods import (
    LIKELIHOODS,
    ContrastiveLikelihood,
    InfoNCE,
    Likelihood,
    SigLIP,
    likelihood_for,
    likelihood_from_state,
)
from .map import MAPPosterior
from .reference import load_published_factors

__all__ = [
    "Laplace",
    "STRUCTURES",
    "LIKELIHOODS",
    "Likelihood",
    "ContrastiveLikelihood",
    "InfoNCE",
    "SigLIP",
    "likelihood_for",
    "likelihood_from_state",
    "LastLayerPosterior",
    "KFACPosterior",
    "DiagPosterior",
    "MAPPosterior",
    "kfac_log_evidence",
    "diag_log_evidence",
    "maximise_evidence",
    "grid_search_prior",
    "load_published_factors",
    "infonce_hessian",
    "siglip_hessian",
    "infonce_hessian_diagonals",
    "siglip_hessian_diagonals",
]

# Every posterior class registers its ``structure`` name on definition (``LastLayerPosterior.__init_subclass__``).
STRUCTURES: dict[str, type[LastLayerPosterior]] = dict(LastLayerPosterior._registry)


def Laplace(  # noqa: N802 - named like laplace-torch's factory
    last_layer: LastLayer,
    structure: str = "kfac",
    likelihood: Likelihood | None = None,
    n: float = 10.0,
    prior_precision: float = 1.0,
) -> LastLayerPosterior:
    """An unfitted posterior of the given structure (one of ``STRUCTURES``) around ``last_layer``.

    ``likelihood`` (``InfoNCE(logit_scale)`` for CLIP, ``SigLIP(logit_scale, logit_bias)`` for SigLIP, with
    the LOG scale; ``likelihood_for(vlm)`` picks the model's) is fixed here: ``update`` then takes only the
    data. ``structure="map"`` needs none. ``n`` is the pseudo-data count, ``prior_precision`` lambda.

    Example:
        >>> import math, torch
        >>> from uqvlm.features import LastLayer
        >>> from uqvlm.laplace import InfoNCE, Laplace
        >>> _ = torch.manual_seed(0)
        >>> layer = LastLayer(weight=torch.randn(4, 8))  # z = a @ weight.T: p = 8 inputs, D = 4 outputs
        >>> post = Laplace(layer, "kfac", likelihood=InfoNCE(logit_scale=math.log(10)))
        >>> acts = torch.randn(32, 8)  # a class batch: 32 sources ...
        >>> targets = acts @ layer.weight.T + torch.randn(32, 4)  # ... and the other modality's 32 targets
        >>> post.update(acts, acts @ layer.weight.T, targets)
        >>> post.finalize()
        KFACPosterior(D=4, p=8, bias=False, n=10, prior_precision=1, num_data=32, fitted=True)
        >>> print(f"{post.optimize_prior_precision('evidence'):.2f}")  # lambda, now post.prior_precision
        0.91
        >>> post.embedding_variance(torch.randn(5, 8)).shape  # diagonal of Cov[z] per input
        torch.Size([5, 4])
    """
    cls = STRUCTURES.get(structure)
    if cls is None:
        raise ValueError(f"structure must be one of {tuple(STRUCTURES)}, got {structure!r}")
    return cls(last_layer, likelihood=likelihood, n=n, prior_precision=prior_precision)
