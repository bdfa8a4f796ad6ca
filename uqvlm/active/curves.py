"""Learning curves of active learning: per strategy and budget, the mean over seeds with a 95% t-interval,
and which strategies beat random beyond those intervals.

Pure functions on the rows of a run (one row per strategy, budget and seed; see
``uqvlm.tasks.active_learning``). The interval is Student's t for the mean of the seeds' values,
mean +- t_(0.975, n-1) s / sqrt(n) with s the sample standard deviation (ddof 1): the seeds are treated as
independent draws of a selection and fine-tune (a seed fixes the random strategies' draws and the
fine-tuning shuffles). A deterministic row (zero-shot, one value) has a degenerate interval, the value
itself; a strategy run with a single seed has none (NaN).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import stats

__all__ = [
    "LEVEL",
    "METRICS",
    "ZERO_SHOT",
    "aggregate",
    "beats_random",
    "comparison_lines",
    "t_interval",
]

LEVEL = 0.95
ZERO_SHOT = "zero-shot"
# Row metrics summarised per strategy and budget: the BayesVLM predictive's, then the MAP predictive's.
METRICS = ("acc", "nll", "ece", "map_acc", "map_nll", "map_ece")
# Lower is better for these (accuracy: higher).
LOWER_IS_BETTER = ("nll", "ece", "map_nll", "map_ece")


def t_interval(values: Iterable[float], level: float = LEVEL) -> tuple[float, float, float]:
    """(mean, lower, upper) of the ``level`` Student-t interval for the mean of ``values``; (nan, nan, nan)
    for no values, (x, nan, nan) for one."""
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + level / 2, df=x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def table_columns(metrics: Sequence[str] = METRICS) -> list[str]:
    cols = ["strategy", "budget", "seeds"]
    for m in metrics:
        cols += [f"{m}_mean", f"{m}_lo", f"{m}_hi"]
    return cols


def aggregate(rows: pd.DataFrame, order: Sequence[str] = (), level: float = LEVEL) -> pd.DataFrame:
    """Per (strategy, budget): the number of seeds and, for every metric, the mean and the ``level``
    t-interval over them (``<metric>_mean``, ``_lo``, ``_hi``). The zero-shot row's interval is its
    value. Rows come in ``order`` of strategies (zero-shot first), then by budget."""
    records = []
    for (strategy, budget), g in rows.groupby(["strategy", "budget"], sort=False):
        rec: dict[str, object] = {
            "strategy": strategy,
            "budget": int(budget),
            "seeds": int(g["seed"].nunique()),
        }
        for m in METRICS:
            mean, lo, hi = t_interval(g[m], level)
            if strategy == ZERO_SHOT:
                lo = hi = mean  # one deterministic value: no spread over seeds
            rec.update({f"{m}_mean": mean, f"{m}_lo": lo, f"{m}_hi": hi})
        records.append(rec)
    table = pd.DataFrame.from_records(records, columns=table_columns())
    rank = {s: i for i, s in enumerate([ZERO_SHOT, *order])}
    table["_o"] = table["strategy"].map(lambda s: rank.get(s, len(rank)))
    return table.sort_values(["_o", "budget"], kind="stable").drop(columns="_o").reset_index(drop=True)


def beats_random(table: pd.DataFrame, metric: str, baseline: str = "random") -> pd.DataFrame:
    """Every strategy and budget against ``baseline`` at the same budget on ``metric``: ``better`` when its
    interval lies entirely on the better side of the baseline's (above for accuracy, below for NLL and
    ECE), ``worse`` when entirely on the other side, ``overlap`` otherwise (or without intervals).
    Columns: strategy, budget, verdict, and both means."""
    lower = metric in LOWER_IS_BETTER
    base = table[table.strategy == baseline].set_index("budget")
    out = []
    for row in table[(table.strategy != baseline) & (table.strategy != ZERO_SHOT)].itertuples():
        if row.budget not in base.index:
            continue
        ref = base.loc[row.budget]
        lo, hi = getattr(row, f"{metric}_lo"), getattr(row, f"{metric}_hi")
        ref_lo, ref_hi = ref[f"{metric}_lo"], ref[f"{metric}_hi"]
        above, below = lo > ref_hi, hi < ref_lo  # False when any bound is NaN
        verdict = "overlap"
        if above or below:
            verdict = "better" if below == lower else "worse"
        out.append(
            {
                "strategy": row.strategy,
                "budget": row.budget,
                "verdict": verdict,
                "mean": getattr(row, f"{metric}_mean"),
                "baseline_mean": ref[f"{metric}_mean"],
            }
        )
    return pd.DataFrame(out, columns=["strategy", "budget", "verdict", "mean", "baseline_mean"])


def _budgets(frame: pd.DataFrame) -> str:
    return ", ".join(str(int(b)) for b in frame.budget)


def comparison_lines(table: pd.DataFrame, metric: str, label: str, baseline: str = "random") -> list[str]:
    """Markdown bullets: per strategy, the budgets where it beats ``baseline`` beyond the intervals on
    ``metric`` (and where it falls below them), in plain words."""
    verdicts = beats_random(table, metric, baseline)
    if verdicts.empty:
        return [f"- {label}: no {baseline} rows to compare with."]
    lines = []
    for strategy, g in verdicts.groupby("strategy", sort=False):
        better, worse = g[g.verdict == "better"], g[g.verdict == "worse"]
        parts = [f"better than {baseline} at budgets {_budgets(better)}" if len(better) else "never better"]
        if len(worse):
            parts.append(f"worse at {_budgets(worse)}")
        lines.append(f"- {label}, `{strategy}`: {'; '.join(parts)}.")
    return lines
