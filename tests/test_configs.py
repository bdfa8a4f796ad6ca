"""Every option of every config group composes; Hydra's errors list the available options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException

REPO = Path(__file__).resolve().parents[1]
GROUPS = ["model", "dataset", "posterior", "task", "paths", "hessian_data"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))


def compose_with(*overrides: str):
    with initialize_config_module("uqvlm.configs", version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option):
    cfg = compose_with(f"{group}={option}")
    section = cfg[group]
    required = {
        "model": {"name", "pretrained", "precision", "batch_size"},
        "dataset": {"name", "kind"},
        "posterior": {"structures", "n", "prior_precision", "predictive"},
        "task": {"name"},
        "paths": {"cache_dir", "results_dir"},
        "hessian_data": {"name", "kind"},
    }[group]
    assert required <= set(section.keys()), f"{group}={option} lacks {required - set(section.keys())}"


def test_default_is_the_offline_world():
    cfg = compose_with()
    assert cfg.model.name == "uqvlm-tiny" and cfg.dataset.kind == "shapes" and cfg.task.name == "zeroshot"
    assert cfg.dataset.domain != "photo", "the demo evaluates a shifted domain"


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("UQVLM_CACHE", str(tmp_path))
    assert compose_with().paths.cache_dir == str(tmp_path)


def test_unknown_option_lists_available():
    with pytest.raises(MissingConfigException) as err:
        compose_with("model=no-such-model")
    assert "uqvlm-tiny" in str(err.value) and "Available options" in str(err.value)


def test_configs_ship_in_a_non_editable_install(tmp_path):
    """A plain `pip install .` (here: into a target dir) still finds the config tree."""
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    code = (
        "import uqvlm, hydra; from hydra import compose, initialize_config_module\n"
        "assert 'site' in uqvlm.__file__, uqvlm.__file__\n"
        "with initialize_config_module('uqvlm.configs', version_base='1.3'):\n"
        "    cfg = compose('config', overrides=['posterior=kfac'])\n"
        "print(cfg.model.name, cfg.posterior.structures[0])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "PATH": ""},
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["uqvlm-tiny", "kfac"]


def test_package_list_matches_source_tree():
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "uqvlm").rglob("__init__.py")}
    assert found | {"uqvlm.configs"} == listed


def test_unset_mandatory_data_key_names_the_key_to_set():
    """A ``???`` left in a data section fails with the override to set, not omegaconf's own error."""
    from uqvlm.data.registry import build_pair_dataset, build_zeroshot_dataset
    from uqvlm.errors import DataUnavailableError

    cfg = compose_with("dataset=ucf101", "hessian_data=laion400m")
    with pytest.raises(DataUnavailableError, match=r"dataset 'ucf101' needs root: .* dataset\.root="):
        build_zeroshot_dataset(cfg.dataset)
    with pytest.raises(
        DataUnavailableError, match=r"hessian_data 'laion400m' needs root: .* hessian_data\.root="
    ):
        build_pair_dataset(cfg.hessian_data)


def test_to_plain_resolves_containers_and_leaves_plain_values():
    from omegaconf import OmegaConf

    from uqvlm.config_utils import to_plain

    cfg = OmegaConf.create({"a": 1, "c": [1, "${a}"], "d": {"e": "${a}"}})
    assert to_plain(cfg) == {"a": 1, "c": [1, 1], "d": {"e": 1}}
    assert type(to_plain(cfg.c)) is list and type(to_plain(cfg.d)) is dict
    plain = {"x": [1, 2]}
    assert to_plain(plain) is plain and to_plain(None) is None and to_plain("paper") == "paper"
