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
