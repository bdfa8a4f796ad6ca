"""Encoder outputs split at the last (random) layer: z = W a (+ b) (+ residual)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Features:
    """Per-input features of one tower.

    activations: [N, p] input of the last layer (no constant 1 appended);
    embeddings:  [N, D] unnormalised embedding z;
    residuals:   [N, D] deterministic offset added after the last layer (SigLIP image tower), else None.
    """

    activations: Tensor
    embeddings: Tensor
    residuals: Tensor | None = None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def to(self, *args, **kwargs) -> Features:
        res = None if self.residuals is None else self.residuals.to(*args, **kwargs)
        return Features(self.activations.to(*args, **kwargs), self.embeddings.to(*args, **kwargs), res)

    @staticmethod
    def cat(parts: list[Features]) -> Features:
        res = None if parts[0].residuals is None else torch.cat([p.residuals for p in parts])
        return Features(
            torch.cat([p.activations for p in parts]), torch.cat([p.embeddings for p in parts]), res
        )


@dataclass
class LastLayer:
    """The random last layer of a tower, in the convention z = a @ weight.T (+ bias).

    weight: [D, p]; bias: [D] or None. For open_clip's ``visual.proj`` ([p, D], applied as
    ``pooled @ proj``) the weight is ``proj.T``.
    """

    weight: Tensor
    bias: Tensor | None = None

    @property
    def has_bias(self) -> bool:
        return self.bias is not None
