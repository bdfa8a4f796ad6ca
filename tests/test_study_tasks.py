"""Every study's offline experiment end to end on the shapes world (small sizes), its table checked
against what the study claims to measure, and `uqvlm report`'s REPRODUCTION.md from those tables."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from uqvlm.errors import ConfigError

# The sizes tests/test_pipeline.py uses, so features and posteriors are shared through the test cache.
SMALL = ["dataset.n=300", "hessian_data.n=1500", "hessian_data.class_batch=500"]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def run_experiment(compose, tiny_checkpoint, test_cache, results, tmp_path_factory):
    """``run_experiment(name, *overrides)``: the task's table, as `uqvlm run experiment=<name>` runs it."""
    from uqvlm.cli import run_task

    logs = tmp_path_factory.mktemp("logs")

    def run(name: str, *overrides: str) -> None:
        cfg = compose(
            f"experiment={name}",
            f"paths.cache_dir={test_cache}",
            f"paths.results_dir={results}",
            f"paths.log_dir={logs}",
            "skip_existing=false",
            *overrides,
        )
        run_task(cfg)

    return run


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG


@pytest.fixture(scope="module")
def overhead(run_experiment, results) -> pd.DataFrame:
    run_experiment("offline_overhead", "task.batch=16", "task.repeats=2", "task.warmup=0")
    return pd.read_csv(results / "overhead" / "cpu" / "uqvlm-tiny.csv")


@pytest.mark.slow
def test_overhead_counts_per_image_flops_and_times_both_paths(overhead, results):
    assert sorted(overhead["classes"]) == [8, 1000]  # K = 1,000 and the dataset's 8 classes
    assert (overhead["model"] == "uqvlm-tiny").all() and (overhead["batch"] == 16).all()
    d, p = 32, 64  # the tiny CLIP's embedding and image last-layer input (visual.proj, no bias)
    for _, row in overhead.iterrows():
        k, encoder = row["classes"], row["image_encoder_gflops"] * 1e9
        hand = (2 * p * p) / (encoder + 2 * d * k)  # see test_studies_overhead.py
        assert row["flops_overhead"] == pytest.approx(hand, rel=1e-4)
        assert row["map_predictive_gflops"] * 1e9 == pytest.approx(2 * 16 * d * k, rel=1e-4)
    for column in ("map_pixels_s", "bayesvlm_pixels_s", "map_features_s", "bayesvlm_features_s"):
        assert (overhead[column] > 0).all(), column
    directory = results / "overhead" / "cpu"
    assert pd.read_csv(directory / "summary.csv")["model"].tolist() == overhead["model"].tolist()
    assert _png(directory / "summary.png") and "tabular" in (directory / "uqvlm-tiny.tex").read_text()


@pytest.fixture(scope="module")
def corruption(run_experiment, results) -> pd.DataFrame:
    run_experiment("offline_corruption", "dataset.n=200", *SMALL[1:], "task.levels=[0,0.1,0.8]")
    return pd.read_csv(results / "corruption" / "shapes-photo" / "uqvlm-tiny.csv")


@pytest.mark.slow
def test_corruption_lowers_the_true_class_similarity_and_raises_its_variance(corruption, results):
    assert corruption["std"].tolist() == [0.0, 0.1, 0.8] and (corruption["n"] == 200).all()
    clean, noisy = corruption.iloc[0], corruption.iloc[-1]
    assert noisy["mean_similarity"] < clean["mean_similarity"] - 0.1
    assert noisy["similarity_variance"] > clean["similarity_variance"]
    assert noisy["map_acc"] < clean["map_acc"] and noisy["bayesvlm_nll"] > clean["bayesvlm_nll"]
    # ProbCosine's mean is the cosine of the mean embeddings shrunk by the variance: a little below it.
    assert (corruption["mean_similarity"] <= corruption["map_similarity"]).all()
    directory = results / "corruption" / "shapes-photo"
    assert _png(directory / "uqvlm-tiny_similarity.png") and _png(directory / "uqvlm-tiny_metrics.png")


@pytest.mark.slow
def test_probcosine_error_grows_with_the_posterior_width_within_sampling_error(run_experiment, results):
    run_experiment(
        "offline_probcosine",
        *SMALL,
        "task.pairs=16",
        "task.samples=4000",
        "task.widths=[0.01,100]",
        "task.density_widths=[0.01]",
    )
    directory = results / "probcosine" / "shapes-sketch"
    table = pd.read_csv(directory / "uqvlm-tiny.csv").set_index(["kind", "n"])
    assert table.loc[("all", 0.01), "pairs"] == 32 and table.loc[("true", 0.01), "pairs"] == 16
    wide, narrow = table.loc[("all", 0.01)], table.loc[("all", 100.0)]
    assert wide["cosine_sd"] > narrow["cosine_sd"]
    assert wide["mean_abs_error"] > narrow["mean_abs_error"] and wide["w1"] > narrow["w1"]
    # The mean agrees with Monte Carlo within its sampling error (|z| averages about 0.8 under agreement).
    assert table["mean_error_in_se"].max() < 2.5
    assert _png(directory / "uqvlm-tiny_densities_n0.01.png")


@pytest.mark.slow
def test_hessian_size_records_the_evidence_lambda_per_size(run_experiment, results):
    run_experiment("offline_hessian_size", *SMALL, "posterior=kfac", "task.sizes=[200,all]")
    directory = results / "hessian_size" / "shapes-sketch"
    table = pd.read_csv(directory / "uqvlm-tiny.csv")
    bayes = table[table["method"] == "bayesvlm-kfac"]
    assert table["method"].tolist() == ["map", "bayesvlm-kfac", "bayesvlm-kfac"]
    assert bayes["pairs"].tolist() == [200, 1500]
    assert (bayes["lambda_image"] > 0).all() and (bayes["lambda_text"] > 0).all()
    assert bayes["lambda_image"].nunique() == 2  # the curvature, and so the evidence, moves with N
    assert _png(directory / "uqvlm-tiny.png")


@pytest.fixture(scope="module")
def proxy(run_experiment, results) -> pd.DataFrame:
    run_experiment(
        "offline_proxy_data", *SMALL, "posterior=kfac", "task.proxy.n=1000", "task.proxy.class_batch=500"
    )
    return pd.read_csv(results / "proxy_data" / "shapes-sketch" / "uqvlm-tiny.csv")


@pytest.mark.slow
def test_proxy_data_compares_two_hessians_on_one_evaluation(proxy):
    assert proxy["method"].tolist() == ["map", "bayesvlm-kfac", "bayesvlm-kfac"]
    bayes = proxy.iloc[1:].set_index("hessian_role")
    assert bayes.loc["in_distribution", "hessian_data"] == "shapes"
    assert bayes.loc["proxy", "hessian_data"] == "shapes-proxy"
    assert bayes["pairs"].tolist() == [1500, 1000]
    assert bayes.loc["in_distribution", "nll"] != bayes.loc["proxy", "nll"]


def test_proxy_data_without_a_proxy_says_how_to_choose_one(settings_of, tmp_path):
    from uqvlm.tasks import proxy_data

    settings = settings_of("task=proxy_data", f"paths.results_dir={tmp_path}", f"paths.cache_dir={tmp_path}")
    with pytest.raises(ConfigError, match=r"hessian_data@task\.proxy=<option>"):
        proxy_data.run(settings)


@pytest.mark.slow
def test_prior_grid_tends_to_map_as_lambda_grows(run_experiment, results):
    run_experiment("offline_prior_grid", *SMALL, "task.n_grid=[0.1,10]", "task.lambda_grid=[1,100,1e4,1e8]")
    directory = results / "prior_grid" / "shapes-sketch"
    table = pd.read_csv(directory / "uqvlm-tiny.csv")
    record = pd.read_json(directory / "uqvlm-tiny.json", typ="series")
    map_nll = record["provenance"]["map"]["nll"]
    for structure in ("kfac", "diag"):
        grid = table[(table["structure"] == structure) & (table["kind"] == "grid")]
        assert len(grid) == 2 * 4  # |n| x |lambda|
        for n, g in grid.groupby("n"):
            gap = (g.sort_values("lambda")["nll"] - map_nll).abs().tolist()
            assert gap[-1] < 1e-3 and gap[-1] < gap[0], (structure, n, gap)
        evidence = table[(table["structure"] == structure) & (table["kind"] == "evidence")]
        assert evidence["n"].tolist() == [0.1, 10.0] and (evidence["lambda_image"] > 0).all()
    assert _png(directory / "uqvlm-tiny.png")


@pytest.mark.slow
def test_uncertainty_error_bins_before_and_after_fine_tuning(run_experiment, results):
    run_experiment(
        "offline_uncertainty_error",
        "task.strategies=[random]",
        "task.budgets=[20]",
        "task.finetune.epochs=3",
        "task.data.sizes.train=200",
        "task.data.sizes.val=100",
        "task.data.sizes.test=300",
        "task.bins=5",
        *SMALL[1:],
    )
    directory = results / "uncertainty_error" / "shapes-sketch"
    table = pd.read_csv(directory / "uqvlm-tiny.csv")
    assert list(dict.fromkeys(table["predictive"])) == ["zero-shot", "random (20)"]
    for _, g in table.groupby("predictive"):
        assert g["count"].sum() == 300 and g["bin"].tolist() == list(range(5))
        assert (g["uncertainty"].diff().dropna() >= 0).all()  # equal-mass bins, lowest first
        # The bins' error rates, weighted by their sizes, are the predictive's overall error.
        assert (g["error_rate"] * g["count"]).sum() / 300 == pytest.approx(1 - g["acc"].iloc[0], abs=1e-6)
    assert _png(directory / "uqvlm-tiny.png")


@pytest.mark.slow
def test_reproduction_report_gives_every_claim_a_verdict(overhead, corruption, proxy, results):
    from uqvlm.report import write_report
    from uqvlm.studies.report import CLAIMS, VERDICTS

    write_report(results)
    text = (results / "REPRODUCTION.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    for claim in CLAIMS:
        verdict = rows[claim].rstrip(" |").rsplit("|", 1)[-1].strip().strip("*")
        assert verdict in VERDICTS, (claim, verdict)
    # No zero-shot or active-learning runs here; the three studies above did run.
    assert "not run: inputs missing" in rows["zero_shot_calibration"]
    assert "not run: inputs missing" in rows["active_learning"]
    for claim in ("overhead", "corruption", "proxy_data"):
        assert "not run" not in rows[claim] and "uqvlm-tiny" in rows[claim], claim
    assert "corruption/shapes-photo/uqvlm-tiny.json" in rows["corruption"]
    assert math.isfinite(float(corruption["mean_similarity"].iloc[-1]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["task=corruption", "task.levels=[0,-0.1]"], r"task\.levels must hold numbers >= 0"),
        (["task=prior_grid", "task.n_grid=[0,1]"], r"task\.n_grid must hold numbers > 0"),
        (["task=overhead", "task.classes=[1000,0]"], r"task\.classes must be a positive integer"),
        (["task=overhead", "task.classes=[]"], r"task\.classes must list at least one"),
        (["task=hessian_size", "task.sizes=[100,most]"], r"task\.sizes must be a positive integer"),
        (["task=probcosine_study", "task.samples=1"], r"task\.samples must be an integer >= 2"),
        (["task=uncertainty_error", "task.uncertainty=variance"], r"task\.uncertainty must be one of"),
        (["task=corruption", "task.structure=full"], r"task\.structure must be one of"),
    ],
)
def test_study_settings_refuse_bad_values_naming_the_key(settings_of, overrides, message):
    with pytest.raises(ConfigError, match=message):
        settings_of(*overrides)


def test_hessian_size_grid_is_log_spaced_up_to_all_pairs(settings_of):
    from uqvlm.tasks.hessian_size import pair_counts

    task = settings_of("task=hessian_size", "task.min_size=100", "task.num_sizes=3").task
    assert pair_counts(task, 10_000) == [100, 1000, 10_000]
    assert pair_counts(task, 50) == [50]  # fewer pairs than the smallest size: all of them
    listed = settings_of("task=hessian_size", "task.sizes=[all,300,300]").task
    assert pair_counts(listed, 6000) == [300, 6000]
    with pytest.raises(ConfigError, match="exceed the 200 pairs"):
        pair_counts(listed, 200)


def test_a_typo_in_the_proxy_section_is_refused_with_the_closest_key(compose):
    from uqvlm.errors import UqvlmError
    from uqvlm.tasks.keys import check_config_keys

    check_config_keys(compose("experiment=offline_proxy_data"))
    with pytest.raises(UqvlmError, match=r"unknown key task\.proxy\.sed; did you mean task\.proxy\.seed\?"):
        check_config_keys(compose("experiment=offline_proxy_data", "+task.proxy.sed=1"))
