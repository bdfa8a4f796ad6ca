"""Verdicts on the paper's claims from run records, and the one-page reproduction report.

Pure: records in, verdicts and markdown out. A **record** is a plain dict (JSON-serialisable)::

    {"claim": <claim id>, "run": <run id or path>, "setting": {<key>: <value>, ...},
     "measured": {...}}          # the claim's own schema, below

``setting`` says what was run (``model``, ``pretrained``, ``dataset``, ``n``, ``prior_precision``,
``predictive``, ``ece_bins``, ...); it is shown, and used to find the run matching the published
reference. ``measured`` per claim (metric names as :func:`uqvlm.metrics.evaluate_log_probs`):

- ``zero_shot_calibration`` (one record per model x shifted dataset):
  ``{"map": {"acc", "nll", "ece"}, "bayesvlm": {"acc", "nll", "ece"}}``
- ``active_learning`` (one record per setting x budget): ``{"budget": int, "metric": "acc" | "nll" |
  "ece", "random": {"mean", "lo", "hi"}, "bald": {...}, "epig": {...}}`` with lo/hi the 95% interval
  over seeds; at least one of bald, epig.
- ``overhead`` (one record per model): ``{"runtime_overhead": float, "flops_overhead": float}``, extra
  cost over the deterministic model as fractions (0.03 = 3%).
- ``corruption`` (one record per model x dataset): ``{"std": [...], "mean_similarity": [...],
  "similarity_variance": [...]}`` per noise level (:func:`uqvlm.studies.corruption.similarity_stats`).
- ``proxy_data`` (one record per model x dataset): ``{"in_distribution": {"nll", "ece"},
  "proxy": {"nll", "ece"}}``: the same evaluation with a Hessian from in-distribution data and from
  proxy (e.g. LAION) data.

A claim with no record gets "not run: inputs missing". Thresholds are the constants below.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CLAIMS",
    "PUBLISHED_FOOD101_CLIP_B32",
    "VERDICTS",
    "Verdict",
    "decide",
    "reference_rows",
    "render_reproduction_md",
]

HOLDS, WEAK, FAILS, MISSING = "holds", "holds weakly", "does not hold", "not run: inputs missing"
VERDICTS = (HOLDS, WEAK, FAILS, MISSING)

# ---- zero-shot calibration. "At equal accuracy": BayesVLM may lose at most 1 accuracy point (the
# probit rescaling can re-rank close classes; the paper's tables move by tenths of a point). A clear
# improvement lowers the NLL by >= 1% of MAP's (published Food-101 row: 3.5%) and the 20-bin ECE by
# >= 0.005 absolute (about the sampling noise of ECE on a few thousand test images; published: 0.030).
# "Holds" needs a clear improvement on more than half the datasets; "holds weakly" only both metrics
# lower (any amount) on more than half.
CAL_ACC_TOLERANCE = 0.01
CAL_NLL_MARGIN_REL = 0.01
CAL_ECE_MARGIN_ABS = 0.005

# ---- active learning: "holds" when at some budget BALD or EPIG has its mean beyond random's 95%
# interval on the better side, and neither is ever beyond it on the worse side; "holds weakly" when
# the better of the two has a better mean than random at more than half the budgets.
AL_STRATEGIES = ("bald", "epig")

# ---- overhead: the paper's bounds, as fractions; within OVERHEAD_WEAK_FACTOR times them is "holds
# weakly" (wall time on shared hardware moves by tens of percent between runs, and what counts as a
# FLOP differs between counters). Every record must satisfy the bound (the claim is for all models).
OVERHEAD_RUNTIME_BOUND = 0.05
OVERHEAD_FLOPS_BOUND = 0.0011
OVERHEAD_WEAK_FACTOR = 2.0

# ---- corruption: "holds" when in every record the mean similarity strictly falls and its variance
# strictly rises from each noise level to the next; "holds weakly" when in every record the highest
# noise level is on the right side of the lowest for both (a trend, not monotone).

# ---- proxy data: one-sided (a proxy Hessian that calibrates better is no counterexample). "Holds"
# when in every record the proxy's NLL exceeds the in-distribution one by <= 2% of it and its ECE by
# <= 0.01; "holds weakly" within PROXY_WEAK_FACTOR times these.
PROXY_NLL_REL_TOL = 0.02
PROXY_ECE_ABS_TOL = 0.01
PROXY_WEAK_FACTOR = 2.0

CLAIMS: dict[str, str] = {
    "zero_shot_calibration": "lower NLL and ECE than the deterministic model at equal accuracy on shifted "
    "zero-shot data",
    "active_learning": "BALD / EPIG with BayesVLM are more sample-efficient than random selection",
    "overhead": "< 5% runtime and < 0.11% GFLOPs over the deterministic model",
    "corruption": "with stronger pixel noise the true-class mean similarity falls and its variance rises",
    "proxy_data": "a Hessian from proxy data calibrates as well as one from in-distribution data",
}

# The published notebook's Food-101 numbers (AaltoML/BayesVLM, CLIP ViT-B/32 laion2b_s34b_b79k).
PUBLISHED_FOOD101_CLIP_B32: dict[str, Any] = {
    "source": "AaltoML/BayesVLM notebook, Food-101, CLIP ViT-B/32 laion2b_s34b_b79k",
    "setting": {
        "model": "ViT-B-32",
        "pretrained": "laion2b_s34b_b79k",
        "dataset": "food101",
        "n": 10,
        "lambda_img": 2997.875,
        "lambda_txt": 2538.091,
        "predictive": "probit",
        "ece_bins": 20,
    },
    "map": {"acc": 0.80083, "nll": 0.70533, "ece": 0.03872},
    "bayesvlm": {"acc": 0.80317, "nll": 0.68084, "ece": 0.00829},
}
# Setting keys that identify the reference run (the rest are compared and differences reported).
_REFERENCE_KEYS = ("model", "pretrained", "dataset")


@dataclass(frozen=True)
class Verdict:
    """One row of the report: the claim, what the paper says, a one-line summary of what we measured,
    the runs and settings behind it, and the verdict (one of :data:`VERDICTS`)."""

    claim: str
    paper_says: str
    measured: str
    runs: tuple[str, ...]
    setting: str
    verdict: str


# ------------------------------------------------------------------------------------- validation


def _number(path: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{path} must be a finite number, got {value!r}")
    return float(value)


def _field(path: str, d: Any, key: str) -> Any:
    if not isinstance(d, Mapping):
        raise ValueError(f"{path} must be a dict, got {type(d).__name__}")
    if key not in d:
        raise ValueError(f"{path}.{key} is missing")
    return d[key]


def _metrics(path: str, d: Any, keys: Iterable[str]) -> dict[str, float]:
    return {k: _number(f"{path}.{k}", _field(path, d, k)) for k in keys}


def _check_record(i: int, r: Any) -> None:
    path = f"records[{i}]"
    claim = _field(path, r, "claim")
    if claim not in CLAIMS:
        raise ValueError(f"{path}.claim is {claim!r}; known claims: {', '.join(CLAIMS)}")
    if not isinstance(_field(path, r, "run"), str):
        raise ValueError(f"{path}.run must be a string")
    if not isinstance(_field(path, r, "setting"), Mapping):
        raise ValueError(f"{path}.setting must be a dict")
    _field(path, r, "measured")


# ------------------------------------------------------------------------------------ per claim


def _calibration(records: list[tuple[str, Mapping]]) -> tuple[str, str]:
    clear = direction = 0
    for path, m in records:
        a = _metrics(f"{path}.map", _field(path, m, "map"), ("acc", "nll", "ece"))
        b = _metrics(f"{path}.bayesvlm", _field(path, m, "bayesvlm"), ("acc", "nll", "ece"))
        if b["acc"] < a["acc"] - CAL_ACC_TOLERANCE:
            continue
        if b["nll"] < a["nll"] and b["ece"] < a["ece"]:
            direction += 1
            if (
                a["nll"] - b["nll"] >= CAL_NLL_MARGIN_REL * a["nll"]
                and a["ece"] - b["ece"] >= CAL_ECE_MARGIN_ABS
            ):
                clear += 1
    n = len(records)
    verdict = HOLDS if 2 * clear > n else WEAK if 2 * direction > n else FAILS
    return verdict, f"NLL and ECE clearly lower on {clear}/{n}, lower on {direction}/{n} (accuracy kept)"


def _active(records: list[tuple[str, Mapping]]) -> tuple[str, str]:
    beyond = worse = better_mean = 0
    for path, m in records:
        metric = _field(path, m, "metric")
        if metric not in ("acc", "nll", "ece"):
            raise ValueError(f"{path}.metric must be 'acc', 'nll' or 'ece', got {metric!r}")
        sign = 1.0 if metric == "acc" else -1.0  # compare sign * value: higher is better
        rnd = _metrics(f"{path}.random", _field(path, m, "random"), ("mean", "lo", "hi"))
        hi, lo = max(sign * rnd["lo"], sign * rnd["hi"]), min(sign * rnd["lo"], sign * rnd["hi"])
        present = [s for s in AL_STRATEGIES if s in m]
        if not present:
            raise ValueError(f"{path} has none of {AL_STRATEGIES}")
        means = [sign * _metrics(f"{path}.{s}", m[s], ("mean",))["mean"] for s in present]
        beyond += any(x > hi for x in means)
        worse += any(x < lo for x in means)
        better_mean += max(means) > sign * rnd["mean"]
    n = len(records)
    verdict = HOLDS if beyond and not worse else WEAK if 2 * better_mean > n else FAILS
    return verdict, (
        f"BALD/EPIG beyond random's 95% interval at {beyond}/{n} budgets (worse at {worse}); "
        f"better mean at {better_mean}/{n}"
    )


def _overhead(records: list[tuple[str, Mapping]]) -> tuple[str, str]:
    runtime = max(_number(f"{p}.runtime_overhead", _field(p, m, "runtime_overhead")) for p, m in records)
    flops = max(_number(f"{p}.flops_overhead", _field(p, m, "flops_overhead")) for p, m in records)
    if runtime <= OVERHEAD_RUNTIME_BOUND and flops <= OVERHEAD_FLOPS_BOUND:
        verdict = HOLDS
    elif (
        runtime <= OVERHEAD_WEAK_FACTOR * OVERHEAD_RUNTIME_BOUND
        and flops <= OVERHEAD_WEAK_FACTOR * OVERHEAD_FLOPS_BOUND
    ):
        verdict = WEAK
    else:
        verdict = FAILS
    return verdict, f"runtime +{runtime:.1%}, FLOPs +{flops:.3%} (worst of {len(records)})"


def _corruption(records: list[tuple[str, Mapping]]) -> tuple[str, str]:
    monotone = trend = 0
    for path, m in records:
        curves = {k: _field(path, m, k) for k in ("std", "mean_similarity", "similarity_variance")}
        lengths = {len(v) if isinstance(v, Sequence) else -1 for v in curves.values()}
        if len(lengths) != 1 or min(lengths) < 2:
            raise ValueError(
                f"{path}: std, mean_similarity, similarity_variance must be lists of one length >= 2"
            )
        columns = {k: [_number(f"{path}.{k}[{j}]", x) for j, x in enumerate(v)] for k, v in curves.items()}
        rows = sorted(
            zip(columns["std"], columns["mean_similarity"], columns["similarity_variance"], strict=True)
        )
        mean, var = [r[1] for r in rows], [r[2] for r in rows]
        pairs = list(zip(rows, rows[1:], strict=False))
        monotone += all(b[1] < a[1] and b[2] > a[2] for a, b in pairs)
        trend += mean[-1] < mean[0] and var[-1] > var[0]
    n = len(records)
    verdict = HOLDS if monotone == n else WEAK if trend == n else FAILS
    return (
        verdict,
        f"mean falls and variance rises monotonically in {monotone}/{n}, from first to last level in {trend}/{n}",
    )


def _proxy(records: list[tuple[str, Mapping]]) -> tuple[str, str]:
    worst_nll = worst_ece = -math.inf
    for path, m in records:
        ind = _metrics(f"{path}.in_distribution", _field(path, m, "in_distribution"), ("nll", "ece"))
        prx = _metrics(f"{path}.proxy", _field(path, m, "proxy"), ("nll", "ece"))
        worst_nll = max(worst_nll, (prx["nll"] - ind["nll"]) / abs(ind["nll"]))
        worst_ece = max(worst_ece, prx["ece"] - ind["ece"])
    if worst_nll <= PROXY_NLL_REL_TOL and worst_ece <= PROXY_ECE_ABS_TOL:
        verdict = HOLDS
    elif (
        worst_nll <= PROXY_WEAK_FACTOR * PROXY_NLL_REL_TOL
        and worst_ece <= PROXY_WEAK_FACTOR * PROXY_ECE_ABS_TOL
    ):
        verdict = WEAK
    else:
        verdict = FAILS
    return (
        verdict,
        f"proxy minus in-distribution, worst of {len(records)}: NLL {worst_nll:+.1%}, ECE {worst_ece:+.3f}",
    )


_DECIDERS = {
    "zero_shot_calibration": _calibration,
    "active_learning": _active,
    "overhead": _overhead,
    "corruption": _corruption,
    "proxy_data": _proxy,
}


def _fmt(value: Any) -> str:
    return f"{value:.7g}" if isinstance(value, float) else str(value)


def _summarise_settings(settings: Sequence[Mapping[str, Any]]) -> str:
    """``k=v`` for keys equal in every setting, ``k in {a, b}`` for keys that vary (missing: ``-``)."""
    keys = list(dict.fromkeys(k for s in settings for k in s))
    parts = []
    for k in keys:
        values = list(dict.fromkeys(_fmt(s.get(k, "-")) for s in settings))
        parts.append(f"{k}={values[0]}" if len(values) == 1 else f"{k} in {{{', '.join(values)}}}")
    return ", ".join(parts)


def decide(records: Sequence[Mapping[str, Any]]) -> list[Verdict]:
    """A verdict for every claim of :data:`CLAIMS`, in that order, from ``records`` (see the module doc).

    Raises ValueError naming the first malformed field (``records[3].measured.map.nll is missing``).
    """
    for i, r in enumerate(records):
        _check_record(i, r)
    out = []
    for claim, paper_says in CLAIMS.items():
        mine = [(i, r) for i, r in enumerate(records) if r["claim"] == claim]
        if not mine:
            out.append(Verdict(claim, paper_says, "-", (), "-", MISSING))
            continue
        verdict, measured = _DECIDERS[claim]([(f"records[{i}].measured", r["measured"]) for i, r in mine])
        runs = tuple(dict.fromkeys(r["run"] for _, r in mine))
        out.append(
            Verdict(
                claim,
                paper_says,
                measured,
                runs,
                _summarise_settings([r["setting"] for _, r in mine]),
                verdict,
            )
        )
    return out


# -------------------------------------------------------------------------------------- reference


def _normalise(value: Any) -> str:
    return str(value).strip().lower().replace("/", "-").replace("_", "").replace(" ", "")


def reference_rows(
    records: Sequence[Mapping[str, Any]], reference: Mapping[str, Any] = PUBLISHED_FOOD101_CLIP_B32
) -> list[dict[str, Any]]:
    """Ours vs published, one row per (method, metric), from the first ``zero_shot_calibration`` record
    whose setting matches the reference's model, pretrained tag and dataset (case, ``/`` vs ``-`` and
    ``_`` ignored); [] when no run matches. Each row: method, metric, published, ours, difference (ours -
    published), run, and ``setting_differences``: the other reference setting keys where the run differs
    (``n=4 (published 10)``; a key the run does not record counts as different)."""
    ref_setting = reference["setting"]
    for r in records:
        setting = r.get("setting", {})
        if r.get("claim") != "zero_shot_calibration" or not all(
            _normalise(setting.get(k)) == _normalise(ref_setting[k]) for k in _REFERENCE_KEYS
        ):
            continue
        diffs = [
            f"{k}={_fmt(setting.get(k, 'not recorded'))} (published {_fmt(v)})"
            for k, v in ref_setting.items()
            if k not in _REFERENCE_KEYS and _fmt(setting.get(k, "not recorded")) != _fmt(v)
        ]
        rows = []
        for method in ("map", "bayesvlm"):
            for metric in ("acc", "nll", "ece"):
                ours = _number(f"{r['run']}.measured.{method}.{metric}", r["measured"][method][metric])
                published = reference[method][metric]
                rows.append(
                    {
                        "method": method,
                        "metric": metric,
                        "published": published,
                        "ours": ours,
                        "difference": ours - published,
                        "run": r["run"],
                        "setting_differences": diffs,
                    }
                )
        return rows
    return []


# ----------------------------------------------------------------------------------------- render


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_reproduction_md(
    verdicts: Sequence[Verdict],
    reference: Sequence[Mapping[str, Any]] = (),
    source: str = PUBLISHED_FOOD101_CLIP_B32["source"],
) -> str:
    """The one-page report: the claims table, the published reference comparison (or a line saying no
    matching run exists) and the thresholds behind the verdicts."""
    lines = [
        "# Reproduction of BayesVLM (arXiv 2412.06014)",
        "",
        "| claim | paper says | we measured | run | setting | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for v in verdicts:
        runs = ", ".join(v.runs) if v.runs else "-"
        lines.append(
            "| "
            + " | ".join(
                _cell(x) for x in (v.claim, v.paper_says, v.measured, runs, v.setting, f"**{v.verdict}**")
            )
            + " |"
        )
    lines += ["", f"## Published reference: {source}", ""]
    if not reference:
        lines.append("No run matches the reference setting (model, pretrained tag, dataset).")
    else:
        lines += ["| method | metric | published | ours | ours - published |", "|---|---|---|---|---|"]
        for row in reference:
            lines.append(
                f"| {row['method']} | {row['metric']} | {row['published']:.5f} | {row['ours']:.5f} | "
                f"{row['difference']:+.5f} |"
            )
        diffs = reference[0]["setting_differences"]
        lines += [
            "",
            f"Run: {_cell(reference[0]['run'])}. "
            + ("Settings as published." if not diffs else "Settings that differ: " + "; ".join(diffs) + "."),
        ]
    lines += [
        "",
        "## Thresholds",
        "",
        f"- zero-shot calibration: BayesVLM accuracy >= MAP - {CAL_ACC_TOLERANCE}; clear = NLL lower by >= "
        f"{CAL_NLL_MARGIN_REL:.0%} of MAP's and ECE by >= {CAL_ECE_MARGIN_ABS}; holds if clear on more than half "
        "the datasets, weakly if both merely lower on more than half.",
        "- active learning: holds if BALD or EPIG has its mean beyond random's 95% interval at some budget and "
        "never on the worse side; weakly if the better of them beats random's mean at more than half the budgets.",
        f"- overhead: holds if runtime <= {OVERHEAD_RUNTIME_BOUND:.0%} and FLOPs <= {OVERHEAD_FLOPS_BOUND:.2%} "
        f"for every model; weakly within {OVERHEAD_WEAK_FACTOR:g}x.",
        "- corruption: holds if the mean similarity strictly falls and its variance strictly rises level by level "
        "in every curve; weakly if, in every curve, at least the highest level is on the right side of the lowest.",
        f"- proxy data: holds if proxy NLL <= in-distribution NLL + {PROXY_NLL_REL_TOL:.0%} and ECE <= + "
        f"{PROXY_ECE_ABS_TOL} in every record; weakly within {PROXY_WEAK_FACTOR:g}x.",
        "",
    ]
    return "\n".join(lines)
