"""The command line: usage, Hydra's help and errors, and clear errors before any compute."""

from __future__ import annotations

import os
import subprocess
import sys
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
        # A key that moved to the one task that reads it says where it is now.
        (
            ["posterior.predictive=mc"],
            "error: posterior.predictive is now task.predictive (task=active_learning; zero-shot: "
            "task.methods.<name>.predictive)",
        ),
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


# A bug deep in the maths: the KFAC posterior's variance factors raise a ValueError as a shape bug would.
BROKEN_MATHS = """
import sys

from uqvlm.cli import main
from uqvlm.laplace.kfac import KFACPosterior


def broken_variance_factors(self, activations):
    raise ValueError("operands could not be broadcast together (a bug)")


KFACPosterior.variance_factors = broken_variance_factors
main(["run", *sys.argv[1:]])
"""


def test_a_bug_keeps_its_traceback_while_a_bad_setting_is_one_line(tmp_path, test_cache, tiny_checkpoint):
    """Only uqvlm's own errors (bad settings, data, files) become one line: a ValueError from inside the
    maths is a bug, and reaches the user with its traceback."""
    small = [
        f"paths.cache_dir={test_cache}",
        f"paths.results_dir={tmp_path}/results",
        f"paths.log_dir={tmp_path}/logs",
        f"model.pretrained={tiny_checkpoint}",
        "posterior=kfac",
        "dataset.n=40",
        "hessian_data.n=200",
        "hessian_data.class_batch=100",
        "~task.methods.temperature",
        "~task.methods.tta",
        "~task.methods.bayesvlm-kfac-mc",
        "~task.methods.probvlm",
        "~task.methods.probvlm-probit",
        "task.plots=false",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}
    env.pop("UQVLM_DEBUG", None)
    env.pop("HYDRA_FULL_ERROR", None)

    def run(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", BROKEN_MATHS, *small, *overrides],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
            env=env,
        )

    bug = run()
    assert bug.returncode == 1, bug.stdout[-2000:] + bug.stderr[-2000:]
    assert "Traceback" in bug.stderr and "in broken_variance_factors" in bug.stderr
    assert "ValueError: operands could not be broadcast together (a bug)" in bug.stderr
    assert "error:" not in bug.stdout
    assert not (tmp_path / "results" / "zeroshot").exists()

    bad = run("posterior.n=0")
    assert bad.returncode == 2, bad.stdout[-2000:] + bad.stderr[-2000:]
    assert bad.stdout.strip().splitlines()[-1] == "error: posterior.n must be a positive finite number, got 0"
    assert "Traceback" not in bad.stdout + bad.stderr
