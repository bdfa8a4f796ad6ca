"""Every option of every config group composes; Hydra's errors list the available options."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
GROUPS = ["model", "dataset", "posterior", "task", "paths", "hessian_data"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (REPO / "configs" / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes(group, option, compose):
    from uqvlm.data.sections import apply_protocol

    cfg = compose(f"{group}={option}")
    section = OmegaConf.to_container(cfg[group])
    if group == "dataset":  # a dataset offering protocols is the section of its chosen one
        section = apply_protocol(section)
    required = {
        "model": {"name", "pretrained", "precision", "batch_size"},
        "dataset": {"name", "kind"},
        "posterior": {"structures", "n", "prior_precision", "evidence_variant"},
        "task": {"name"},
        "paths": {"cache_dir", "results_dir"},
        "hessian_data": {"name", "kind"},
    }[group]
    assert required <= set(section.keys()), f"{group}={option} lacks {required - set(section.keys())}"


def test_default_is_the_offline_world(compose):
    cfg = compose()
    assert cfg.model.name == "uqvlm-tiny" and cfg.dataset.kind == "shapes" and cfg.task.name == "zeroshot"
    assert cfg.dataset.domain != "photo", "the demo evaluates a shifted domain"


def test_cache_dir_follows_environment(monkeypatch, tmp_path, compose):
    monkeypatch.setenv("UQVLM_CACHE", str(tmp_path))
    assert compose().paths.cache_dir == str(tmp_path)


def test_unknown_option_lists_available(compose):
    with pytest.raises(MissingConfigException) as err:
        compose("model=no-such-model")
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


def test_unset_mandatory_data_key_names_the_key_to_set(compose):
    """A ``???`` left in a data section fails with the override to set, not omegaconf's own error."""
    from uqvlm.data.registry import build_pair_dataset, build_zeroshot_dataset
    from uqvlm.errors import DataUnavailableError

    cfg = compose("dataset=imagenet-r-folder", "hessian_data=laion400m")
    with pytest.raises(DataUnavailableError, match=r"dataset 'imagenet-r' needs root: .* dataset\.root="):
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


AL_DATA = sorted(p.stem for p in (REPO / "configs" / "task" / "data").glob("*.yaml"))


@pytest.mark.parametrize(
    "overrides",
    [[f"{g}={o}"] for g in GROUPS for o in options(g)]
    + [["task=active_learning", f"task/data={o}"] for o in AL_DATA]
    + [[f"experiment={o}"] for o in options("experiment")],
    ids=lambda o: " ".join(o),
)
def test_every_shipped_option_holds_only_declared_keys(overrides, compose):
    """Every key of every shipped option is one the code reads (a constructor argument or a declared
    task key): a key added to a YAML without a reader is refused here (ucf101.yaml once carried three).
    The experiments pass the whole validation (paper_zeroshot: the reference evidence with KFAC only)."""
    from uqvlm.tasks.common import load_settings
    from uqvlm.tasks.keys import check_config_keys

    cfg = compose(*overrides)
    check_config_keys(cfg)
    if overrides[0].startswith("experiment="):
        load_settings(cfg)


# (override, the line it must end in): a typo in each group, with its closest known key.
TYPOS = [
    ("+dataset.domian=photo", "unknown key dataset.domian; did you mean dataset.domain?"),
    (
        "+hessian_data.clas_batch=100",
        "unknown key hessian_data.clas_batch; did you mean hessian_data.class_batch?",
    ),
    (
        "+posterior.prior_precison=10",
        "unknown key posterior.prior_precison; did you mean posterior.prior_precision?",
    ),
    ("+task.ece_bin=15", "unknown key task.ece_bin; did you mean task.ece_bins?"),
    ("+task.methods.tta.veiws=2", "unknown key task.methods.tta.veiws; did you mean task.methods.tta.views?"),
    ("+model.precison=fp16", "unknown key model.precison; did you mean model.precision"),
    (
        "+dataset.qqqqqq=1",
        "unknown key dataset.qqqqqq; dataset takes class_ids, domain, image_size, kind, n, name",
    ),
    ("+posterior.mc_samples=10", "posterior.mc_samples is now task.mc_samples (task=active_learning"),
]
AL_TYPOS = [
    ("+task.epig.lazzy=false", "unknown key task.epig.lazzy; did you mean task.epig.lazy?"),
    ("+task.finetune.epoch=3", "unknown key task.finetune.epoch; did you mean task.finetune.epochs?"),
    (
        "+task.data.common.imag_size=16",
        "unknown key task.data.common.imag_size; did you mean task.data.common.image_size?",
    ),
    (
        "+task.data.domains.photo.domian=blur",
        "unknown key task.data.domains.photo.domian; did you mean task.data.domains.photo.domain?",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [([o], m) for o, m in TYPOS]
    + [(["task=active_learning", o], m) for o, m in AL_TYPOS]
    + [
        (
            ["hessian_data=published", "posterior=kfac", "+hessian_data.dri=x"],
            "did you mean hessian_data.dir?",
        )
    ],
)
def test_unknown_keys_stop_before_compute_with_a_suggestion(tmp_path, overrides, message, cli_error, compose):
    paths = [f"paths.cache_dir={tmp_path}/cache", f"paths.results_dir={tmp_path}/results"]
    cfg = compose(*paths, *overrides)
    assert message in cli_error(cfg)
    assert not (tmp_path / "cache").exists(), "nothing may be computed before the check"


def test_registry_refuses_keys_its_constructor_does_not_take():
    from uqvlm.data.registry import build_pair_dataset, build_zeroshot_dataset
    from uqvlm.errors import UqvlmError

    photo = OmegaConf.load(REPO / "configs" / "dataset" / "shapes-photo.yaml")
    photo.n = 4
    assert len(build_zeroshot_dataset(photo)) == 4  # name, kind and val_split are the tasks' keys
    photo.domian = "sketch"
    with pytest.raises(UqvlmError, match=r"unknown key dataset\.domian; did you mean dataset\.domain\?"):
        build_zeroshot_dataset(photo)
    pairs = OmegaConf.load(REPO / "configs" / "hessian_data" / "shapes.yaml")
    pairs.n = 4
    assert len(build_pair_dataset(pairs)) == 4
    pairs.sed = 1
    with pytest.raises(UqvlmError, match=r"hessian_data\.sed; did you mean hessian_data\.seed\?"):
        build_pair_dataset(pairs)


def _data_sections(compose) -> list[tuple[str, str, dict]]:
    """(path, group, section as the registry receives it) of every shipped dataset and Hessian-data
    option and every active-learning domain (``common`` merged under it, the split the task adds)."""
    from uqvlm.data.registry import zeroshot_dataset_keys
    from uqvlm.data.sections import apply_protocol

    out = []
    for group in ("dataset", "hessian_data"):
        for option in options(group):
            section = OmegaConf.to_container(compose(f"{group}={option}")[group])
            for protocol in section.get("protocols") or [None]:
                if protocol is None:
                    out.append((f"{group}={option}", group, section))
                    continue
                # As the registry builds it: the protocol's entry merged, unset keys of other kinds dropped.
                chosen = apply_protocol({**section, "protocol": protocol})
                keys = zeroshot_dataset_keys(chosen["kind"])
                chosen = {k: v for k, v in chosen.items() if k in keys or v is not None}
                out.append((f"{group}={option} protocol={protocol}", group, chosen))
    for option in AL_DATA:
        data = OmegaConf.to_container(compose("task=active_learning", f"task/data={option}").task.data)
        native = (data.get("splits") or {}).get("by", "native") == "native"
        for domain, spec in data["domains"].items():
            section = {**data["common"], **(spec or {}), **({"split": "test"} if native else {})}
            out.append((f"task/data={option} {domain}", "dataset", section))
    return out


def test_every_data_option_binds_its_constructor(compose):
    """Each shipped data section, minus the tasks' keys its constructor does not take, binds to the
    signature of its kind's constructor: a key it lacks a parameter for, or a required argument the
    section leaves out, fails here, not in a run."""
    import inspect

    from uqvlm.data.registry import (
        DATASET_TASK_KEYS,
        FACTOR_KINDS,
        PAIR_KINDS,
        PAIR_TASK_KEYS,
        SELECTION_KEYS,
        ZEROSHOT_KINDS,
        constructor_keys,
    )
    from uqvlm.data.sections import PublishedFactorsSettings

    sections = _data_sections(compose)
    assert len(sections) > len(options("dataset")) + len(options("hessian_data"))
    for where, group, section in sections:
        kind = section["kind"]
        if group == "hessian_data" and kind in FACTOR_KINDS:
            factory, task_keys = PublishedFactorsSettings, frozenset()
        elif group == "hessian_data":
            factory, task_keys = PAIR_KINDS[kind], PAIR_TASK_KEYS
        else:  # the registry reads the selection keys (protocol, subset, class ids) itself
            factory, task_keys = ZEROSHOT_KINDS[kind], DATASET_TASK_KEYS | SELECTION_KEYS
        params = constructor_keys(factory) or frozenset()
        kwargs = {k: v for k, v in section.items() if k not in task_keys or k in params}
        try:
            inspect.signature(factory).bind(**kwargs)
        except TypeError as err:
            pytest.fail(f"{where}: {err}")


def make_runs(target: str) -> list[list[str]]:
    """The overrides of every `uqvlm run` line of a Makefile target, with the Makefile's own variables."""
    text = (REPO / "Makefile").read_text().replace("\\\n", " ")
    values = dict(re.findall(r"^(\w+) *[:?]?= *(.*)$", text, flags=re.M))
    recipe = text.split(f"\n{target}:", 1)[1].split("\n\n", 1)[0]
    runs = []
    for line in recipe.splitlines()[1:]:
        line = re.sub(r"\$\((\w+)\)", lambda m: values.get(m.group(1), m.group(0)), line)
        if " run " in line:
            runs.append([a for a in line.split(" run ", 1)[1].split() if a != "-m"])
    return runs


@pytest.mark.parametrize("target", ["reproduce", "reproduce-offline"])
def test_every_reproduce_step_composes_to_checked_settings(target, settings_of):
    runs = make_runs(target)
    assert len(runs) >= 9, runs
    for overrides in runs:
        settings = settings_of(*overrides)
        assert settings.task.name, overrides
        if target == "reproduce-offline":  # it refreshes the committed results: nothing is skipped
            assert settings.skip_existing is False, overrides
