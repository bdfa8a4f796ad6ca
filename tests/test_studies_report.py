"""Reproduction verdicts: every branch on synthetic records, the reference row and the markdown."""

from __future__ import annotations

import pytest

from uqvlm.studies.report import (
    CLAIMS,
    PUBLISHED_FOOD101_CLIP_B32,
    decide,
    reference_rows,
    render_reproduction_md,
)


def _verdict(records, claim):
    return next(v for v in decide(records) if v.claim == claim)


def _cal(run, map_, bayes, **setting):
    keys = ("acc", "nll", "ece")
    return {
        "claim": "zero_shot_calibration",
        "run": run,
        "setting": {"model": "ViT-B-32", "dataset": run, **setting},
        "measured": {
            "map": dict(zip(keys, map_, strict=True)),
            "bayesvlm": dict(zip(keys, bayes, strict=True)),
        },
    }


MAP = (0.80, 0.70, 0.040)
CLEAR = (0.80, 0.68, 0.010)  # NLL -2.9%, ECE -0.03
SMALL = (0.80, 0.699, 0.039)  # right direction, below the margins
WORSE = (0.80, 0.75, 0.060)
ACC_DROP = (0.75, 0.60, 0.005)  # better calibrated but 5 points less accurate


@pytest.mark.parametrize(
    "bayes, verdict",
    [
        ([CLEAR, CLEAR, WORSE], "holds"),
        ([CLEAR, SMALL, WORSE], "holds weakly"),
        ([SMALL, SMALL, CLEAR], "holds weakly"),
        ([CLEAR, WORSE, WORSE], "does not hold"),
        ([CLEAR, ACC_DROP, ACC_DROP], "does not hold"),
    ],
)
def test_calibration_verdicts(bayes, verdict):
    records = [_cal(f"d{i}", MAP, b) for i, b in enumerate(bayes)]
    assert _verdict(records, "zero_shot_calibration").verdict == verdict


def _al(budget, random, bald=None, epig=None, metric="acc"):
    m = {"budget": budget, "metric": metric, "random": dict(zip(("mean", "lo", "hi"), random, strict=True))}
    if bald is not None:
        m["bald"] = {"mean": bald}
    if epig is not None:
        m["epig"] = {"mean": epig}
    return {"claim": "active_learning", "run": f"al-{budget}", "setting": {"target": "art"}, "measured": m}


@pytest.mark.parametrize(
    "records, verdict",
    [
        ([_al(10, (0.5, 0.45, 0.55), bald=0.52), _al(20, (0.6, 0.55, 0.65), epig=0.70)], "holds"),
        # beyond at one budget but below random's interval at another: not "holds"
        (
            [
                _al(10, (0.5, 0.45, 0.55), bald=0.60),
                _al(20, (0.6, 0.55, 0.65), bald=0.50, epig=0.56),
                _al(30, (0.7, 0.65, 0.75), epig=0.72),
            ],
            "holds weakly",
        ),
        (
            [_al(10, (0.5, 0.45, 0.55), bald=0.52, epig=0.40), _al(20, (0.6, 0.55, 0.65), epig=0.62)],
            "holds weakly",
        ),
        ([_al(10, (0.5, 0.45, 0.55), bald=0.48), _al(20, (0.6, 0.55, 0.65), bald=0.62)], "does not hold"),
        # NLL: lower is better
        ([_al(10, (1.0, 0.9, 1.1), epig=0.8, metric="nll")], "holds"),
        ([_al(10, (1.0, 0.9, 1.1), epig=1.2, metric="nll")], "does not hold"),
    ],
)
def test_active_learning_verdicts(records, verdict):
    assert _verdict(records, "active_learning").verdict == verdict


@pytest.mark.parametrize(
    "overheads, verdict",
    [
        ([(0.03, 0.0008), (0.049, 0.0011)], "holds"),
        ([(0.03, 0.0008), (0.08, 0.0011)], "holds weakly"),
        ([(0.03, 0.0030), (0.02, 0.0001)], "does not hold"),
    ],
)
def test_overhead_verdicts(overheads, verdict):
    records = [
        {
            "claim": "overhead",
            "run": f"o{i}",
            "setting": {},
            "measured": {"runtime_overhead": r, "flops_overhead": f},
        }
        for i, (r, f) in enumerate(overheads)
    ]
    assert _verdict(records, "overhead").verdict == verdict


def _corr(std, mean, var):
    return {
        "claim": "corruption",
        "run": "c",
        "setting": {"dataset": "food101"},
        "measured": {"std": std, "mean_similarity": mean, "similarity_variance": var},
    }


@pytest.mark.parametrize(
    "records, verdict",
    [
        # levels given out of order are sorted by std first
        ([_corr([0.2, 0.0, 0.1], [0.20, 0.30, 0.25], [3e-4, 1e-4, 2e-4])], "holds"),
        ([_corr([0.0, 0.1, 0.2], [0.30, 0.31, 0.20], [1e-4, 2e-4, 3e-4])], "holds weakly"),
        (
            [_corr([0.0, 0.1], [0.30, 0.20], [1e-4, 2e-4]), _corr([0.0, 0.1], [0.30, 0.20], [2e-4, 1e-4])],
            "does not hold",
        ),
    ],
)
def test_corruption_verdicts(records, verdict):
    assert _verdict(records, "corruption").verdict == verdict


@pytest.mark.parametrize(
    "proxy, verdict",
    [
        ((0.71, 0.045), "holds"),
        ((0.60, 0.020), "holds"),  # proxy better: no counterexample
        ((0.72, 0.045), "holds weakly"),  # NLL +2.9%
        ((0.70, 0.065), "does not hold"),  # ECE +0.025
    ],
)
def test_proxy_verdicts(proxy, verdict):
    record = {
        "claim": "proxy_data",
        "run": "p",
        "setting": {},
        "measured": {
            "in_distribution": {"nll": 0.70, "ece": 0.040},
            "proxy": dict(zip(("nll", "ece"), proxy, strict=True)),
        },
    }
    assert _verdict([record], "proxy_data").verdict == verdict


def test_missing_claims_are_reported_as_not_run():
    verdicts = decide([_cal("d0", MAP, CLEAR)])
    assert [v.claim for v in verdicts] == list(CLAIMS)
    assert {v.claim: v.verdict for v in verdicts} == {
        "zero_shot_calibration": "holds",
        **{c: "not run: inputs missing" for c in CLAIMS if c != "zero_shot_calibration"},
    }


def test_malformed_records_name_the_field():
    bad = _cal("d0", MAP, CLEAR)
    del bad["measured"]["bayesvlm"]["nll"]
    with pytest.raises(ValueError, match=r"records\[1\]\.measured\.bayesvlm\.nll is missing"):
        decide([_cal("ok", MAP, CLEAR), bad])
    with pytest.raises(ValueError, match=r"records\[0\]\.claim"):
        decide([{"claim": "speed", "run": "r", "setting": {}, "measured": {}}])
    with pytest.raises(ValueError, match="length >= 2"):
        decide([_corr([0.0], [0.3], [1e-4])])


def test_settings_are_summarised_common_and_varying():
    v = _verdict(
        [_cal("food101", MAP, CLEAR, n=10), _cal("cifar10", MAP, CLEAR, n=10)], "zero_shot_calibration"
    )
    assert v.setting == "model=ViT-B-32, dataset in {food101, cifar10}, n=10"
    assert v.runs == ("food101", "cifar10")


def test_reference_rows_compare_a_matching_run_and_list_setting_differences():
    ours = _cal(
        "food-run",
        (0.801, 0.70, 0.04),
        (0.803, 0.68, 0.01),
        model="ViT/B-32",
        pretrained="laion2b_s34b_b79k",
        dataset="Food101",
        n=4,
        predictive="probit",
        ece_bins=20,
    )
    assert reference_rows([_cal("other", MAP, CLEAR, pretrained="laion2b_s34b_b79k")]) == []
    rows = reference_rows([_cal("other", MAP, CLEAR), ours])
    assert len(rows) == 6 and {r["run"] for r in rows} == {"food-run"}
    nll = next(r for r in rows if (r["method"], r["metric"]) == ("bayesvlm", "nll"))
    assert nll["published"] == 0.68084 and nll["difference"] == pytest.approx(0.68 - 0.68084)
    assert rows[0]["setting_differences"] == [
        "n=4 (published 10)",
        "lambda_img=not recorded (published 2997.875)",
        "lambda_txt=not recorded (published 2538.091)",
    ]
    md = render_reproduction_md(decide([ours]), rows)
    assert "| bayesvlm | nll | 0.68084 | 0.68000 | -0.00084 |" in md
    assert "Settings that differ: n=4 (published 10)" in md
    assert PUBLISHED_FOOD101_CLIP_B32["source"] in md


def test_markdown_has_one_row_per_claim_and_escapes_pipes():
    record = _cal("a|b", MAP, CLEAR)
    md = render_reproduction_md(decide([record]))
    table = [line for line in md.splitlines() if line.startswith("| ") and "paper says" not in line]
    assert len(table) == len(CLAIMS)
    assert "a\\|b" in md and "**holds**" in md and md.count("**not run: inputs missing**") == len(CLAIMS) - 1
    assert "No run matches the reference setting" in md
