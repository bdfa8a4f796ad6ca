"""Device choice and mixed precision, shared by the model wrapper (uqvlm.models.vlm) and the feature extractor."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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


@contextlib.contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """torch's CPU intra-op threads set to ``count`` inside the block, restored after. For loops of small
    ops: with several threads each op waits on a thread barrier, which on a busy CPU costs scheduler quanta
    (measured on a shared 2-core machine: a last-layer fine-tune 20 s instead of 0.3 s, ProbVLM's adapters
    40 s instead of 2 s, the shapes study's greedy EPIG 531 s instead of 26 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
