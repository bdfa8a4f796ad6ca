"""Classification and uncertainty metrics on predictive probabilities (torchmetrics where it has them).

Every metric is a stateful torchmetrics ``Metric`` (``update`` per batch, ``compute`` at the end).
The uncertainty score used for misclassification detection and risk-coverage is 1 - max probability.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassCalibrationError

__all__ = [
    "METRIC_COLUMNS",
    "AURC",
    "BrierScore",
    "MisclassificationAUROC",
    "NegativeLogLikelihood",
    "classification_metrics",
    "evaluate_probs",
    "risk_coverage",
]

METRIC_COLUMNS = ["acc", "nll", "ece", "ece15", "brier", "auroc", "aurc"]


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


class BrierScore(Metric):
    """Mean over inputs of sum_k (p_k - 1[k = y])^2 (the multiclass Brier score, range [0, 2])."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor) -> None:
        onehot = torch.nn.functional.one_hot(target, probs.shape[1]).double()
        self.total += ((probs.double() - onehot) ** 2).sum()
        self.count += target.numel()

    def compute(self) -> Tensor:
        return self.total / self.count


class MisclassificationAUROC(BinaryAUROC):
    """AUROC of the uncertainty 1 - max p for telling misclassified inputs from correct ones."""

    def update(self, probs: Tensor, target: Tensor) -> None:  # type: ignore[override]
        conf, pred = probs.max(1)
        super().update(1 - conf.float(), (pred != target).long())


class AURC(Metric):
    """Area under the risk-coverage curve: the mean, over coverages k/N, of the error rate among the
    k most confident inputs (lower is better)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("confidence", default=[], dist_reduce_fx="cat")
        self.add_state("error", default=[], dist_reduce_fx="cat")

    def update(self, probs: Tensor, target: Tensor) -> None:
        conf, pred = probs.max(1)
        self.confidence.append(conf.double())
        self.error.append((pred != target).double())

    def compute(self) -> Tensor:
        conf, err = torch.cat(self.confidence), torch.cat(self.error)
        return risk_coverage(conf, err)[1].mean()


def risk_coverage(confidence: Tensor, error: Tensor) -> tuple[Tensor, Tensor]:
    """Coverage k/N and selective risk (error rate of the k most confident), k = 1..N."""
    order = torch.argsort(confidence, descending=True, stable=True)
    k = torch.arange(1, len(order) + 1, dtype=torch.float64)
    return k / len(order), torch.cumsum(error[order].double(), 0) / k


def classification_metrics(num_classes: int, ece_bins: int = 20) -> MetricCollection:
    """Every metric of the zero-shot table as one stateful collection (update(probs, labels))."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes=num_classes, average="micro"),
            "nll": NegativeLogLikelihood(),
            "ece": MulticlassCalibrationError(num_classes=num_classes, n_bins=ece_bins, norm="l1"),
            "ece15": MulticlassCalibrationError(num_classes=num_classes, n_bins=15, norm="l1"),
            "brier": BrierScore(),
            "auroc": MisclassificationAUROC(),
            "aurc": AURC(),
        },
        compute_groups=False,
    )


def evaluate_probs(probs: Tensor, labels: Tensor, ece_bins: int = 20) -> dict[str, float]:
    """All metrics of one method's predictive probabilities [N, K] against labels [N]."""
    if probs.ndim != 2 or labels.shape != probs.shape[:1]:
        raise ValueError(
            f"probs must be [N, K] and labels [N]; got {tuple(probs.shape)} and {tuple(labels.shape)}"
        )
    metrics = classification_metrics(probs.shape[1], ece_bins)
    metrics.update(probs.float(), labels)
    out = {k: float(v) for k, v in metrics.compute().items()}
    out["n"] = int(labels.numel())
    return out
