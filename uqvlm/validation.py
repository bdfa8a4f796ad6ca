"""Input checks shared across uqvlm: clear errors that name the argument or the config key."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from uqvlm.errors import UqvlmError


def check_tensor(name: str, x: Any, ndim: int) -> Tensor:
    """``x`` as a finite floating-point tensor with ``ndim`` dimensions, else ValueError naming ``name``."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if not all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf")
    return x


def all_finite(x: Tensor) -> bool:
    """Whether every entry of the floating tensor ``x`` is finite, in one pass in the common case: the sum is
    finite only if every entry is (a NaN or an Inf makes it NaN or Inf); only a sum that is not (a bad
    entry, or an overflow of huge finite entries) is settled entry by entry."""
    if x.numel() == 0:
        return True
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


def _real(name: str, value: Any, error: type[Exception], expected: str) -> float:
    """A number or a one-element tensor as a float (bools and strings are refused)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise error(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be {expected}, got {value!r}")
    return float(value)


def check_finite(name: str, value: Any, error: type[Exception] = ValueError) -> float:
    """``value`` (a number or a one-element tensor) as a finite float, else ``error`` naming ``name``."""
    v = _real(name, value, error, "a finite number")
    if not math.isfinite(v):
        raise error(f"{name} must be a finite number, got {value!r}")
    return v


def check_positive(name: str, value: Any, error: type[Exception] = ValueError) -> float:
    """``value`` (a number or a one-element tensor) as a positive finite float, else ``error`` naming ``name``."""
    v = _real(name, value, error, "a positive finite number")
    if not math.isfinite(v) or v <= 0:
        raise error(f"{name} must be a positive finite number, got {value!r}")
    return v


def check_positive_int(name: str, value: Any, error: type[Exception] = ValueError) -> int:
    """``value`` as a positive int, else ``error`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise error(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[Any], error: type[Exception] = ValueError) -> Any:
    """``value`` if it is one of ``choices``, else ``error`` naming ``name`` and the choices."""
    choices = tuple(choices)
    if value not in choices:
        raise error(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def unknown_key_message(section: str, keys: Iterable[str], allowed: Iterable[str]) -> str:
    """``unknown key <section>.<key>; did you mean <section>.<closest>?`` for each of ``keys`` (the
    keys the section takes when none is close)."""
    allowed = sorted(allowed)
    prefix = f"{section}." if section else ""
    parts, unmatched = [], []
    for key in keys:
        close = difflib.get_close_matches(key, allowed, n=2)
        if close:
            parts.append(f"unknown key {prefix}{key}; did you mean {' or '.join(prefix + c for c in close)}?")
        else:
            unmatched.append(prefix + key)
    if unmatched:
        takes = ", ".join(allowed) or "no keys"
        plural = "s" if len(unmatched) > 1 else ""
        parts.append(f"unknown key{plural} {', '.join(unmatched)}; {section or 'the config'} takes {takes}")
    return "; ".join(parts)


def check_keys(section: str, keys: Iterable[str], allowed: Iterable[str]) -> None:
    """Refuse config keys that nothing reads (typos), each named with its closest allowed key."""
    allowed = set(allowed)
    unknown = [str(k) for k in keys if k not in allowed]
    if unknown:
        raise UqvlmError(unknown_key_message(section, unknown, allowed))
