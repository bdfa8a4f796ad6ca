"""Input checks shared by the pure tensor functions: clear errors that name the argument."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def check_tensor(name: str, x: Any, ndim: int) -> Tensor:
    """``x`` as a finite floating-point tensor with ``ndim`` dimensions, else ValueError naming ``name``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf")
    return x
