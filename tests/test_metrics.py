"""Metrics agree with hand computations, closed forms and torchmetrics (where float32 is exact)."""

import math

import pytest
import torch
from torchmetrics.functional.classification import multiclass_calibration_error

from uqvlm.features import Features
from uqvlm.methods import MAP, TTA, ZeroShotContext
from uqvlm.metrics import evaluate_log_probs

F64 = torch.float64


def brute_ece(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> float:
    """Top-label L1 ECE with torchmetrics' bins: [b/B, (b+1)/B) for b < B, and {1} a bin of its own."""
    conf, pred = probs.double().max(1)
    correct = (pred == labels).double()
    masks = [(conf >= b / bins) & (conf < (b + 1) / bins) for b in range(bins)] + [conf == 1]
    total = 0.0
    for mask in masks:
        if mask.any():
            total += mask.double().mean() * abs(conf[mask].mean() - correct[mask].mean())
    return float(total)


def test_small_case_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5], [0.9, 0.05, 0.05]], dtype=F64)
    labels = torch.tensor([0, 2, 2, 1])
    m = evaluate_log_probs(probs.log(), labels, ece_bins=20)
    assert m["acc"] == 0.5
    assert math.isclose(
        m["nll"], -(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.05)) / 4, rel_tol=1e-12
    )
    # Bins (20 wide = 0.05): 0.7 correct, 0.6 wrong, 0.5 correct, 0.9 wrong, each alone in its bin.
    expected_ece = (abs(0.7 - 1) + abs(0.6 - 0) + abs(0.5 - 1) + abs(0.9 - 0)) / 4
    assert math.isclose(m["ece"], expected_ece, rel_tol=1e-12)
    assert m["n"] == 4


def test_random_against_brute_force():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(500, 7, generator=g, dtype=F64)
    probs = torch.softmax(logits, -1)
    labels = torch.randint(0, 7, (500,), generator=g)
    for bins in (15, 20):
        m = evaluate_log_probs(logits.log_softmax(-1), labels, ece_bins=bins)
        assert math.isclose(m["ece"], brute_ece(probs, labels, bins), rel_tol=1e-12, abs_tol=1e-15)
        reference = multiclass_calibration_error(probs, labels, num_classes=7, n_bins=bins, norm="l1")
        assert math.isclose(m["ece"], float(reference), rel_tol=1e-5)
    assert math.isclose(m["acc"], float((probs.argmax(1) == labels).double().mean()), rel_tol=1e-15)
    assert math.isclose(m["nll"], float(-probs[torch.arange(500), labels].log().mean()), rel_tol=1e-12)


def test_brier_auroc_aurc_by_brute_force():
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(300, 5, generator=g, dtype=F64)
    # Some exactly tied confidences, so the AUROC's ties-count-half rule is exercised.
    logits[10:20] = logits[0]
    probs = torch.softmax(logits, -1)
    labels = torch.randint(0, 5, (300,), generator=g)
    m = evaluate_log_probs(logits.log_softmax(-1), labels)
    onehot = torch.eye(5, dtype=F64)[labels]
    assert math.isclose(m["brier"], float(((probs - onehot) ** 2).sum(1).mean()), rel_tol=1e-12)
    conf, pred = probs.max(1)
    wrong = pred != labels
    # AUROC = P(uncertainty of a wrong one > that of a right one), ties count half: all pairs.
    u_wrong, u_right = (1 - conf)[wrong], (1 - conf)[~wrong]
    diff = u_wrong[:, None] - u_right[None, :]
    auroc = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    assert math.isclose(m["auroc"], auroc, rel_tol=1e-12)
    # AURC: the mean over k of the error rate among the k most confident.
    order = sorted(range(300), key=lambda i: -float(conf[i]))
    risks = [sum(bool(wrong[j]) for j in order[: k + 1]) / (k + 1) for k in range(300)]
    assert math.isclose(m["aurc"], sum(risks) / 300, rel_tol=1e-12)


def test_perfect_confident_predictions():
    labels = torch.tensor([0, 1, 2, 1])
    log_probs = torch.eye(3, dtype=F64)[labels].log()  # log 0 = -inf off the true class
    m = evaluate_log_probs(log_probs, labels)
    assert m["acc"] == 1.0 and m["nll"] == 0.0 and m["ece"] == 0.0 and m["brier"] == 0.0
    assert m["aurc"] == 0.0
    assert math.isnan(m["auroc"])  # no misclassification to detect


def test_rejects_probabilities_and_logits_in_place_of_log_probabilities():
    probs = torch.softmax(torch.randn(6, 4, dtype=F64), -1)
    labels = torch.zeros(6, dtype=torch.long)
    for wrong in (probs, 5 * probs.log()):
        with pytest.raises(ValueError, match="log-probabilities"):
            evaluate_log_probs(wrong, labels)


# ------------------------------------------------------------------------ NLL: no clamp, float64
def _map_context(img: torch.Tensor, txt: torch.Tensor, scale: float, views=()) -> ZeroShotContext:
    def no(*_):
        raise AssertionError("not needed")

    return ZeroShotContext(
        logit_scale=math.log(scale),
        logit_bias=None,
        image=Features(img, img),
        labels=torch.zeros(len(img), dtype=torch.long),
        text=Features(txt, txt),
        posterior=None,
        validation_provider=no,
        views_provider=lambda k: list(views)[:k],
        posterior_provider=no,
    )


def test_map_nll_of_a_confident_mistake_is_the_closed_form_not_a_cap():
    # One image u = e0 and three classes at cosines 1, 0.5 and 0 with it; scale 100. The true class
    # trails the top one by a cosine gap g, so -log p_y = 100 g + log(1 + e^-50 + e^-100) (in units of
    # the top logit): 50 and 100, far above the 27.6 that a probability clamp at 1e-12 allows.
    scale = 100.0
    txt = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(0.75)], [0.0, 1.0]], dtype=F64)
    img = torch.tensor([[2.0, 0.0], [3.0, 0.0]], dtype=F64)
    labels = torch.tensor([1, 2])
    ctx = _map_context(img, txt, scale)
    log_probs = MAP().predict_log_probs(ctx)
    assert log_probs.dtype == F64
    s = math.exp(ctx.logit_scale)
    lse = math.log(1 + math.exp(-0.5 * s) + math.exp(-s))
    expected = ((0.5 * s + lse) + (1.0 * s + lse)) / 2
    m = evaluate_log_probs(log_probs, labels)
    assert m["nll"] > 27.7
    assert math.isclose(m["nll"], expected, rel_tol=1e-12)


def test_metrics_are_float64_beyond_float32_resolution():
    # p(true) = 1 - eps with eps below float32's half-ulp at 1 (3e-8): in float32 it is 1, so NLL and
    # Brier are 0; in float64, NLL = -log(1 - eps) = eps + eps^2/2 + ..., Brier = eps^2 + eps^2.
    eps = torch.tensor([1e-8, 2e-8], dtype=F64)
    log_probs = torch.stack([torch.log1p(-eps), eps.log()], dim=1)
    labels = torch.zeros(2, dtype=torch.long)
    m = evaluate_log_probs(log_probs, labels)
    assert math.isclose(m["nll"], float((eps + eps**2 / 2).mean()), rel_tol=1e-12)
    assert math.isclose(m["brier"], float((2 * eps**2).mean()), rel_tol=1e-6)


# ------------------------------------------------------------------------ ECE bin-edge convention
def test_ece_on_bin_edges_follows_torchmetrics_convention():
    # Confidences exactly on 20-bin edges (0.25, 0.5, 0.75: exact in float32 and float64, and
    # exp(log p) gives them back exactly) and exactly 1. torchmetrics bins by
    # bucketize(conf, linspace(0, 1, 21), right=True) - 1: an edge value goes to the bin ABOVE it, and
    # conf == 1 to an extra bin of its own. Each pair below puts an edge confidence next to an input of
    # the opposite sign of (confidence - correct) just below or above it, so the other conventions give
    # other numbers.
    probs = torch.tensor(
        [
            [0.50, 0.30, 0.20, 0.00, 0.00],  # 0.5 right   -> [0.50, 0.55)  with the next one
            [0.52, 0.48, 0.00, 0.00, 0.00],  # 0.52 wrong  -> [0.50, 0.55)
            [0.25, 0.20, 0.20, 0.20, 0.15],  # 0.25 right  -> [0.25, 0.30), not with the next one
            [0.24, 0.20, 0.20, 0.20, 0.16],  # 0.24 wrong  -> [0.20, 0.25)
            [0.75, 0.25, 0.00, 0.00, 0.00],  # 0.75 right  -> [0.75, 0.80)
            [0.74, 0.26, 0.00, 0.00, 0.00],  # 0.74 wrong  -> [0.70, 0.75)
            [1.00, 0.00, 0.00, 0.00, 0.00],  # 1.0 wrong   -> {1}, not with the next one
            [0.96, 0.04, 0.00, 0.00, 0.00],  # 0.96 right  -> [0.95, 1.00)
        ],
        dtype=F64,
    )
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 1, 0])
    log_probs = probs.log()
    assert torch.equal(log_probs.max(1).values.exp(), probs.max(1).values)
    # Per bin |sum of confidences - number right| / N:
    by_hand = (abs(1.02 - 1) + 0.75 + 0.24 + 0.25 + 0.74 + 1.0 + 0.04) / 8
    m = evaluate_log_probs(log_probs, labels, ece_bins=20)
    assert math.isclose(m["ece"], by_hand, rel_tol=1e-12)
    assert math.isclose(brute_ece(probs, labels, 20), by_hand, rel_tol=1e-12)
    reference = multiclass_calibration_error(probs, labels, num_classes=5, n_bins=20, norm="l1")
    assert math.isclose(m["ece"], float(reference), rel_tol=1e-6)
    # Right-closed bins (lo, hi] with 1 in the last bin would give another number.
    right_closed = (0.5 + 0.52 + abs(0.49 - 1) + abs(1.49 - 1) + abs(1.96 - 1)) / 8
    assert not math.isclose(m["ece"], right_closed, rel_tol=1e-3)
    # The infinite NLL of the confident mistake is reported as it is.
    assert m["nll"] == math.inf


def test_ece_bins_float64_confidences():
    # 0.5 - 1e-12 is in [0.45, 0.5) in float64; torchmetrics casts it to float32 (0.5) before binning.
    probs = torch.tensor([[0.5 - 1e-12, 0.3, 0.2 + 1e-12], [0.5, 0.3, 0.2]], dtype=F64)
    labels = torch.tensor([1, 0])  # the first wrong, the second right
    m = evaluate_log_probs(probs.log(), labels, ece_bins=20)
    assert math.isclose(m["ece"], brute_ece(probs, labels, 20), rel_tol=1e-12)
    assert math.isclose(m["ece"], 0.5, rel_tol=1e-10)
    float32_binned = multiclass_calibration_error(probs, labels, num_classes=3, n_bins=20, norm="l1")
    assert float(float32_binned) < 1e-6


# ------------------------------------------------------------------------ TTA in log space
def test_tta_log_probs_are_the_log_of_the_mean_softmax():
    g = torch.Generator().manual_seed(4)
    txt = torch.randn(6, 8, generator=g, dtype=F64)
    views = [Features(v, v) for v in torch.randn(3, 10, 8, generator=g, dtype=F64)]
    scale = 30.0
    ctx = _map_context(views[0].embeddings, txt, scale, views)
    log_probs = TTA(views=3).predict_log_probs(ctx)
    assert log_probs.dtype == F64

    def softmax(v: Features) -> torch.Tensor:
        cos = torch.nn.functional.cosine_similarity(v.embeddings[:, None, :], txt[None, :, :], dim=-1)
        return torch.softmax(math.exp(ctx.logit_scale) * cos, -1)

    expected = torch.stack([softmax(v) for v in views]).mean(0).log()
    torch.testing.assert_close(log_probs, expected, rtol=1e-12, atol=1e-12)
