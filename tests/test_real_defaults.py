"""Defaults that make sense for a real model: a real dataset runs the paper's model, each model brings its
own Hessian data, the command line wins, and Hessian data made for another model stops the run before
any compute with one line."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from uqvlm import cli

REPO = Path(__file__).resolve().parents[1]
PAPER_MODELS = ["clip-b32", "clip-l14", "clip-h14", "siglip-b16"]


def _dataset_options() -> dict[str, str]:
    """dataset option -> the kind it builds (a protocol's kind when the section offers protocols)."""
    out = {}
    for path in sorted((REPO / "configs" / "dataset").glob("*.yaml")):
        section = OmegaConf.to_container(OmegaConf.load(path))
        kinds = {section.get("kind")} | {
            (entry or {}).get("kind") for entry in (section.get("protocols") or {}).values()
        }
        out[path.stem] = "shapes" if kinds - {None} == {"shapes"} else "real"
    return out


def test_the_users_command_runs_the_papers_setting(capsys):
    """`uqvlm run task=zeroshot dataset=imagenet-r --cfg job`: ViT-B-32 laion2b_s34b_b79k with the published
    factors, KFAC, n = 10, lambda by the evidence."""
    cli.main(["run", "task=zeroshot", "dataset=imagenet-r", "--cfg", "job"])
    cfg = OmegaConf.create(capsys.readouterr().out)
    assert cfg.model.name == "ViT-B-32" and cfg.model.pretrained == "laion2b_s34b_b79k"
    assert cfg.hessian_data.name == "published" and cfg.hessian_data.kind == "published"
    assert list(cfg.posterior.structures) == ["kfac"]
    assert cfg.posterior.n == 10 and cfg.posterior.prior_precision == "evidence"
    assert cfg.hessian_data.num_data == 327680


@pytest.mark.parametrize(("option", "kind"), sorted(_dataset_options().items()))
def test_a_real_dataset_picks_the_papers_model_and_the_shapes_world_the_tiny_one(option, kind, compose):
    cfg = compose(f"dataset={option}")
    if kind == "real":
        assert (cfg.model.name, cfg.hessian_data.name) == ("ViT-B-32", "published")
    else:
        assert (cfg.model.name, cfg.hessian_data.name) == ("uqvlm-tiny", "shapes")


@pytest.mark.parametrize("model", PAPER_MODELS)
def test_each_paper_model_brings_its_published_factors_and_kfac(model, compose):
    cfg = compose(f"model={model}")
    assert cfg.hessian_data.name == "published" and list(cfg.posterior.structures) == ["kfac"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model=clip-b32", "hessian_data=laion400m"], ("ViT-B-32", "laion400m", ["kfac", "diag"])),
        (["dataset=imagenet-r", "model=clip-l14"], ("ViT-L-14", "published", ["kfac"])),
        (["dataset=imagenet-r", "hessian_data=cc12m"], ("ViT-B-32", "cc12m", ["kfac", "diag"])),
        (["model=clip-b32", "posterior=map"], ("ViT-B-32", "published", [])),
        (["dataset=imagenet-r", "model=uqvlm-tiny"], ("uqvlm-tiny", "shapes", ["kfac", "diag"])),
    ],
)
def test_the_command_line_wins(overrides, expected, compose):
    cfg = compose(*overrides)
    assert (cfg.model.name, cfg.hessian_data.name, list(cfg.posterior.structures)) == expected


def test_the_paper_grid_uses_each_models_published_factors(compose):
    for model in PAPER_MODELS:
        cfg = compose("experiment=paper_zeroshot", f"model={model}", "dataset=imagenet-r")
        assert cfg.hessian_data.name == "published"
        assert cfg.posterior.evidence_variant == "reference" and cfg.posterior.n == 10


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["model=clip-b32", "hessian_data=shapes"], "hessian_data=shapes is the shapes world's curvature"),
        (["dataset=imagenet-r", "hessian_data=shapes"], "not for ViT-B-32"),
        (["hessian_data=published"], "the published factors belong to real checkpoints, not to uqvlm-tiny"),
        (
            ["model=clip-b32", "model.pretrained=/no/such/checkpoint.bin"],
            "hessian_data.checkpoint=<one of them>",
        ),
        (
            ["model=clip-b32", "hessian_data.checkpoint=CLIP-ViT-B-99"],
            "hessian_data.checkpoint must be one of",
        ),
        (
            ["model=clip-b32", "hessian_data.num_data=null"],
            "hessian_data.num_data must be a positive integer",
        ),
    ],
)
def test_hessian_data_of_another_model_stops_before_compute(overrides, line, tmp_path, capsys):
    cache, results = tmp_path / "cache", tmp_path / "results"
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", *overrides, f"paths.cache_dir={cache}", f"paths.results_dir={results}"])
    elapsed = time.perf_counter() - start
    out = capsys.readouterr().out
    assert exit_info.value.code == 2
    assert line in " ".join(out.split())
    assert len([x for x in out.splitlines() if x.startswith("error:")]) == 1
    # Nothing was computed: not even the cache or results directory was created.
    assert not cache.exists() and not results.exists()
    print(f"{' '.join(overrides)}: stopped after {elapsed:.1f} s")  # measured for the report, not asserted


def test_without_a_fitted_posterior_the_hessian_data_is_not_read(settings_of):
    """posterior=map fits nothing, so no Hessian data is checked against the model."""
    settings = settings_of("model=clip-b32", "posterior=map", "hessian_data=shapes")
    assert settings.posterior.structures == ()
