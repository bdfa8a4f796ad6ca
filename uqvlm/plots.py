"""Figures people would rather look at than read: reliability, risk-coverage, uncertain examples.

They take the methods' log-probabilities [N, K] and work on p = exp(log p) in float64."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from uqvlm.cache import atomic_write  # noqa: E402
from uqvlm.metrics import calibration_bins, risk_coverage, top_label  # noqa: E402


def _save(fig, path: Path) -> Path:
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def reliability_diagram(
    log_probs: dict[str, Tensor], labels: Tensor, path: Path, bins: int = 20, title: str = ""
) -> Path:
    """Accuracy vs confidence per equal-width bin, one panel per method, with the ECE gap shaded.

    The ECE metric's bins (:func:`uqvlm.metrics.calibration_bins`); its bin of confidences exactly 1 is
    drawn as part of the last bar."""
    cols = min(3, len(log_probs))
    rows = -(-len(log_probs) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows + 0.4), squeeze=False)
    edges = torch.linspace(0, 1, bins + 1)
    for ax in axes.flat[len(log_probs) :]:
        ax.axis("off")
    for ax, (name, lp) in zip(axes.flat, log_probs.items(), strict=False):
        conf, correct = top_label(lp.cpu(), labels.cpu())
        count, conf_sum, correct_sum = (
            torch.cat([t[:-2], t[-2:].sum(0, keepdim=True)])  # the bin of confidence 1 into the last bar
            for t in calibration_bins(conf, correct, bins)
        )
        acc = correct_sum / count.clamp_min(1)
        mean_conf = conf_sum / count.clamp_min(1)
        has = count > 0
        centres = ((edges[:-1] + edges[1:]) / 2)[has].numpy()
        acc, gap = acc[has].numpy(), (mean_conf - acc)[has].numpy()
        ax.bar(centres, acc, width=1 / bins, edgecolor="black", linewidth=0.4, label="accuracy")
        ax.bar(centres, gap, bottom=acc, width=1 / bins, color="tab:red", alpha=0.35, label="gap")
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
        ax.set(title=name, xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
        ax.set_ylabel("accuracy")
    axes[0][0].legend(loc="upper left", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def risk_coverage_curves(log_probs: dict[str, Tensor], labels: Tensor, path: Path, title: str = "") -> Path:
    """Selective risk vs coverage (keep the most confident first) for every method on one axis."""
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for name, lp in log_probs.items():
        conf, correct = top_label(lp.cpu(), labels.cpu())
        coverage, risk = risk_coverage(conf, (~correct).double())
        ax.plot(coverage, risk, label=f"{name} (AURC {float(risk.mean()):.3f})", linewidth=1.2)
    ax.set(xlabel="coverage", ylabel="risk (error rate)", xlim=(0, 1), title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def uncertain_examples(
    dataset: Sequence,
    labels: Tensor,
    log_probs: Tensor,
    classnames: Sequence[str],
    path: Path,
    per_row: int = 8,
    title: str = "",
) -> Path:
    """Top row: the most uncertain test images; bottom: the least (predictive entropy), with predictions.

    ``dataset[i]`` gives ``(image, label)``; only the shown images are loaded."""
    probs = log_probs.detach().cpu().double().exp()
    entropy = -torch.xlogy(probs, probs).sum(1)
    order = torch.argsort(entropy, descending=True)
    picks = {"most uncertain": order[:per_row].tolist(), "least uncertain": order.flip(0)[:per_row].tolist()}
    fig, axes = plt.subplots(2, per_row, figsize=(1.6 * per_row, 4.0), squeeze=False)
    for r, (row_name, indices) in enumerate(picks.items()):
        for c in range(per_row):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(indices):
                continue
            i = indices[c]
            pred = int(probs[i].argmax())
            ok = pred == int(labels[i])
            ax.imshow(dataset[i][0])
            ax.set_title(
                f"{classnames[pred]} {float(probs[i, pred]):.2f}\nH={float(entropy[i]):.2f}"
                + ("" if ok else f"\n(true {classnames[int(labels[i])]})"),
                fontsize=6,
                color="black" if ok else "tab:red",
            )
        axes[r][0].text(
            -0.15,
            0.5,
            row_name,
            transform=axes[r][0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=8,
        )
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
