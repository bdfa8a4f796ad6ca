"""Classification and uncertainty metrics on predictive log-probabilities, all in float64.

Methods hand over log p(y|x) [N, K]. The NLL is -mean log p(true class) read straight off them, with no
clamp: a confident mistake costs what it costs (a probability clamped at 1e-12 would cap it at 27.6,
which a CLIP logit scale of 100 passes at a cosine gap of about 0.28). Every other metric uses
p = exp(log p) in float64.

Every metric is a stateful torchmetrics ``Metric`` (``update(log_probs, labels)`` per batch, ``compute``
at the end). torchmetrics' own classification metrics return float32, and its calibration error casts
the confidences to float32 *before* binning (which moves inputs near a bin edge to the next bin), so
accuracy, ECE and AUROC are float64 re-implementations with torchmetrics' conventions; the tests hold
them to torchmetrics where float32 is exact. The uncertainty score used for misclassification detection
and risk-coverage is 1 - max probability.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

__all__ = [
    "METRIC_COLUMNS",
    "AURC",
    "Accuracy",
    "BrierScore",
    "CalibrationError",
    "MisclassificationAUROC",
    "NegativeLogLikelihood",
    "calibration_bins",
    "classification_metrics",
    "evaluate_log_probs",
    "negative_log_likelihood",
    "rank_auroc",
    "risk_coverage",
]

METRIC_COLUMNS = ["acc", "nll", "ece", "ece15", "brier", "auroc", "aurc"]


def top_label(log_probs: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Confidence max_k p_k (float64) and whether the arg max is the target, for every input."""
    top, pred = log_probs.max(-1)
    return top.double().exp(), pred == target


def negative_log_likelihood(log_probs: Tensor, target: Tensor) -> Tensor:
    """-mean log p(true class), float64, no clamp (inf if a true class has probability exactly 0)."""
    return -log_probs.gather(-1, target[:, None]).double().mean()


def calibration_bins(confidence: Tensor, correct: Tensor, n_bins: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-bin count, sum of confidences and number correct, float64, ``n_bins + 1`` bins.

    torchmetrics' convention (``bucketize(conf, linspace(0, 1, n_bins + 1), right=True) - 1``): with
    edges e_b = linspace(0, 1, n_bins + 1)[b] (float64), bin b < n_bins holds e_b <= conf < e_(b+1), so a
    confidence exactly on an inner edge goes to the bin ABOVE it, and a confidence of exactly 1 lands in
    an extra bin n_bins of its own (rounding above 1 is counted there too).
    """
    conf = confidence.double()
    edges = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64, device=conf.device)
    index = (torch.bucketize(conf, edges, right=True) - 1).clamp_(0, n_bins)
    count = torch.bincount(index, minlength=n_bins + 1).double()
    conf_sum = torch.bincount(index, weights=conf, minlength=n_bins + 1)
    correct_sum = torch.bincount(index, weights=correct.double(), minlength=n_bins + 1)
    return count, conf_sum, correct_sum


def rank_auroc(score: Tensor, positive: Tensor) -> Tensor:
    """P(score of a positive > score of a negative), ties counting half (Mann-Whitney U / (n+ n-)),
    float64; NaN when either class is absent (torchmetrics returns 0 there, with a warning)."""
    score, positive = score.double().flatten(), positive.bool().flatten()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return torch.tensor(math.nan, dtype=torch.float64, device=score.device)
    # Mid-ranks (1-based) of tied scores: start of the tie group + (group size + 1) / 2.
    values, inverse, counts = torch.unique(score, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    mid_rank = starts.double() + (counts.double() + 1) / 2
    rank_sum = mid_rank[inverse][positive].sum()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


class _Sums(Metric):
    """A float64 total and a count, summed over batches and processes; compute = total / count."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def compute(self) -> Tensor:
        return self.total / self.count


class Accuracy(_Sums):
    """Fraction of inputs whose most probable class is the target."""

    def update(self, log_probs: Tensor, target: Tensor) -> None:
        self.total += (log_probs.argmax(-1) == target).sum().double()
        self.count += target.numel()


class NegativeLogLikelihood(_Sums):
    """Mean -log p(true class) (NLPD) of predictive log-probabilities, float64, no clamp."""

    def update(self, log_probs: Tensor, target: Tensor) -> None:
        self.total += negative_log_likelihood(log_probs, target) * target.numel()
        self.count += target.numel()


class BrierScore(_Sums):
    """Mean over inputs of sum_k (p_k - 1[k = y])^2 (the multiclass Brier score, range [0, 2])."""

    def update(self, log_probs: Tensor, target: Tensor) -> None:
        probs = log_probs.double().exp()
        onehot = torch.nn.functional.one_hot(target, probs.shape[1]).double()
        self.total += ((probs - onehot) ** 2).sum()
        self.count += target.numel()


class CalibrationError(Metric):
    """Top-label expected calibration error with L1 norm over equal-width confidence bins:
    sum_b (n_b / N) |mean confidence_b - accuracy_b| = sum_b |sum conf_b - correct_b| / N, float64.

    The binning is torchmetrics' ``MulticlassCalibrationError(n_bins, norm="l1")`` (see
    :func:`calibration_bins`), computed in float64 where torchmetrics bins float32 confidences.
    """

    full_state_update = False

    def __init__(self, n_bins: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
        self.n_bins = n_bins
        for name in ("count", "conf_sum", "correct_sum"):
            self.add_state(name, default=torch.zeros(n_bins + 1, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, log_probs: Tensor, target: Tensor) -> None:
        count, conf_sum, correct_sum = calibration_bins(*top_label(log_probs, target), self.n_bins)
        self.count += count
        self.conf_sum += conf_sum
        self.correct_sum += correct_sum

    def compute(self) -> Tensor:
        return (self.conf_sum - self.correct_sum).abs().sum() / self.count.sum()


class MisclassificationAUROC(Metric):
    """AUROC of the uncertainty 1 - max p for telling misclassified inputs from correct ones."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("uncertainty", default=[], dist_reduce_fx="cat")
        self.add_state("error", default=[], dist_reduce_fx="cat")

    def update(self, log_probs: Tensor, target: Tensor) -> None:
        conf, correct = top_label(log_probs, target)
        self.uncertainty.append(1 - conf)
        self.error.append(~correct)

    def compute(self) -> Tensor:
        return rank_auroc(torch.cat(self.uncertainty), torch.cat(self.error))


class AURC(Metric):
    """Area under the risk-coverage curve: the mean, over coverages k/N, of the error rate among the
    k most confident inputs (lower is better)."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("confidence", default=[], dist_reduce_fx="cat")
        self.add_state("error", default=[], dist_reduce_fx="cat")

    def update(self, log_probs: Tensor, target: Tensor) -> None:
        conf, correct = top_label(log_probs, target)
        self.confidence.append(conf)
        self.error.append((~correct).double())

    def compute(self) -> Tensor:
        conf, err = torch.cat(self.confidence), torch.cat(self.error)
        return risk_coverage(conf, err)[1].mean()


def risk_coverage(confidence: Tensor, error: Tensor) -> tuple[Tensor, Tensor]:
    """Coverage k/N and selective risk (error rate of the k most confident), k = 1..N."""
    order = torch.argsort(confidence, descending=True, stable=True)
    k = torch.arange(1, len(order) + 1, dtype=torch.float64, device=confidence.device)
    return k / len(order), torch.cumsum(error[order].double(), 0) / k


def classification_metrics(ece_bins: int = 20) -> MetricCollection:
    """Every metric of the zero-shot table as one stateful collection (``update(log_probs, labels)``).

    ECE bin convention (``ece``: ``ece_bins`` bins, the paper's 20; ``ece15``: 15), as torchmetrics'
    ``MulticlassCalibrationError(n_bins, norm="l1")`` which the paper used: edges
    ``torch.linspace(0, 1, n_bins + 1)``; bin b holds edge_b <= confidence < edge_(b+1), so a confidence
    exactly on an edge (0.5 with 20 bins) counts in the bin above it ([0.5, 0.55)), and confidences of
    exactly 1 form a bin of their own. Unlike torchmetrics, confidences are binned in float64.
    """
    return MetricCollection(
        {
            "acc": Accuracy(),
            "nll": NegativeLogLikelihood(),
            "ece": CalibrationError(ece_bins),
            "ece15": CalibrationError(15),
            "brier": BrierScore(),
            "auroc": MisclassificationAUROC(),
            "aurc": AURC(),
        },
        compute_groups=False,
    )


def evaluate_log_probs(log_probs: Tensor, labels: Tensor, ece_bins: int = 20) -> dict[str, float]:
    """All metrics of one method's predictive log-probabilities [N, K] (log p, each row's logsumexp 0)
    against labels [N]; computed in float64."""
    if log_probs.ndim != 2 or labels.shape != log_probs.shape[:1]:
        raise ValueError(
            f"log_probs must be [N, K] and labels [N]; got {tuple(log_probs.shape)} and {tuple(labels.shape)}"
        )
    if not log_probs.is_floating_point() or torch.isnan(log_probs).any():
        raise ValueError("log_probs must be floating point without NaN")
    worst = float((log_probs.double().logsumexp(-1)).abs().max()) if log_probs.numel() else 0.0
    if not worst <= 1e-5:
        raise ValueError(
            f"log_probs rows must be normalised log-probabilities (logsumexp 0), off by up to {worst:.3g}: "
            "probabilities or raw logits passed by mistake?"
        )
    metrics = classification_metrics(ece_bins).to(log_probs.device)
    metrics.update(log_probs.double(), labels)
    out = {k: float(v) for k, v in metrics.compute().items()}
    out["n"] = int(labels.numel())
    return out
