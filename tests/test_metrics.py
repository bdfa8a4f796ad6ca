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
    assert math.isclose(m["nll"], -(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.05)) / 4, rel_tol=1e-6)
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
    assert math.isclose(m["nll"], float(-probs.double()[torch.arange(500), labels].log().mean()), rel_tol=1e-6)
