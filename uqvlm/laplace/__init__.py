"""Post-hoc last-layer Laplace posteriors for CLIP / SigLIP (method.md §2-4).

One entry point, ``Laplace(last_layer, structure=...)``, one class per curvature structure.
"""

from __future__ import annotations

from typing import Any

from ..features import LastLayer
from .base import LIKELIHOODS, LastLayerPosterior
from .diag import DiagPosterior
from .evidence import diag_log_evidence, grid_search_prior, kfac_log_evidence, maximise_evidence
from .kfac import KFACPosterior
from .map import MAPPosterior
from .reference import load_published_factors

__all__ = [
    "Laplace",
    "STRUCTURES",
    "LIKELIHOODS",
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

_HESSIAN_NAMES = (
    "infonce_hessian",
    "siglip_hessian",
    "infonce_hessian_diagonals",
    "siglip_hessian_diagonals",
)


def __getattr__(name: str) -> Any:
    # The Hessian functions are imported on first access, so this package imports even when the
    # Hessian module fails to (its error then surfaces where the functions are used).
    if name in _HESSIAN_NAMES:
        from . import hessians

        return getattr(hessians, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def Laplace(  # noqa: N802 - named like laplace-torch's factory
    last_layer: LastLayer,
    structure: str = "kfac",
    n: float = 10.0,
    prior_precision: float = 1.0,
) -> LastLayerPosterior:
    """An unfitted posterior of the given structure (one of ``STRUCTURES``) around ``last_layer``."""
    cls = STRUCTURES.get(structure)
    if cls is None:
        raise ValueError(f"structure must be one of {tuple(STRUCTURES)}, got {structure!r}")
    return cls(last_layer, n=n, prior_precision=prior_precision)
