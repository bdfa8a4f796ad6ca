"""The device policy and mixed precision, shared by the model wrapper, extraction, fitting and prediction.

The model owns its device. A VLM is put on one device when it is loaded (``load_vlm(device=...)``; the
config's ``device: auto`` means CUDA when available) and everything that computes with it follows it:
extraction encodes on ``vlm.device``, the curvature of the posteriors is accumulated there, and zero-shot
predictions are made there. Caches and results live on the CPU. A function that is given a device beside
a model refuses one that differs from the model's (:class:`DeviceMismatchError`, one line) instead of moving
either: move the model first (``vlm.to(device)``).

Precision: ``fp32`` is exact IEEE float32 on every device (cuDNN convolutions, TF32 by default in torch,
are switched to IEEE while a model encodes); ``bf16`` / ``fp16`` autocast on CUDA.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from uqvlm.errors import UqvlmError


class DeviceMismatchError(UqvlmError, ValueError):
    """A device was requested that is not the model's."""


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` means CUDA when available, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _same(a: torch.device, b: torch.device) -> bool:
    """Equal devices, with ``cuda`` meaning the current CUDA device."""
    if a.type != b.type:
        return False
    if a.type != "cuda" or a.index == b.index:
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (current if a.index is None else a.index) == (current if b.index is None else b.index)


def device_of(model: Any) -> torch.device:
    """Where ``model`` computes: its ``device`` attribute (a :class:`~uqvlm.models.vlm.VLM`), else the device
    of its first parameter (an ``nn.Module``), else the CPU (a stand-in without either)."""
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    parameters = getattr(model, "parameters", None)
    if callable(parameters):
        first = next(iter(parameters()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def model_device(model: Any, requested: str | torch.device | None = None, what: str = "this") -> torch.device:
    """The model's device; ``requested`` (None: follow the model) must name the same one."""
    device = device_of(model)
    if requested is not None and not _same(resolve_device(requested), device):
        raise DeviceMismatchError(
            f"{what} was asked to run on {resolve_device(requested)} but the model lives on {device}: the "
            "model's device decides; load it there (load_vlm(..., device=...)) or move it (vlm.to(device))"
        )
    return device


@contextlib.contextmanager
def _ieee_convolutions() -> Iterator[None]:
    """cuDNN convolutions in IEEE float32 for the duration (torch's default for them is TF32)."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):  # torch >= 2.9's precision API
        owner, attr, ieee = conv, "fp32_precision", "ieee"
    else:
        owner, attr, ieee = torch.backends.cudnn, "allow_tf32", False
    before = getattr(owner, attr)
    setattr(owner, attr, ieee)
    try:
        yield
    finally:
        setattr(owner, attr, before)


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """AMP on CUDA for bf16/fp16; exact float32 on CUDA for fp32; nothing to do on the CPU (CPU autocast
    buys little for ViTs)."""
    if device.type == "cuda" and precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cuda":
        return _ieee_convolutions()
    return contextlib.nullcontext()


def loader_workers(setting: int | str, device: torch.device) -> int:
    """DataLoader worker processes: ``auto`` is one per CPU core left beside the main process (at most 16)
    when a GPU encodes, and none on the CPU, where decoding would compete with the model for the cores."""
    if setting != "auto":
        return int(setting)
    if device.type != "cuda":
        return 0
    return max(1, min(16, len(os.sched_getaffinity(0)) - 1))


def largest_fitting_batch(run: Callable[[int], Any], start: int = 64, cap: int = 2048) -> int:
    """The largest of start, 2 start, 4 start, ... <= cap for which ``run(batch)`` does not run out of CUDA
    memory (``run`` encodes a dummy batch of that size)."""
    best, batch = None, start
    while batch <= cap:
        try:
            run(batch)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            break
        best, batch = batch, 2 * batch
    if best is None:
        raise UqvlmError(f"not even a batch of {start} fits in the GPU's memory; set model.batch_size lower")
    return best


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
