"""Fine-tuning of the image tower's last layer on acquired labels (method.md section 7).

Only [W_img | b_img] is trained; the class text embeddings stay fixed. Training and epoch selection use
the same (MAP) logits, so the kept epoch is the one with the lowest MAP validation loss: among epochs
1..E, as the published code keeps (the pre-trained layer competes only with ``include_pretrained``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from uqvlm.devices import intra_op_threads
from uqvlm.features import Features, LastLayer
from uqvlm.methods import cosine_logits
from uqvlm.validation import check_finite, check_positive_int

__all__ = ["FinetuneConfig", "FinetuneResult", "finetune_image_layer", "embed"]

T = TypeVar("T")


@dataclass
class FinetuneConfig:
    """The paper's defaults: AdamW lr 1e-5, weight decay 5e-2, 100 epochs, batch 30, the epoch (1..E) with
    the lowest validation loss kept. ``include_pretrained``: the pre-trained layer (epoch 0) is a candidate
    too, so a fine-tune that only hurts the validation loss keeps it."""

    lr: float = 1e-5
    weight_decay: float = 5e-2
    epochs: int = 100
    batch_size: int = 30
    include_pretrained: bool = False

    def __post_init__(self) -> None:
        for name in ("lr", "weight_decay"):
            value = check_finite(name, getattr(self, name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            setattr(self, name, value)
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got {self.epochs!r}")
        self.batch_size = check_positive_int("batch_size", self.batch_size)
        if not isinstance(self.include_pretrained, bool):
            raise ValueError(f"include_pretrained must be true or false, got {self.include_pretrained!r}")
        if self.epochs == 0 and not self.include_pretrained:
            raise ValueError("epochs must be >= 1 (or 0 with include_pretrained: the pre-trained layer)")


@dataclass
class FinetuneResult:
    """The kept last layer (float64), its epoch (0 = the pre-trained weights) and the validation losses
    of every epoch, 0 (the pre-trained layer) included."""

    layer: LastLayer
    best_epoch: int
    best_val_loss: float
    val_losses: list[float] = field(default_factory=list)


def embed(layer: LastLayer, image: Features) -> Tensor:
    """z = a W^T (+ b) (+ residual) with the given last layer, float64."""
    z = image.activations.double() @ layer.weight.double().T
    if layer.bias is not None:
        z = z + layer.bias.double()
    if image.residuals is not None:
        z = z + image.residuals.double()
    return z


def _loss(
    layer: LastLayer, image: Features, labels: Tensor, classes: Tensor, scale: float, bias: float | None
) -> Tensor:
    return torch.nn.functional.cross_entropy(cosine_logits(embed(layer, image), classes, scale, bias), labels)


def _subset(image: Features, rows: Tensor) -> Features:
    return Features(
        image.activations[rows],
        image.embeddings[rows],
        None if image.residuals is None else image.residuals[rows],
    )


def _single_threaded(fn: Callable[..., T]) -> Callable[..., T]:
    # Every op of a last-layer fine-tune is tiny (see uqvlm.devices.intra_op_threads).
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        with intra_op_threads(1):
            return fn(*args, **kwargs)

    return run


@_single_threaded
def finetune_image_layer(
    layer: LastLayer,
    train: Features,
    train_labels: Tensor,
    val: Features,
    val_labels: Tensor,
    class_embeddings: Tensor,
    logit_scale: float,
    logit_bias: float | None,
    cfg: FinetuneConfig,
    generator: torch.Generator,
) -> FinetuneResult:
    """Cross-entropy fine-tuning of ``layer`` with seeded shuffles; keeps the epoch with the lowest
    validation loss (among 1..E, or 0..E with ``cfg.include_pretrained``), the earliest on ties."""
    w = layer.weight.detach().double().clone().requires_grad_(True)
    b = None if layer.bias is None else layer.bias.detach().double().clone().requires_grad_(True)
    current = LastLayer(w, b)
    params = [p for p in (w, b) if p is not None]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    classes = class_embeddings.detach().double()

    def val_loss() -> float:
        with torch.no_grad():
            return float(_loss(current, val, val_labels, classes, logit_scale, logit_bias))

    def snapshot() -> LastLayer:
        return LastLayer(w.detach().clone(), None if b is None else b.detach().clone())

    losses = [val_loss()]
    best = FinetuneResult(snapshot(), 0, losses[0]) if cfg.include_pretrained else None
    n = len(train_labels)
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            rows = order[start : start + cfg.batch_size]
            opt.zero_grad(set_to_none=True)
            _loss(
                current, _subset(train, rows), train_labels[rows], classes, logit_scale, logit_bias
            ).backward()
            opt.step()
        losses.append(val_loss())
        if best is None or losses[-1] < best.best_val_loss:
            best = FinetuneResult(snapshot(), epoch, losses[-1])
    assert best is not None  # FinetuneConfig: epochs >= 1 unless the pre-trained layer is a candidate
    best.val_losses = losses
    return best
