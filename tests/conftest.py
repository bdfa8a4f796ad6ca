"""Shared fixtures. Tests never touch the network (HF_HUB_OFFLINE) and never the user's cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
# Persistent across test runs (gitignored): the tiny model trains once per checkout, not per run.
TEST_CACHE = Path(os.environ.get("UQVLM_TEST_CACHE", REPO / ".cache" / "test"))


def _compose(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module("uqvlm.configs", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _settings(*overrides: str):
    from uqvlm.tasks.common import load_settings

    return load_settings(_compose(*overrides))


@pytest.fixture(scope="session")
def compose():
    """``compose(*overrides)``: the config ``uqvlm run`` composes from configs/ with these overrides."""
    return _compose


@pytest.fixture(scope="session")
def settings_of():
    """``settings_of(*overrides)``: the checked settings of that config, as a task receives them."""
    return _settings


@pytest.fixture(scope="session")
def test_cache() -> Path:
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE


@pytest.fixture(scope="session")
def tiny_checkpoint(test_cache: Path) -> Path:
    """The shapes-pretrained tiny CLIP checkpoint (trained on first use, then cached)."""
    from uqvlm.models.pretrained import ensure_pretrained

    return ensure_pretrained(test_cache)


@pytest.fixture(scope="session")
def reference_hessians() -> Path:
    path = SHARED / "reference-hessians" / "clip-vit-b-32-laion2b-s34b-b79k"
    if not path.is_dir():
        pytest.skip("../shared/reference-hessians is not present")
    return path
