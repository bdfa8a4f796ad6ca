"""Active few-shot learning with BayesVLM (method.md section 7): acquisition scores, strategies,
pool/target domains and last-layer fine-tuning. ``task=active_learning`` runs them end to end."""

from uqvlm.active.acquisition import assign_nearest_unused, bald, entropy, epig, gaussian_distances, nearest
from uqvlm.active.finetune import FinetuneConfig, FinetuneResult, finetune_image_layer
from uqvlm.active.strategies import (
    STRATEGIES,
    AcquisitionConfig,
    ActiveProblem,
    Selection,
    greedy_epig,
    select,
)

__all__ = [
    "STRATEGIES",
    "AcquisitionConfig",
    "ActiveProblem",
    "FinetuneConfig",
    "FinetuneResult",
    "Selection",
    "assign_nearest_unused",
    "bald",
    "entropy",
    "epig",
    "finetune_image_layer",
    "gaussian_distances",
    "greedy_epig",
    "nearest",
    "select",
]
