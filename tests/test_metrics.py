"""Metrics agree with hand computations."""

import math

import torch

from uqvlm.metrics import evaluate_probs


def brute_ece(probs: torch.Tensor, labels: torch.Tensor, bins: int) -> float:
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            total += mask.double().mean() * abs(conf[mask].double().mean() - correct[mask].mean())
    return float(total)


def test_small_case_by_hand():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.25, 0.25, 0.5], [0.9, 0.05, 0.05]])
    labels = torch.tensor([0, 2, 2, 1])
    m = evaluate_probs(probs, labels, ece_bins=20)
    assert m["acc"] == 0.5
    assert math.isclose(
        m["nll"], -(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.05)) / 4, rel_tol=1e-6
    )
    # Bins (20 wide = 0.05): 0.7 correct, 0.6 wrong, 0.5 correct, 0.9 wrong, each alone in its bin.
    expected_ece = (abs(0.7 - 1) + abs(0.6 - 0) + abs(0.5 - 1) + abs(0.9 - 0)) / 4
    assert math.isclose(m["ece"], expected_ece, rel_tol=1e-5)
    assert m["n"] == 4


def test_random_against_brute_force():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 7, generator=g), -1)
    labels = torch.randint(0, 7, (500,), generator=g)
    for bins in (15, 20):
        m = evaluate_probs(probs, labels, ece_bins=bins)
        assert math.isclose(m["ece"], brute_ece(probs, labels, bins), rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(m["acc"], float((probs.argmax(1) == labels).double().mean()), rel_tol=1e-6)
    assert math.isclose(
        m["nll"], float(-probs.double()[torch.arange(500), labels].log().mean()), rel_tol=1e-6
    )


def test_brier_auroc_aurc_by_brute_force():
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(2 * torch.randn(300, 5, generator=g), -1).double()
    labels = torch.randint(0, 5, (300,), generator=g)
    m = evaluate_probs(probs, labels)
    onehot = torch.eye(5, dtype=torch.float64)[labels]
    assert math.isclose(m["brier"], float(((probs - onehot) ** 2).sum(1).mean()), rel_tol=1e-9)
    conf, pred = probs.max(1)
    wrong = pred != labels
    # AUROC = P(uncertainty of a wrong one > that of a right one), ties count half: all pairs.
    u_wrong, u_right = (1 - conf)[wrong], (1 - conf)[~wrong]
    diff = u_wrong[:, None] - u_right[None, :]
    auroc = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    assert math.isclose(m["auroc"], auroc, rel_tol=1e-5)
    # AURC: the mean over k of the error rate among the k most confident.
    order = sorted(range(300), key=lambda i: -float(conf[i]))
    risks = [sum(bool(wrong[j]) for j in order[: k + 1]) / (k + 1) for k in range(300)]
    assert math.isclose(m["aurc"], sum(risks) / 300, rel_tol=1e-9)


def test_perfect_confident_predictions():
    labels = torch.tensor([0, 1, 2, 1])
    probs = torch.eye(3)[labels]
    m = evaluate_probs(probs, labels)
    assert m["acc"] == 1.0 and m["ece"] < 1e-6 and m["brier"] < 1e-12 and m["aurc"] == 0.0
