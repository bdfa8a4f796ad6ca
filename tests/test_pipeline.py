"""End to end through the CLI on the offline shapes world: tables, records, plots, caches, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "dataset.n=300",
    "hessian_data.n=1500",
    "hessian_data.class_batch=500",
    "task.methods.tta.views=2",
    "task.methods.bayesvlm-kfac-mc.samples=200",
]
# MAP and BayesVLM-KFAC only: what a prior-precision sweep compares.
KFAC_SWEEP = [
    *SMALL,
    "posterior=kfac",
    "~task.methods.temperature",
    "~task.methods.tta",
    "~task.methods.bayesvlm-kfac-mc",
    "~task.methods.probvlm",
    "~task.methods.probvlm-probit",
    "task.plots=false",
]
COLUMNS = ["method", "acc", "nll", "ece", "ece15", "brier", "auroc", "aurc", "n", "uses_labels"]


def run_cli(
    *args: str, cache: Path, results: Path, logs: Path, multirun: bool = False, timeout: float = 600
) -> subprocess.CompletedProcess:
    flags = ["-m"] if multirun else []  # Hydra's flags go before the overrides
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "uqvlm.cli",
            "run",
            *flags,
            f"paths.cache_dir={cache}",
            f"paths.results_dir={results}",
            f"paths.log_dir={logs}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def first_run(tiny_checkpoint, test_cache, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    logs = tmp_path_factory.mktemp("logs")
    out = run_cli(*SMALL, cache=test_cache, results=results, logs=logs)
    return results, logs, out


@pytest.mark.slow
def test_zeroshot_table_record_and_plots(first_run):
    results, _, out = first_run
    directory = results / "zeroshot" / "shapes-sketch"
    table = pd.read_csv(directory / "uqvlm-tiny.csv")
    assert list(table.columns) == COLUMNS
    assert list(table["method"]) == [
        "map",
        "temperature",
        "tta",
        "bayesvlm-diag",
        "bayesvlm-kfac",
        "bayesvlm-kfac-mc",
        "probvlm",
        "probvlm-probit",
    ]
    assert (table["n"] == 300).all()
    # Temperature is fitted on validation labels; MAP, TTA, BayesVLM with the evidence's lambda and ProbVLM
    # (its cross-modal weight chosen on held-out image-caption pairs) are not.
    assert table.set_index("method")["uses_labels"].to_dict() == {
        "map": False,
        "temperature": True,
        "tta": False,
        "bayesvlm-diag": False,
        "bayesvlm-kfac": False,
        "bayesvlm-kfac-mc": False,
        "probvlm": False,
        "probvlm-probit": False,
    }
    for col in ("acc", "ece", "ece15", "auroc", "aurc"):
        assert table[col].between(0, 1).all(), col
    assert (table["nll"] > 0).all() and table["brier"].between(0, 2).all()
    # TTA and Bayesian rows are real computations, not copies of MAP.
    assert (
        table.set_index("method").loc["bayesvlm-kfac", "nll"] != table.set_index("method").loc["map", "nll"]
    )
    md = (directory / "uqvlm-tiny.md").read_text()
    assert "bayesvlm-kfac" in md and "| method" in md
    record = json.loads((directory / "uqvlm-tiny.json").read_text())
    assert record["config"]["dataset"]["name"] == "shapes-sketch"
    assert set(record["provenance"]["posteriors"]) == {"kfac", "diag"}
    assert set(record["provenance"]["label_use"]) == {"temperature"}
    for key in ("probvlm/mc/pairs", "probvlm/probit/pairs"):
        choice = record["provenance"]["notes"][key]
        scores = choice["scores"]
        assert choice["criterion"] == "held-out pair retrieval NLL" and len(scores) == 5
        assert scores[str(choice["cross_modal"])] == min(scores.values())
    assert len(list((directory / "runs").glob("uqvlm-tiny-*.json"))) == 1
    for suffix in ("reliability", "risk_coverage", "uncertain"):
        png = directory / f"uqvlm-tiny_{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", suffix
    assert "bayesvlm-kfac" in out.stdout  # the rich table


@pytest.mark.slow
def test_warm_rerun_reuses_caches_and_reproduces(first_run, test_cache):
    results, logs, _ = first_run
    before = pd.read_csv(results / "zeroshot" / "shapes-sketch" / "uqvlm-tiny.csv")
    out = run_cli(*SMALL, cache=test_cache, results=results, logs=logs)
    assert "encoding" not in out.stdout and "curvature" not in out.stdout, "caches must be reused"
    assert "fitting ProbVLM" not in out.stdout, "the adapters' cache must be reused"
    after = pd.read_csv(results / "zeroshot" / "shapes-sketch" / "uqvlm-tiny.csv")
    pd.testing.assert_frame_equal(before, after)


@pytest.mark.slow
def test_multirun_sweep_skips_finished_configs_and_reports(first_run, test_cache, tmp_path):
    results, logs, _ = first_run
    sweep = KFAC_SWEEP
    run_cli(
        *sweep, "posterior.prior_precision=1,100", cache=test_cache, results=results, logs=logs, multirun=True
    )
    out = run_cli(
        *sweep,
        "posterior.prior_precision=1,100,10000",
        cache=test_cache,
        results=results,
        logs=logs,
        multirun=True,
    )
    assert out.stdout.count("already done") == 2
    records = list((results / "zeroshot" / "shapes-sketch" / "runs").glob("*.json"))
    assert len(records) == 1 + 3
    report = subprocess.run(
        [sys.executable, "-m", "uqvlm.cli", "report", "--results", str(results)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert "rows from 4 runs" in report.stdout.replace("\n", " ")
    runs = pd.read_csv(results / "tables" / "zeroshot_runs.csv")
    kfac = runs[runs.method == "bayesvlm-kfac"]
    assert set(kfac.prior_precision.astype(str)) >= {"1", "100", "10000"}
    # A larger prior precision shrinks the posterior: the NLL moves monotonically towards MAP's.
    by_lambda = kfac.assign(lam=kfac.prior_precision.astype(str)).set_index("lam")
    nll = [float(by_lambda.loc[lam, "nll"]) for lam in ("1", "100", "10000")]
    map_nll = float(runs[(runs.method == "map")].nll.iloc[0])
    gaps = [abs(v - map_nll) for v in nll]
    assert gaps[0] > gaps[1] > gaps[2], (nll, map_nll)
    # ... from one side: the posterior's effect on the NLL keeps its sign as it shrinks.
    assert len({math.copysign(1.0, v - map_nll) for v in nll}) == 1, (nll, map_nll)
    for metric in ("acc", "nll", "ece"):
        assert (results / "tables" / f"zeroshot_{metric}.tex").exists()


@pytest.mark.slow
def test_prior_search_rows_say_they_used_validation_labels(first_run, test_cache, tmp_path):
    """experiment=prior_search (Optuna on the validation NLL) selects lambda with labels of the evaluated
    dataset: its BayesVLM rows say so, and the report shows the trial the search chose."""
    results = tmp_path / "results"
    run_cli(
        *KFAC_SWEEP,
        "experiment=prior_search",
        "hydra.sweeper.n_trials=2",
        cache=test_cache,
        results=results,
        logs=tmp_path / "logs",
    )
    records = [
        json.loads(p.read_text()) for p in (results / "zeroshot" / "shapes-sketch" / "runs").glob("*.json")
    ]
    assert len(records) == 2
    for record in records:
        assert {r["method"]: r["uses_labels"] for r in record["rows"]} == {
            "map": False,
            "bayesvlm-kfac": True,
        }
        assert "task.objective=val_nll" in record["provenance"]["label_use"]["bayesvlm-kfac"]
    best = min(records, key=lambda r: r["provenance"]["objective"])
    best_nll = next(r["nll"] for r in best["rows"] if r["method"] == "bayesvlm-kfac")
    subprocess.run(
        [sys.executable, "-m", "uqvlm.cli", "report", "--results", str(results)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    nll = pd.read_csv(results / "tables" / "zeroshot_nll.csv").set_index("method")["shapes-sketch"]
    assert list(nll.index) == ["map", "bayesvlm-kfac (val labels)"]
    assert nll["bayesvlm-kfac (val labels)"] == pytest.approx(best_nll, abs=1e-5)


@pytest.mark.slow
def test_submitit_local_sweep_of_three_prior_precisions(first_run, test_cache, tmp_path):
    """hydra-submitit-launcher runs the jobs as separate processes; the report aggregates all three."""
    _, logs, _ = first_run
    results = tmp_path / "results"
    sweep = [*KFAC_SWEEP, "hydra/launcher=submitit_local"]
    run_cli(
        *sweep,
        "posterior.prior_precision=1,100,10000",
        cache=test_cache,
        results=results,
        logs=logs,
        multirun=True,
    )
    records = list((results / "zeroshot" / "shapes-sketch" / "runs").glob("*.json"))
    assert len(records) == 3
    subprocess.run(
        [sys.executable, "-m", "uqvlm.cli", "report", "--results", str(results)],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    runs = pd.read_csv(results / "tables" / "zeroshot_runs.csv")
    kfac = runs[runs.method == "bayesvlm-kfac"]
    assert sorted(kfac.prior_precision.astype(float)) == [1.0, 100.0, 10000.0]
    assert kfac.nll.nunique() == 3 and (runs[runs.method == "map"].nll.nunique() == 1)


@pytest.mark.slow
def test_default_run_reproduces_the_committed_table(tiny_checkpoint, test_cache, tmp_path):
    """`uqvlm run` with no overrides gives the committed table (results/ is what the code produces): a
    change that moves the numbers must refresh them (`make reproduce-offline`) in the same commit."""
    committed = REPO / "results" / "zeroshot" / "shapes-sketch" / "uqvlm-tiny.csv"
    run_cli("task.plots=false", cache=test_cache, results=tmp_path / "results", logs=tmp_path / "logs")
    fresh = pd.read_csv(tmp_path / "results" / "zeroshot" / "shapes-sketch" / "uqvlm-tiny.csv")
    expected = pd.read_csv(committed)
    assert list(fresh.columns) == list(expected.columns)
    for column in ("method", "n", "uses_labels"):
        assert fresh[column].tolist() == expected[column].tolist(), column
    numeric = [c for c in expected.columns if c not in ("method", "n", "uses_labels")]
    pd.testing.assert_frame_equal(fresh[numeric], expected[numeric], check_exact=False, atol=1e-4, rtol=0)
