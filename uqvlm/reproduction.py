"""``results/REPRODUCTION.md``: the paper's claims beside what our runs under ``results/`` measured.

This module reads the runs (zero-shot run records, active-learning tables and their per-seed rows, the
study tables) into the records of :mod:`uqvlm.studies.report`, whose pure functions decide the verdicts
and render the page. A claim none of whose inputs exist is reported as not run.

Where each claim's record comes from:

- zero-shot calibration: the latest zero-shot run per (model, weights, dataset) whose ``map`` and
  label-free ``bayesvlm-kfac`` rows exist; datasets of :data:`IN_DISTRIBUTION` are left out (the claim
  is about shifted data).
- active learning: per table under ``results/active_learning/``, per budget, accuracy of random (mean
  and 95% Student-t interval over seeds, from the table's ``acc_lo``/``acc_hi`` columns when it has them,
  else from the per-seed rows the task writes) against the means of BALD and EPIG.
- overhead, corruption, proxy data: the rows of the study tables under ``results/<study>/``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from uqvlm.cache import atomic_write
from uqvlm.studies.report import decide, reference_rows, render_reproduction_md

__all__ = [
    "IN_DISTRIBUTION",
    "active_learning_records",
    "calibration_records",
    "corruption_records",
    "overhead_records",
    "proxy_records",
    "reproduction_records",
    "t_interval",
    "write_reproduction",
]

# Evaluated datasets that are the model's own training distribution, not a shift: left out of the
# zero-shot calibration claim.
IN_DISTRIBUTION = {"shapes-photo": "the shapes world's clean domain, where the tiny CLIP was pretrained"}
# The study tables listed under "Further studies" (no claim of their own), by results subdirectory.
FURTHER_STUDIES = {
    "probcosine": "ProbCosine vs Monte Carlo over posterior widths",
    "hessian_size": "metrics and the evidence's lambda vs the number of Hessian pairs",
    "prior_grid": "NLL / ECE over n x lambda (heatmaps), the evidence's lambda marked",
    "uncertainty_error": "error rate per uncertainty bin before and after active learning",
}

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def _t975(df: int) -> float:
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion of the t quantile around the normal one (error < 1e-4 here)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Mean and two-sided 95% Student-t interval of the mean of ``values`` (at least two)."""
    n = len(values)
    if n < 2:
        raise ValueError(f"an interval needs at least two values, got {n}")
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = _t975(n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _records(directory: Path) -> Iterator[tuple[Path, dict]]:
    """The latest-result JSON of every table directly under each ``directory/*/`` (not ``runs/``)."""
    for path in sorted(directory.glob("*/*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and "rows" in record and "config" in record:
            yield path, record


def _run_id(path: Path, results_dir: Path) -> str:
    try:
        return str(path.relative_to(results_dir))
    except ValueError:
        return str(path)


def _get(config: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


# --------------------------------------------------------------------------------------- zero-shot
def calibration_records(results_dir: Path) -> list[dict]:
    """One record per (model, weights, dataset): the latest zero-shot run with MAP and label-free
    BayesVLM-KFAC rows, shifted datasets only."""
    paths = sorted(results_dir.glob("zeroshot/*/runs/*.json"), key=lambda p: (p.stat().st_mtime, str(p)))
    latest: dict[tuple, tuple[Path, dict]] = {}
    for path in paths:
        record = json.loads(path.read_text())
        config = record.get("config", {})
        rows = {r["method"]: r for r in record.get("rows", [])}
        dataset = _get(config, "dataset", "name")
        if "map" not in rows or "bayesvlm-kfac" not in rows or rows["bayesvlm-kfac"].get("uses_labels"):
            continue
        if dataset in IN_DISTRIBUTION:
            continue
        latest[(_get(config, "model", "name"), _get(config, "model", "pretrained"), dataset)] = (path, record)
    out = []
    for (model, pretrained, dataset), (path, record) in latest.items():
        config = record["config"]
        rows = {r["method"]: r for r in record["rows"]}
        lambdas = (_get(record, "provenance", "notes") or {}).get("prior_precision/kfac") or {}
        kfac = _get(config, "task", "methods", "bayesvlm-kfac") or {}
        setting = {
            "model": model,
            "pretrained": pretrained,
            "dataset": dataset,
            "hessian_data": _get(config, "hessian_data", "name"),
            "n": _get(config, "posterior", "n"),
            "prior_precision": _get(config, "posterior", "prior_precision"),
            "lambda_img": lambdas.get("image", "not recorded"),
            "lambda_txt": lambdas.get("text", "not recorded"),
            "predictive": kfac.get("predictive", "probit"),
            "ece_bins": _get(config, "task", "ece_bins"),
        }
        out.append(
            {
                "claim": "zero_shot_calibration",
                "run": _run_id(path, results_dir),
                "setting": setting,
                "measured": {
                    name: {k: rows[method][k] for k in ("acc", "nll", "ece")}
                    for name, method in (("map", "map"), ("bayesvlm", "bayesvlm-kfac"))
                },
            }
        )
    return out


# ------------------------------------------------------------------------------------ active learning
def _seed_rows(table_path: Path, record: dict) -> pd.DataFrame | None:
    """The per-seed rows of an active-learning table: its record's ``job_rows`` setup directory, found
    under the table's own ``<model>.rows/`` (the recorded path is relative to where the run ran)."""
    setup = _get(record, "provenance", "job_rows")
    base = table_path.parent / f"{table_path.stem}.rows"
    candidates = [base / Path(setup).name] if setup else []
    candidates += (
        sorted(base.glob("*"), key=lambda p: p.stat().st_mtime, reverse=True) if base.is_dir() else []
    )
    for directory in candidates:
        files = sorted(directory.glob("*.csv"))
        if files:
            rows = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
            if "finished" in rows:
                rows = rows.sort_values("finished", kind="stable")
            return rows.drop_duplicates(["strategy", "budget", "seed"], keep="last")
    return None


def active_learning_records(results_dir: Path, metric: str = "acc") -> list[dict]:
    """One record per (table, budget) where random has an interval (two or more seeds, or the table's
    ``<metric>_lo``/``<metric>_hi``) and BALD or EPIG ran."""
    out = []
    for path, record in _records(results_dir / "active_learning"):
        table = pd.DataFrame(record["rows"])
        if not {"strategy", "budget"} <= set(table.columns):
            continue
        seeds = _seed_rows(path, record)
        config = record["config"]
        setting = {
            "model": _get(config, "model", "name"),
            "data": path.parent.name,
            "n": _get(config, "posterior", "n"),
            "structure": _get(config, "task", "structure"),
            "predictive": _get(config, "task", "predictive") or _get(config, "posterior", "predictive"),
            "lr": _get(config, "task", "finetune", "lr"),
            "seeds": len(_get(config, "task", "seeds") or []),
        }
        for budget in sorted(set(table.loc[table["strategy"] == "random", "budget"])):
            at = table[table["budget"] == budget].set_index("strategy")
            means = {s: float(at.loc[s, f"{metric}_mean"]) for s in ("bald", "epig") if s in at.index}
            if not means:
                continue
            if {f"{metric}_lo", f"{metric}_hi"} <= set(at.columns):
                random = {
                    "mean": float(at.loc["random", f"{metric}_mean"]),
                    "lo": float(at.loc["random", f"{metric}_lo"]),
                    "hi": float(at.loc["random", f"{metric}_hi"]),
                }
            elif seeds is not None:
                values = seeds[(seeds["strategy"] == "random") & (seeds["budget"] == budget)][metric].tolist()
                if len(values) < 2:
                    continue
                mean, lo, hi = t_interval(values)
                random = {"mean": mean, "lo": lo, "hi": hi}
            else:
                continue
            out.append(
                {
                    "claim": "active_learning",
                    "run": _run_id(path, results_dir),
                    "setting": setting,
                    "measured": {
                        "budget": int(budget),
                        "metric": metric,
                        "random": random,
                        **{s: {"mean": m} for s, m in means.items()},
                    },
                }
            )
    return out


# ------------------------------------------------------------------------------------------- studies
def overhead_records(results_dir: Path) -> list[dict]:
    """One record per (model, device, K) of the overhead tables: wall time from pixels and FLOPs per
    image (the prompts' costs paid once)."""
    out = []
    for path, record in _records(results_dir / "overhead"):
        for row in record["rows"]:
            out.append(
                {
                    "claim": "overhead",
                    "run": _run_id(path, results_dir),
                    "setting": {
                        "model": row["model"],
                        "device": row["device"],
                        "batch": row["batch"],
                        "classes": row["classes"],
                    },
                    "measured": {
                        "runtime_overhead": row["runtime_overhead"],
                        "flops_overhead": row["flops_overhead"],
                    },
                }
            )
    return out


def corruption_records(results_dir: Path) -> list[dict]:
    """One record per corruption table: the true-class similarity's mean and variance per noise level."""
    out = []
    for path, record in _records(results_dir / "corruption"):
        rows = sorted(record["rows"], key=lambda r: r["std"])
        config = record["config"]
        out.append(
            {
                "claim": "corruption",
                "run": _run_id(path, results_dir),
                "setting": {
                    "model": _get(config, "model", "name"),
                    "dataset": _get(config, "dataset", "name"),
                    "structure": _get(config, "task", "structure"),
                    "n": _get(config, "posterior", "n"),
                },
                "measured": {
                    k: [r[k] for r in rows] for k in ("std", "mean_similarity", "similarity_variance")
                },
            }
        )
    return out


def proxy_records(results_dir: Path) -> list[dict]:
    """One record per (proxy table, structure): NLL and ECE with the in-distribution and the proxy
    Hessian."""
    out = []
    for path, record in _records(results_dir / "proxy_data"):
        config = record["config"]
        by_role: dict[str, dict[str, dict]] = {}
        for row in record["rows"]:
            if row.get("hessian_role"):
                by_role.setdefault(row["method"], {})[row["hessian_role"]] = row
        for method, roles in by_role.items():
            if not {"in_distribution", "proxy"} <= set(roles):
                continue
            out.append(
                {
                    "claim": "proxy_data",
                    "run": _run_id(path, results_dir),
                    "setting": {
                        "model": _get(config, "model", "name"),
                        "dataset": _get(config, "dataset", "name"),
                        "method": method,
                        "in_distribution": roles["in_distribution"]["hessian_data"],
                        "proxy": roles["proxy"]["hessian_data"],
                        "n": _get(config, "posterior", "n"),
                    },
                    "measured": {
                        role: {k: roles[role][k] for k in ("nll", "ece")}
                        for role in ("in_distribution", "proxy")
                    },
                }
            )
    return out


def reproduction_records(results_dir: str | Path) -> list[dict]:
    """Every claim's records from the runs under ``results_dir``."""
    results_dir = Path(results_dir)
    return [
        *calibration_records(results_dir),
        *active_learning_records(results_dir),
        *overhead_records(results_dir),
        *corruption_records(results_dir),
        *proxy_records(results_dir),
    ]


def _further_studies(results_dir: Path) -> list[str]:
    lines = []
    for study, what in FURTHER_STUDIES.items():
        tables = [_run_id(p.with_suffix(".md"), results_dir) for p, _ in _records(results_dir / study)]
        if tables:
            lines.append(f"- {study} ({what}): " + ", ".join(tables))
    return lines


def write_reproduction(results_dir: str | Path = "results") -> Path:
    """Write ``<results_dir>/REPRODUCTION.md`` from the runs under ``results_dir``; returns its path."""
    results_dir = Path(results_dir)
    records = reproduction_records(results_dir)
    text = render_reproduction_md(decide(records), reference_rows(records))
    further = _further_studies(results_dir)
    if further:
        text += "\n## Further studies (tables and figures, no claim to check)\n\n" + "\n".join(further) + "\n"
    excluded = ", ".join(f"{name} ({why})" for name, why in IN_DISTRIBUTION.items())
    text += f"\nLeft out of the zero-shot calibration claim as in-distribution: {excluded}.\n"
    path = results_dir / "REPRODUCTION.md"
    with atomic_write(path, "w") as f:
        f.write(text)
    return path
