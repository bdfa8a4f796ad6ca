"""Device choice and mixed precision, shared by the model wrapper (uqvlm.models.vlm) and the feature extractor."""

from __future__ import annotations

import contextlib

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` means CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """AMP on CUDA for bf16/fp16; full precision elsewhere (CPU autocast buys little for ViTs)."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()
