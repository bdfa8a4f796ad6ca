"""`uqvlm fetch`: the same runs `uqvlm run` would compose (sweeps expanded, nothing run), every artefact
they need, and offline a list of what is missing with a non-zero exit status."""

from __future__ import annotations

import itertools
import socket
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from open_clip.pretrained import get_pretrained_cfg

from uqvlm import cli
from uqvlm.fetch import job_overrides

REPO = Path(__file__).resolve().parents[1]


def _grid(experiment: str) -> dict[str, list[str]]:
    params = OmegaConf.load(REPO / "configs" / "experiment" / f"{experiment}.yaml").hydra.sweeper.params
    return {k: str(v).split(",") for k, v in params.items()}


def _choices(job: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in job)


def test_an_experiments_grid_becomes_its_jobs():
    grid = _grid("paper_zeroshot")
    jobs = job_overrides(["experiment=paper_zeroshot"])
    expected = [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]
    assert [{k: _choices(j)[k] for k in grid} for j in jobs] == expected
    assert all(_choices(j)["experiment"] == "paper_zeroshot" for j in jobs)


def test_the_command_line_narrows_an_experiments_grid_as_in_a_multirun():
    jobs = job_overrides(["experiment=paper_zeroshot", "model=clip-b32"])
    assert {_choices(j)["model"] for j in jobs} == {"clip-b32"}
    assert len(jobs) == len(_grid("paper_zeroshot")["dataset"])


def test_a_command_line_sweep_needs_m_and_then_expands():
    assert job_overrides(["-m"] * 0 + ["dataset=food101,cifar10", "posterior.n=1,10"], multirun=True) == [
        ["dataset=food101", "posterior.n=1"],
        ["dataset=food101", "posterior.n=10"],
        ["dataset=cifar10", "posterior.n=1"],
        ["dataset=cifar10", "posterior.n=10"],
    ]
    assert job_overrides(["model=clip-b32"]) == [["model=clip-b32"]]
    with pytest.raises(cli.UqvlmError, match="add -m"):
        job_overrides(["dataset=food101,cifar10"])


def test_an_optuna_search_space_chooses_no_artefact():
    """experiment=prior_search: its interval over the prior precision is left out, its job composes."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    jobs = job_overrides(["experiment=prior_search"])
    assert len(jobs) == 1 and not any(o.startswith("posterior.prior_precision") for o in jobs[0])


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the socket is: connections are refused


def test_offline_fetch_of_the_paper_grid_lists_every_missing_artefact(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    base_url = f"http://127.0.0.1:{_closed_port()}/hessians"  # never the real repository from a test
    start = time.perf_counter()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(
            [
                "fetch",
                "experiment=paper_zeroshot",
                f"hessian_data.base_url={base_url}",
                f"paths.cache_dir={tmp_path / 'cache'}",
            ]
        )
    elapsed = time.perf_counter() - start
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 1
    grid = _grid("paper_zeroshot")
    # Weights: each model's hub repo, as open_clip's pretrained table names it.
    for option in grid["model"]:
        model = OmegaConf.load(REPO / "configs" / "model" / f"{option}.yaml")
        repo = get_pretrained_cfg(model.name, model.pretrained)["hf_hub"].strip("/")
        assert f"missing model {model.name} ({model.pretrained}): weights {repo}" in out
    # The published factors of each model, from the configured base URL.
    for checkpoint in (
        "CLIP-ViT-B-32-laion2B-s34B-b79K",
        "CLIP-ViT-L-14-laion2B-s32B-b82K",
        "CLIP-ViT-H-14-laion2B-s32B-b79K",
        "siglip-base-patch16-256",
    ):
        assert f"missing published factors {checkpoint}" in out
        assert f"{base_url}/hessian_{checkpoint}/ cannot be reached" in out
    # Each dataset: its hub repo, or what a person provides.
    for option in grid["dataset"]:
        section = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "dataset" / f"{option}.yaml"))
        source = section.get("source")
        if isinstance(source, str) and "/" in source:
            assert f"missing dataset {section['name']} ({source})" in out
        else:
            assert f"by hand dataset {section['name']}:" in out
    assert "not ready" in out
    print(f"offline fetch of the paper grid: {elapsed:.1f} s")  # measured for the report, not asserted


def test_weights_in_the_hub_cache_are_found_under_either_file_name(tmp_path, monkeypatch, capsys):
    """open_clip's hub weights are open_clip_model.safetensors or open_clip_pytorch_model.bin: either one
    cached is enough; the published factors, not cached and not reachable, are missing."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    repo = get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")["hf_hub"].strip("/")
    root = tmp_path / "hf-home" / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text("c" * 40)
    (root / "snapshots" / ("c" * 40)).mkdir(parents=True)
    (root / "snapshots" / ("c" * 40) / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    base_url = f"http://127.0.0.1:{_closed_port()}/hessians"
    args = ["fetch", "task=hessian", "model=clip-b32", f"hessian_data.base_url={base_url}"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*args, f"paths.cache_dir={tmp_path / 'cache'}"])
    out = " ".join(capsys.readouterr().out.split())
    assert exit_info.value.code == 1
    assert f"present model ViT-B-32 (laion2b_s34b_b79k): weights {repo}" in out
    assert "missing published factors CLIP-ViT-B-32-laion2B-s34B-b79K" in out
