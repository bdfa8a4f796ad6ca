"""Loader for the published BayesVLM KFAC factors (../shared/reference-hessians)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["load_published_factors", "FACTOR_FILES", "PRIOR_FILE"]

FACTOR_FILES = {
    "A_img": "A_img_analytic.pt",
    "B_img": "B_img_analytic.pt",
    "A_txt": "A_txt_analytic.pt",
    "B_txt": "B_txt_analytic.pt",
}
PRIOR_FILE = "prior_precision_analytic.json"


def _hint(directory: Path) -> str:
    if not directory.is_dir():
        return ""
    found = sorted(str(p.parent) for p in directory.glob(f"*/{FACTOR_FILES['A_img']}"))
    return f" (found factor files in: {', '.join(found)})" if found else ""


def _load_matrix(path: Path, key: str) -> Tensor:
    # The files were saved from CUDA tensors: map to CPU so they load on any machine.
    t = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(t, Tensor):
        raise ValueError(f"{path} holds a {type(t).__name__}, expected a tensor for {key}")
    if t.ndim != 2 or t.shape[0] != t.shape[1]:
        raise ValueError(f"{path}: {key} must be a square matrix, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{path}: {key} contains NaN or Inf")
    return t.to(torch.float64)


def load_published_factors(directory: str | Path) -> dict[str, Any]:
    """Read the published KFAC factors and prior precisions from ``directory``.

    Returns {A_img, B_img, A_txt, B_txt: float64 [.., ..] tensors (as stored: 1/sqrt(N)-normalised,
    not symmetrised), lambda_img, lambda_txt: float, n_img, n_txt: float (the n they were found with,
    1.0 if the JSON does not say)}. The lambdas are optima of the published ("reference") evidence
    variant, not of the exact Laplace evidence.
    """
    directory = Path(directory)
    missing = [name for name in (*FACTOR_FILES.values(), PRIOR_FILE) if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: missing {', '.join(missing)}{_hint(directory)}")

    out: dict[str, Any] = {key: _load_matrix(directory / name, key) for key, name in FACTOR_FILES.items()}
    if out["B_img"].shape != out["B_txt"].shape:
        raise ValueError(
            f"B_img {tuple(out['B_img'].shape)} and B_txt {tuple(out['B_txt'].shape)} must share the "
            "embedding dimension"
        )

    try:
        prior = json.loads((directory / PRIOR_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{directory / PRIOR_FILE} is not valid JSON: {err}") from err
    for key in ("lambda_img", "lambda_txt"):
        if key not in prior:
            raise ValueError(f"{directory / PRIOR_FILE} has no {key!r}")
        value = float(prior[key])
        if not value > 0:
            raise ValueError(f"{directory / PRIOR_FILE}: {key} must be positive, got {value}")
        out[key] = value
    out["n_img"] = float(prior.get("n_img", 1.0))
    out["n_txt"] = float(prior.get("n_txt", 1.0))
    return out
