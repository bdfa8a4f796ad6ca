"""Shared fixtures. Tests never touch the network (HF_HUB_OFFLINE) and never the user's cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Replicas of the real data sources (tests/replicas.py), shared by the tests that run the real configs.
from replicas import replica_env, replica_folders, replica_home  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (UQVLM_SHARED for a checkout elsewhere, e.g. a git worktree).
SHARED = Path(os.environ.get("UQVLM_SHARED", REPO.parent / "shared"))
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


@pytest.fixture
def cli_error(capsys):
    """``cli_error(cfg)``: runs the composed config's task as ``uqvlm run`` would, expects the project's
    one-line error (exit status 2) and returns the output, whitespace collapsed."""
    from uqvlm import cli

    def run(cfg) -> str:
        with pytest.raises(SystemExit) as exit_info:
            cli.task_main(cfg)
        assert exit_info.value.code == 2
        return " ".join(capsys.readouterr().out.split())

    return run


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


@pytest.fixture
def connections(monkeypatch):
    """Every TCP connection the test attempts, each refused at once as on a machine without network; the
    hub's reachability probe is forgotten first, so it runs (and is counted) again. Fail-fast checks count
    these instead of timing the test."""
    import errno
    import socket

    from uqvlm import hub

    attempts: list = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(errno.ENETUNREACH, "network is unreachable (tests)")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    hub.reachable.cache_clear()
    yield attempts
    hub.reachable.cache_clear()


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


@pytest.fixture(scope="session")
def vit_b32_checkpoint(test_cache: Path) -> Path:
    """A seeded random-init open_clip ViT-B-32 checkpoint FILE (the layout of a real one: a plain state
    dict), written once per test cache and shared: tests pass it as ``model.pretrained=<file>`` to run
    the real architecture's path without its weights."""
    return _random_init_checkpoint(test_cache, "ViT-B-32")


def _random_init_checkpoint(test_cache: Path, name: str, seed: int = 0) -> Path:
    import io

    import open_clip
    import torch
    from filelock import FileLock

    from uqvlm.cache import atomic_write

    path = test_cache / "models" / f"{name}-random-init-seed{seed}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.exists():
            torch.manual_seed(seed)
            model = open_clip.create_model(name, pretrained=None)
            buf = io.BytesIO()  # one archive name, so the bytes (and cache keys) do not depend on a temp name
            torch.save(model.state_dict(), buf)
            with atomic_write(path) as f:
                f.write(buf.getvalue())
    return path
