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


@pytest.fixture(scope="session")
def test_cache() -> Path:
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE


@pytest.fixture(scope="session")
def tiny_checkpoint(test_cache: Path) -> Path:
    """The shapes-pretrained tiny CLIP checkpoint (trained on first use, then cached)."""
    from uqvlm.models.pretrained import ensure_pretrained

    return ensure_pretrained(test_cache)


@pytest.fixture
def one_thread():
    # Two intra-op threads on the shared 2-core machine ran 10-30x slower than one, on small tensors.
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_hessians() -> Path:
    path = SHARED / "reference-hessians" / "clip-vit-b-32-laion2b-s34b-b79k"
    if not path.is_dir():
        pytest.skip("../shared/reference-hessians is not present")
    return path
