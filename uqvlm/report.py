"""``uqvlm report``: gather every run record under results/ into the paper's tables.

Zero-shot: one table per metric with rows (model, method) and one column per dataset, written as CSV,
Markdown and LaTeX, plus the long table of every run (sweeps included: one row per config hash and
method, with the swept posterior settings as columns). A row that used labels of the evaluated dataset
(a method fitted on its validation split, or settings a sweep chose by a validation objective) is
named ``<method> (val labels)`` in the per-metric tables, so it never reads as a label-free result.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from uqvlm.cache import atomic_write
from uqvlm.console import console
from uqvlm.metrics import METRIC_COLUMNS

LABELS_MARK = " (val labels)"

# What a sweep usually varies; shown as columns of the long table (``posterior_n``: the rows' own ``n``
# is the number of evaluated images).
SETTING_KEYS = {
    "posterior_n": ("posterior", "n"),
    "prior_precision": ("posterior", "prior_precision"),
    "evidence_variant": ("posterior", "evidence_variant"),
    "hessian_data": ("hessian_data", "name"),
    "seed": ("seed",),
}


def _get(config: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(config, dict) or key not in config:
            return None
        config = config[key]
    return config


def collect_zeroshot(results_dir: str | Path) -> pd.DataFrame:
    """One row per (run record, method) of every zero-shot run under ``results_dir``."""
    rows = []
    # Oldest first, so "the latest run wins" below means the most recently finished one.
    for path in sorted(Path(results_dir).glob("zeroshot/*/runs/*.json"), key=lambda p: p.stat().st_mtime):
        record = json.loads(path.read_text())
        config = record["config"]
        settings = {name: _get(config, keys) for name, keys in SETTING_KEYS.items()}
        provenance = record.get("provenance") or {}
        label_use = provenance.get("label_use") or {}
        for row in record["rows"]:
            rows.append(
                {
                    "dataset": config["dataset"]["name"],
                    "model": config["model"]["name"],
                    **row,
                    **settings,
                    "label_use": label_use.get(row["method"]),
                    "objective": provenance.get("objective"),
                    "config_hash": record["config_hash"],
                }
            )
    return pd.DataFrame(rows)


def table_method(method: str, uses_labels: bool) -> str:
    """The method's name in the per-metric tables: marked when it used labels of the evaluated dataset."""
    return f"{method}{LABELS_MARK}" if uses_labels else method


def chosen_rows(long: pd.DataFrame) -> pd.DataFrame:
    """One row per (dataset, model, method, label use): the latest run's; among label-using rows that
    a sweep scored by its validation objective, the lowest objective's (the sweep's choice)."""
    uses_labels = long["uses_labels"].fillna(False).astype(bool)
    objective = pd.to_numeric(long["objective"], errors="coerce")
    ranked = long.assign(
        uses_labels=uses_labels,
        _scored=uses_labels & objective.notna(),
        _objective=objective,
        _order=range(len(long)),
    )
    # Kept last: the scored row with the lowest objective, else the most recent row.
    ranked = ranked.sort_values(["_scored", "_objective", "_order"], ascending=[True, False, True])
    chosen = ranked.drop_duplicates(["dataset", "model", "method", "uses_labels"], keep="last")
    return chosen.sort_values("_order").drop(columns=["_scored", "_objective", "_order"])


def zeroshot_tables(long: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per metric: rows (model, method), columns datasets; label-using rows carry ``(val labels)``."""
    if long.empty:
        return {}
    chosen = chosen_rows(long)
    order = list(dict.fromkeys(long["method"]))
    chosen = chosen.assign(
        _rank=[(order.index(m), u) for m, u in zip(chosen["method"], chosen["uses_labels"], strict=True)],
        method=[table_method(m, u) for m, u in zip(chosen["method"], chosen["uses_labels"], strict=True)],
    )
    rank = dict(zip(zip(chosen["model"], chosen["method"], strict=True), chosen["_rank"], strict=True))
    tables = {}
    for metric in METRIC_COLUMNS:
        table = chosen.pivot_table(
            index=["model", "method"], columns="dataset", values=metric, aggfunc="first"
        )
        table = table.reindex(sorted(table.index, key=lambda mm: (mm[0], rank[mm])))
        table.columns.name = None
        tables[metric] = table.reset_index()
    return tables


def _write_table(table: pd.DataFrame, stem: Path, caption: str) -> None:
    with atomic_write(stem.with_suffix(".csv"), "w") as f:
        table.to_csv(f, index=False, float_format="%.5f")
    with atomic_write(stem.with_suffix(".md"), "w") as f:
        f.write(f"**{caption}**\n\n" + table.to_markdown(index=False, floatfmt=".4f") + "\n")
    with atomic_write(stem.with_suffix(".tex"), "w") as f:
        f.write(table.to_latex(index=False, float_format="%.4f", caption=caption, na_rep="--"))


def write_report(results_dir: str | Path = "results", out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write the aggregated tables to ``out_dir`` (default ``<results_dir>/tables``) and the reproduction
    report ``<results_dir>/REPRODUCTION.md`` (:mod:`uqvlm.reproduction`); return the paths."""
    from uqvlm.reproduction import write_reproduction

    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir else results_dir / "tables"
    written = {"reproduction": write_reproduction(results_dir)}
    console.print(f"reproduction report: {written['reproduction']}")
    long = collect_zeroshot(results_dir)
    if long.empty:
        console.print(f"[yellow]no zero-shot run records under {results_dir}/zeroshot/*/runs/[/]")
        return written
    out.mkdir(parents=True, exist_ok=True)
    long_path = out / "zeroshot_runs.csv"
    with atomic_write(long_path, "w") as f:
        long.to_csv(f, index=False, float_format="%.5f")
    written["runs"] = long_path
    for metric, table in zeroshot_tables(long).items():
        stem = out / f"zeroshot_{metric}"
        _write_table(table, stem, f"Zero-shot {metric} (rows: model, method; columns: dataset)")
        written[metric] = stem.with_suffix(".md")
    console.print(f"{len(long)} rows from {long['config_hash'].nunique()} runs -> {out}")
    return written
