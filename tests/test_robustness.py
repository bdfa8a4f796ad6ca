"""Faults and bad input: kills at random points, concurrent runs on one cache, corrupt or foreign
caches, a full disk, and bad settings, each with a clear error or an identical recomputation."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from uqvlm.cache import load_entry, save_entry

REPO = Path(__file__).resolve().parents[1]
# Small, and only the methods that exercise every cache kind (features, posteriors, results).
SMALL = [
    "dataset.n=200",
    "hessian_data.n=1000",
    "hessian_data.class_batch=500",
    "posterior=kfac",
    "~task.methods.temperature",
    "~task.methods.tta",
    "~task.methods.bayesvlm-kfac-mc",
    "~task.methods.probvlm",
    "~task.methods.probvlm-probit",
    "task.plots=false",
]


def command(cache: Path, results: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uqvlm.cli",
        "run",
        f"paths.cache_dir={cache}",
        f"paths.results_dir={results}",
        f"paths.log_dir={results}/logs",
        *SMALL,
        *extra,
    ]


def run(cache: Path, results: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        command(cache, results, *extra),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"},
        timeout=600,
    )
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def table(results: Path) -> pd.DataFrame:
    return pd.read_csv(results / "zeroshot" / "shapes-sketch" / "uqvlm-tiny.csv")


@pytest.fixture
def fresh_cache(tmp_path, tiny_checkpoint) -> Path:
    """An empty cache holding only the pretrained tiny model (so runs start cold but do not retrain)."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_checkpoint.parent, cache / "models")
    return cache


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, tmp_path_factory) -> pd.DataFrame:
    """The numbers of one uninterrupted cold run."""
    base = tmp_path_factory.mktemp("reference")
    shutil.copytree(tiny_checkpoint.parent, base / "cache" / "models")
    run(base / "cache", base / "results")
    return table(base / "results")


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_gives_identical_numbers(fresh_cache, tmp_path, reference):
    rng = random.Random(1234)
    results = tmp_path / "results"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for _ in range(3):
        proc = subprocess.Popen(
            command(fresh_cache, results),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(rng.uniform(2.0, 12.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    leftovers = [p for p in fresh_cache.rglob("*.tmp")]
    for path in fresh_cache.rglob("*.pt"):
        if path.parent.name != "models":
            load_entry(path)  # every complete-looking entry verifies: nothing partial under a real name
    run(fresh_cache, results)
    pd.testing.assert_frame_equal(table(results), reference)
    assert all(not p.exists() or p in leftovers for p in fresh_cache.rglob("*.tmp"))


@pytest.mark.slow
def test_concurrent_runs_share_one_cache(fresh_cache, tmp_path, reference):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [
        subprocess.Popen(
            command(fresh_cache, tmp_path / f"r{i}"),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    for i in range(3):
        pd.testing.assert_frame_equal(table(tmp_path / f"r{i}"), reference)
    # One shared set of entries, all complete and verified; no temporary file left behind.
    assert len(list((fresh_cache / "features").iterdir())) == 2  # test split + Hessian pairs
    assert list(fresh_cache.rglob("*.tmp")) == []
    for path in fresh_cache.rglob("*.pt"):
        if path.parent.name != "models":
            load_entry(path)


@pytest.mark.slow
def test_corrupt_cache_entries_are_rebuilt(fresh_cache, tmp_path, reference):
    results = tmp_path / "results"
    run(fresh_cache, results)
    entries = [p for p in fresh_cache.rglob("*.pt") if p.parent.name != "models"]
    assert len(entries) >= 3
    for path in entries:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    out = run(fresh_cache, results)
    assert "discarding unreadable entry" in out.stdout
    pd.testing.assert_frame_equal(table(results), reference)


@pytest.mark.slow
def test_posterior_cache_of_another_model_is_refused(fresh_cache, tmp_path):
    results = tmp_path / "results"
    run(fresh_cache, results)
    (posterior,) = (fresh_cache / "posteriors").glob("kfac-*.pt")
    entry = load_entry(posterior)
    entry["image"]["weight"] = torch.randn_like(entry["image"]["weight"])  # as if fitted for other weights
    save_entry(posterior, entry)
    out = run(fresh_cache, results, check=False)
    assert out.returncode == 2
    assert "fitted for another model" in out.stdout and "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("posterior.prior_precision=-1", "posterior.prior_precision must be a positive"),
        ("posterior.prior_precision=0", "posterior.prior_precision must be a positive"),
        ("posterior.n=0", "posterior.n must be a positive"),
        ("task=active_learning task.predictive=laplace", "task.predictive must be"),
        ("model.name=ViT-B-33", "unknown open_clip model 'ViT-B-33'"),
        ("model.name=ViT-B-32", "model.pretrained=shapes is uqvlm's own checkpoint"),
        ("hessian_data=published", "hessian_data=published provides KFAC factors only"),
        # The default posterior has a diagonal row, whose evidence has the exact variant only.
        ("posterior.evidence_variant=reference", "posterior.evidence_variant=reference (the published"),
        ("task.objective=val_acc", "task.objective must be null or val_nll"),
        # A method's constructor refusing its argument, and a library dataclass's own check, name their key.
        ("task.methods.tta.views=0", "task.methods.tta: tta views must be >= 1"),
        ("task=active_learning task.finetune.epochs=-1", "task.finetune: epochs must be an integer >= 0"),
        ("task=active_learning task.k_nearest=0", "task.k_nearest must be a positive integer"),
        ("dataset.domain=watercolour", "unknown domain 'watercolour'"),
        ("dataset.n=0", "empty"),
    ],
)
def test_bad_settings_fail_fast_with_a_clear_message(tmp_path, override, message, cli_error, compose):
    overrides = [
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.results_dir={tmp_path}/results",
        *override.split(),
    ]
    if override.startswith("hessian_data"):
        overrides.append("posterior=bayesvlm")
    cfg = compose(*overrides)
    assert message in cli_error(cfg)
    assert not (tmp_path / "cache" / "models").exists(), "nothing may be computed before the check"
    assert not (tmp_path / "cache" / "posteriors").exists()


def test_full_disk_gives_a_clear_error_and_leaves_nothing_partial(tmp_path, monkeypatch, capsys, compose):
    from uqvlm import cache, cli

    cfg = compose(f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/r")

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.os, "fsync", no_space)
    monkeypatch.setattr(
        cli, "run_task", lambda cfg: cache.save_entry(Path(cfg.paths.cache_dir) / "x" / "e.pt", {"a": 1})
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.task_main(cfg)
    assert exit_info.value.code == 2
    assert "No space left on device" in capsys.readouterr().out
    assert list((tmp_path / "cache" / "x").iterdir()) == []
