"""``uqvlm report``: which run each table cell comes from, and which rows used labels."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from uqvlm.report import collect_zeroshot, write_report


def write_record(results: Path, name: str, age: int, rows: list[dict], provenance: dict, **posterior) -> None:
    """A run record as tasks/zeroshot.py writes it, finished ``age`` seconds ago."""
    config = {
        "dataset": {"name": "shapes-sketch"},
        "model": {"name": "uqvlm-tiny"},
        "posterior": {"n": 10, "prior_precision": "evidence", "evidence_variant": "exact", **posterior},
        "hessian_data": {"name": "shapes"},
        "seed": 0,
    }
    path = results / "zeroshot" / "shapes-sketch" / "runs" / f"uqvlm-tiny-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"config_hash": name, "config": config, "rows": rows, "provenance": provenance})
    )
    stamp = 1_000_000 - age
    os.utime(path, (stamp, stamp))


def row(method: str, nll: float, uses_labels: bool) -> dict:
    metrics = {"acc": 0.5, "nll": nll, "ece": 0.1, "ece15": 0.1, "brier": 0.6, "auroc": 0.6, "aurc": 0.4}
    return {"method": method, **metrics, "n": 300, "uses_labels": uses_labels}


def test_label_using_rows_are_marked_and_a_sweep_shows_its_chosen_trial(tmp_path):
    fitted = {"temperature": "fitted on the labelled validation split"}
    swept = {
        **fitted,
        "bayesvlm-kfac": "posterior settings chosen by a sweep minimising task.objective=val_nll",
    }
    # A plain run, then two trials of a validation-NLL sweep; the better trial (objective 1.2) is not
    # the latest one.
    write_record(
        tmp_path,
        "plain",
        30,
        [row("map", 2.2, False), row("temperature", 1.6, True), row("bayesvlm-kfac", 2.1, False)],
        {"label_use": fitted},
    )
    write_record(
        tmp_path,
        "trial0",
        20,
        [row("map", 2.2, False), row("bayesvlm-kfac", 1.7, True)],
        {"label_use": swept, "objective": 1.2},
        prior_precision=0.02,
    )
    write_record(
        tmp_path,
        "trial1",
        10,
        [row("map", 2.2, False), row("bayesvlm-kfac", 1.9, True)],
        {"label_use": swept, "objective": 1.5},
        prior_precision=50.0,
    )
    write_report(tmp_path)
    nll = pd.read_csv(tmp_path / "tables" / "zeroshot_nll.csv").set_index("method")["shapes-sketch"]
    assert nll.to_dict() == {
        "map": 2.2,
        "temperature (val labels)": 1.6,
        "bayesvlm-kfac": 2.1,  # the label-free row stays beside the tuned one
        "bayesvlm-kfac (val labels)": 1.7,  # the sweep's choice: lowest validation objective
    }
    assert "bayesvlm-kfac (val labels)" in (tmp_path / "tables" / "zeroshot_nll.md").read_text()
    runs = pd.read_csv(tmp_path / "tables" / "zeroshot_runs.csv")
    kfac = runs[runs.method == "bayesvlm-kfac"].set_index("config_hash")
    assert kfac.loc["trial1", "label_use"] == swept["bayesvlm-kfac"] and pd.isna(
        kfac.loc["plain", "label_use"]
    )
    assert list(kfac.objective.fillna(-1)) == [-1, 1.2, 1.5]


def test_long_table_keeps_the_image_count_beside_the_pseudo_data_count(tmp_path):
    write_record(tmp_path, "a", 0, [row("map", 2.2, False)], {}, n=0.1)
    long = collect_zeroshot(tmp_path)
    assert long.loc[0, "n"] == 300 and long.loc[0, "posterior_n"] == 0.1
