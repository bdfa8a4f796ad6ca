"""REPRODUCTION.md's records read from run outputs on disk: which runs feed each claim, and the
active-learning intervals."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest

from uqvlm.reproduction import (
    active_learning_records,
    calibration_records,
    reproduction_records,
    t_interval,
    write_reproduction,
)
from uqvlm.studies.report import decide


def test_t_interval_against_scipy_and_by_hand():
    mean, lo, hi = t_interval([1.0, 2.0, 4.0])
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert mean == pytest.approx(7 / 3) and hi - mean == pytest.approx(4.303 * sd / math.sqrt(3), rel=1e-4)
    assert mean - lo == pytest.approx(hi - mean)
    stats = pytest.importorskip("scipy.stats")
    for n in (2, 5, 30, 31, 45, 200):
        values = [math.sin(i) for i in range(n)]
        _, lo, hi = t_interval(values)
        sem = stats.sem(values)
        want = stats.t.ppf(0.975, n - 1) * sem
        assert (hi - lo) / 2 == pytest.approx(want, rel=2e-4), n
    with pytest.raises(ValueError, match="two values"):
        t_interval([1.0])


def _zeroshot_record(results: Path, dataset: str, name: str, age: int, bayes_nll: float, uses_labels=False):
    rows = [
        {"method": "map", "acc": 0.5, "nll": 2.0, "ece": 0.30, "uses_labels": False},
        {"method": "bayesvlm-kfac", "acc": 0.5, "nll": bayes_nll, "ece": 0.20, "uses_labels": uses_labels},
    ]
    config = {
        "model": {"name": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"},
        "dataset": {"name": dataset},
        "posterior": {"n": 10, "prior_precision": "evidence"},
        "hessian_data": {"name": "laion400m"},
        "task": {"ece_bins": 20, "methods": {"bayesvlm-kfac": {"structure": "kfac"}}},
    }
    provenance = {"notes": {"prior_precision/kfac": {"image": 3000.0, "text": 2500.0}}}
    path = results / "zeroshot" / dataset / "runs" / f"ViT-B-32-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"config": config, "rows": rows, "provenance": provenance}))
    os.utime(path, (1_000_000 - age, 1_000_000 - age))


def test_calibration_takes_the_latest_label_free_run_per_dataset_and_skips_in_distribution(tmp_path):
    _zeroshot_record(tmp_path, "food101", "old", 30, bayes_nll=1.9)
    _zeroshot_record(tmp_path, "food101", "new", 20, bayes_nll=1.5)
    _zeroshot_record(tmp_path, "food101", "tuned", 10, bayes_nll=1.0, uses_labels=True)  # a val-NLL sweep
    _zeroshot_record(tmp_path, "shapes-photo", "clean", 10, bayes_nll=1.0)
    records = calibration_records(tmp_path)
    assert [r["setting"]["dataset"] for r in records] == ["food101"]
    (record,) = records
    assert record["measured"]["bayesvlm"]["nll"] == 1.5 and record["run"].endswith("ViT-B-32-new.json")
    assert record["setting"]["lambda_img"] == 3000.0 and record["setting"]["predictive"] == "probit"
    # This run matches the published Food-101 reference: the report shows both rows.
    write_reproduction(tmp_path)
    text = (tmp_path / "REPRODUCTION.md").read_text()
    assert "| bayesvlm | nll | 0.68084 | 1.50000 | +0.81916 |" in text
    assert "lambda_img=3000 (published 2997.875)" in text


def _al_table(results: Path, seeds: dict[str, list[float]], with_interval: tuple[float, float] | None = None):
    directory = results / "active_learning" / "shapes-sketch"
    rows_dir = directory / "uqvlm-tiny.rows" / "setupkey"
    rows_dir.mkdir(parents=True)
    per_seed = [
        {"strategy": s, "budget": 10, "seed": i, "acc": a, "finished": float(i)}
        for s, accs in seeds.items()
        for i, a in enumerate(accs)
    ]
    pd.DataFrame(per_seed).to_csv(rows_dir / "job.csv", index=False)
    table = [{"strategy": s, "budget": 10, "acc_mean": sum(a) / len(a)} for s, a in seeds.items()]
    if with_interval:
        table[0].update({"acc_lo": with_interval[0], "acc_hi": with_interval[1]})
    record = {
        "config": {"model": {"name": "uqvlm-tiny"}, "task": {"seeds": [0, 1, 2]}},
        "rows": table,
        "provenance": {"job_rows": "elsewhere/active_learning/shapes-sketch/uqvlm-tiny.rows/setupkey"},
    }
    (directory / "uqvlm-tiny.json").write_text(json.dumps(record))


def test_active_learning_interval_from_the_per_seed_rows(tmp_path):
    _al_table(tmp_path, {"random": [0.40, 0.42, 0.44], "epig": [0.50, 0.52, 0.51]})
    (record,) = active_learning_records(tmp_path)
    mean, lo, hi = t_interval([0.40, 0.42, 0.44])
    assert record["measured"]["random"] == pytest.approx({"mean": mean, "lo": lo, "hi": hi})
    assert record["measured"]["epig"]["mean"] == pytest.approx(0.51) and "bald" not in record["measured"]
    verdict = next(v for v in decide([record]) if v.claim == "active_learning")
    assert verdict.verdict == "holds"  # 0.51 lies above random's interval [0.37, 0.47]


def test_active_learning_interval_columns_take_precedence(tmp_path):
    _al_table(
        tmp_path, {"random": [0.40, 0.42, 0.44], "bald": [0.43, 0.43, 0.43]}, with_interval=(0.419, 0.421)
    )
    (record,) = active_learning_records(tmp_path)
    assert record["measured"]["random"] == {"mean": pytest.approx(0.42), "lo": 0.419, "hi": 0.421}


def test_no_runs_means_every_claim_is_not_run(tmp_path):
    assert reproduction_records(tmp_path) == []
    path = write_reproduction(tmp_path)
    text = path.read_text()
    assert text.count("**not run: inputs missing**") == 5
    assert "No run matches the reference setting" in text
