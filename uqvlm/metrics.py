"""Classification metrics on predictive probabilities (torchmetrics where it has them)."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError


class NegativeLogLikelihood(Metric):
    """Mean -log p(true class) of predictive probabilities (NLPD), accumulated in float64."""

    full_state_update = False

    def __init__(self, eps: float = 1e-12, **kwargs) -> None:
        super().__init__(**kwargs)
        self.eps = eps
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        p = probs.gather(1, target[:, None]).squeeze(1).double()
        self.total += -torch.log(p.clamp_min(self.eps)).sum()
        self.count += target.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


def classification_metrics(num_classes: int, ece_bins: int = 20) -> MetricCollection:
    """Accuracy, NLL and top-label ECE (``ece_bins`` equal-width bins, L1) as one stateful collection."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "nll": NegativeLogLikelihood(),
            "ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=ece_bins, norm="l1"),
        }
    )


def evaluate_probs(probs: Tensor, labels: Tensor, ece_bins: int = 20) -> dict[str, float]:
    """All metrics of one method's predictive probabilities [N, K] against labels [N]."""
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(f"probs must be [N, K] and labels [N]; got {tuple(probs.shape)} and {tuple(labels.shape)}")
    metrics = classification_metrics(probs.shape[1], ece_bins)
    metrics.update(probs.float(), labels)
    out = {k: float(v) for k, v in metrics.compute().items()}
    out["n"] = int(labels.numel())
    return out
