"""The command line: usage, Hydra's help and errors, and clear errors before any compute."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def uqvlm(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "uqvlm.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def test_usage_without_arguments():
    out = uqvlm()
    assert out.returncode == 0 and "uqvlm run" in out.stdout


def test_unknown_command():
    out = uqvlm("frobnicate")
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_hydra_help_lists_groups():
    out = uqvlm("run", "--help")
    assert out.returncode == 0
    for group in ("model:", "dataset:", "posterior:", "task:"):
        assert group in out.stdout


def test_unknown_option_lists_available():
    out = uqvlm("run", "dataset=no-such-set")
    assert out.returncode != 0
    assert "Available options in 'dataset'" in out.stderr and "shapes-sketch" in out.stderr


@pytest.mark.parametrize("which", ["results", "cache"])
def test_unwritable_directory_fails_before_compute(tmp_path, which):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    start = time.perf_counter()
    out = uqvlm(
        "run",
        f"paths.{which}_dir={blocker}/sub",
        f"paths.log_dir={tmp_path}/logs",
        env={"UQVLM_CACHE": str(tmp_path / "cache")},
    )
    assert out.returncode == 2, out.stderr
    assert f"The {which} directory" in out.stdout and "not writable" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
    assert not (tmp_path / "cache" / "models").exists(), "nothing may be computed before the check"
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        # Without +, Hydra refuses the key while composing ("not in struct"); uqvlm words it.
        (["dataset.domian=photo"], "error: unknown key dataset.domian; did you mean dataset.domain?"),
        (["+dataset.domian=photo"], "error: unknown key dataset.domian; did you mean dataset.domain?"),
        (
            ["task.methods.tta.veiws=2"],
            "error: unknown key task.methods.tta.veiws; did you mean task.methods.tta.views?",
        ),
        (["sed=1"], "error: unknown key sed; did you mean seed?"),
        # A known key the chosen option leaves out needs Hydra's + form.
        (
            ["dataset=cifar10", "dataset.val_split=train"],
            "error: dataset.val_split is not set in this config: add it with a leading +, as +dataset.val_split=train",
        ),
    ],
)
def test_unknown_key_ends_in_one_line_with_a_suggestion(tmp_path, overrides, line):
    out = uqvlm(
        "run",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.results_dir={tmp_path}/results",
        f"paths.log_dir={tmp_path}/logs",
        *overrides,
        env={"COLUMNS": "300"},
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stdout.strip().splitlines()[-1] == line
    assert "Traceback" not in out.stdout + out.stderr and "not in struct" not in out.stderr
    assert not (tmp_path / "cache").exists(), "nothing may be computed before the check"


def test_typo_in_a_user_written_dataset_config(tmp_path):
    """A config file of the user's own (on hydra.searchpath) is checked like the shipped ones."""
    (tmp_path / "conf" / "dataset").mkdir(parents=True)
    (tmp_path / "conf" / "dataset" / "my-shapes.yaml").write_text(
        "name: my-shapes\nkind: shapes\ndomian: photo\nsplit: test\nn: 100\n"
    )
    out = uqvlm(
        "run",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "dataset=my-shapes",
        f"paths.cache_dir={tmp_path}/cache",
        f"paths.results_dir={tmp_path}/results",
        f"paths.log_dir={tmp_path}/logs",
        env={"COLUMNS": "300"},
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert (
        out.stdout.strip().splitlines()[-1]
        == "error: unknown key dataset.domian; did you mean dataset.domain?"
    )
    assert not (tmp_path / "cache").exists()


def test_other_composition_errors_read_as_hydra_writes_them():
    out = uqvlm("run", "posterior.n=[")
    assert out.returncode == 1
    assert "no viable alternative" in out.stderr and "HYDRA_FULL_ERROR=1" in out.stderr
    assert "Traceback" not in out.stderr
