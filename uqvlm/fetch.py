"""``uqvlm fetch <overrides as for run>``: put everything the composed runs need into the caches.

Compute nodes often have no internet. ``uqvlm fetch`` composes the same runs as ``uqvlm run`` would with
these overrides (a ``-m`` sweep or an experiment's sweep expanded into its jobs, nothing run), gathers the
artefacts each run declares (:mod:`uqvlm.artifacts`: model weights and tokenizers, dataset files, the
published factors, Hessian data), downloads those it can into the Hugging Face cache (hub repositories,
only the files the runs read) and the uqvlm cache (the published factors, verified by digest), and lists
what a person has to provide (split files, local shards). Then ``HF_HUB_OFFLINE=1 uqvlm run ...`` runs
from the caches. Offline it lists what is missing, within seconds. Exit status 0 when nothing is missing.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from uqvlm import hub
from uqvlm.artifacts import Artifact
from uqvlm.console import console
from uqvlm.errors import UqvlmError

__all__ = ["Outcome", "fetch", "job_configs", "run_artifacts"]

MULTIRUN_FLAGS = ("-m", "--multirun")
PRESENT, FETCHED, MISSING, MANUAL, FAILED = "present", "fetched", "missing", "by hand", "failed"


# --------------------------------------------------------------------------------- the composed jobs
def _compose(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    from hydra import compose, initialize_config_module

    with initialize_config_module("uqvlm.configs", version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


def job_overrides(overrides: list[str], multirun: bool = False) -> list[list[str]]:
    """The overrides of each job ``uqvlm run [-m] <overrides>`` would launch, as Hydra's basic sweeper
    splits them: the sweeper's ``params`` (an experiment's grid) then the command line, a later value of the
    same key winning, the cartesian product of the comma lists. Continuous search spaces (an Optuna
    sweep's ``interval``) choose no artefact and are left out."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    parser = OverridesParser.create()
    # Hydra's own settings (a launcher, its partition) choose no artefact, and their plugins may be absent.
    overrides = [o for o in overrides if not o.lstrip("+~").startswith(("hydra/", "hydra."))]
    parsed = parser.parse_overrides(overrides)
    plain = [o.input_line for o in parsed if not o.is_sweep_override()]
    base = _compose(plain, hydra_config=True)
    multirun = multirun or base.hydra.get("mode") == RunMode.MULTIRUN
    if not multirun:
        if len(plain) != len(parsed):
            sweep = next(o.input_line for o in parsed if o.is_sweep_override())
            raise UqvlmError(f"{sweep} is a sweep: add -m (as for uqvlm run -m)")
        return [plain]
    params = base.hydra.get("sweeper", {}).get("params") or {}
    combined = parser.parse_overrides([f"{k}={v}" for k, v in params.items()] + list(overrides))
    discrete = [o for o in combined if not o.is_sweep_override() or o.is_discrete_sweep()]
    return [job for batch in BasicSweeper.split_arguments(discrete, None) for job in batch]


def job_configs(overrides: list[str], multirun: bool = False) -> list[DictConfig]:
    """The composed config of each job (see :func:`job_overrides`)."""
    return [_compose(job) for job in job_overrides(overrides, multirun)]


# ------------------------------------------------------------------------------------ the artefacts
def _needed_splits(settings: Any) -> list[str]:
    return [settings.dataset.val_split] if settings.dataset.val_split else []


def _active_learning_artifacts(task: Any) -> list[Artifact]:
    from uqvlm.active.domains import pool_domains
    from uqvlm.data.artifacts import dataset_artifacts

    spec = task.data.section
    common = spec.get("common") or {}
    pool = pool_domains(spec)
    out = []
    for domain in dict.fromkeys([*pool, spec["target"]]):
        section = {**common, **(spec["domains"][domain] or {})}
        splits = (["train"] if domain in pool else []) + (["val", "test"] if domain == spec["target"] else [])
        out += dataset_artifacts({**section, "split": splits[0]}, f"task.data.domains.{domain}", splits[1:])
    return out


def run_artifacts(settings: Any) -> list[Artifact]:
    """What one run (its checked settings) needs: weights, the data it evaluates, its Hessian data."""
    from uqvlm.data.artifacts import dataset_artifacts, pair_artifacts
    from uqvlm.data.sections import PublishedFactorsSettings
    from uqvlm.models.weights import weight_artifacts
    from uqvlm.published import chosen_set, factor_artifacts
    from uqvlm.settings import ActiveLearningSettings, ZeroShotSettings

    model, task = settings.model, settings.task
    out = list(weight_artifacts(model.name, model.pretrained))
    if isinstance(task, ZeroShotSettings):
        out += dataset_artifacts(settings.dataset.section, "dataset", _needed_splits(settings))
    elif isinstance(task, ActiveLearningSettings):
        out += _active_learning_artifacts(task)
    if task.fitted_structures(settings.posterior):
        hessian = settings.hessian_data
        if isinstance(hessian, PublishedFactorsSettings):
            if hessian.dir is not None:
                out.append(
                    Artifact(
                        kind="manual",
                        what="hessian_data=published: dir",
                        path=os.path.expanduser(hessian.dir),
                        hint="hessian_data.dir=/path/to/factors",
                    )
                )
            else:
                checkpoint = chosen_set(hessian.checkpoint, model.name, model.pretrained)
                cache = os.path.expanduser(settings.paths.cache_dir)
                out += factor_artifacts(str(hessian.base_url), str(checkpoint), cache)
        else:
            out += pair_artifacts(hessian.section)
    return out


# --------------------------------------------------------------------------- presence and downloads
@dataclass
class Outcome:
    """What became of one artefact: ``status`` (present, fetched, missing, by hand, failed) and a detail."""

    artifact: Artifact
    status: str
    detail: str = ""


def _snapshot_files(a: Artifact) -> list[str] | None:
    snap = hub.cached_snapshot(a.repo_id, repo_type=a.repo_type, revision=a.revision)
    if snap is None:
        return None
    return [p.relative_to(snap).as_posix() for p in snap.rglob("*") if p.is_file()]


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def hub_present(a: Artifact) -> bool:
    """Whether the hub cache holds the artefact's files: every literal file name (with ``one_of``: one of
    them), and a file for the patterns with wildcards."""
    if a.one_of:
        return any(
            hub.cached_file(a.repo_id, f, repo_type=a.repo_type, revision=a.revision)
            for f in a.allow_patterns
        )
    literal = [p for p in a.allow_patterns if not _is_glob(p)]
    if any(
        hub.cached_file(a.repo_id, f, repo_type=a.repo_type, revision=a.revision) is None for f in literal
    ):
        return False
    globs = [p for p in a.allow_patterns if _is_glob(p)]
    if not globs:
        return True
    files = _snapshot_files(a)
    return bool(files) and any(fnmatch.fnmatch(f, p) for f in files for p in globs)


def _fetch_hub(a: Artifact) -> Outcome:
    from huggingface_hub import hf_hub_download, snapshot_download

    cache = hub.hub_cache_dir()
    try:
        if a.one_of:
            errors = []
            for filename in a.allow_patterns:
                try:
                    hf_hub_download(
                        a.repo_id, filename, repo_type=a.repo_type, revision=a.revision, cache_dir=cache
                    )
                    return Outcome(a, FETCHED, filename)
                except Exception as err:  # noqa: BLE001 - the repo lacks this alternative: try the next
                    errors.append(f"{filename}: {type(err).__name__}")
            return Outcome(a, FAILED, "; ".join(errors))
        before = set(_snapshot_files(a) or [])
        snapshot_download(
            a.repo_id,
            repo_type=a.repo_type,
            revision=a.revision,
            allow_patterns=list(a.allow_patterns) or None,
            cache_dir=cache,
        )
        new = set(_snapshot_files(a) or []) - before
        return Outcome(a, FETCHED if new else PRESENT, f"{len(new)} file(s)" if new else "")
    except Exception as err:  # noqa: BLE001 - one line per artefact; the others still run
        return Outcome(a, FAILED, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def _expected(a: Artifact):
    from uqvlm.published import FactorFile

    return FactorFile(a.extra["git_blob_sha1"], a.size, a.sha256)


def _url_outcome(a: Artifact) -> Outcome:
    from uqvlm.published import FactorSetError, download_verified, verify_file

    path = Path(a.path or "")
    expected = _expected(a)
    if path.is_file():
        try:
            verify_file(path, expected)
            return Outcome(a, PRESENT)
        except FactorSetError:
            pass  # a damaged copy: fetched again below
    if not hub.reachable(str(a.url)):
        return Outcome(a, MISSING, f"{os.path.dirname(str(a.url))}/ cannot be reached")
    try:
        download_verified(str(a.url), path, expected)
        return Outcome(a, FETCHED)
    except UqvlmError as err:
        return Outcome(a, FAILED, str(err))


def resolve(a: Artifact, download: bool) -> Outcome:
    """The artefact's state, after downloading it when ``download`` and it is missing."""
    if a.kind == "manual":
        there = a.path is not None and os.path.exists(a.path)
        return Outcome(a, PRESENT if there else MANUAL, a.hint)
    if a.kind == "url":
        # Not a hub file: fetched whenever its host answers (HF_HUB_OFFLINE is the hub's switch).
        return _url_outcome(a)
    present = hub_present(a)
    if not download:
        return Outcome(a, PRESENT) if present else Outcome(a, MISSING, "not in the Hugging Face cache")
    # Files named in full are complete once present; a pattern may match files a partial snapshot lacks,
    # which snapshot_download fills in (downloading nothing when there are none).
    if present and (a.one_of or not any(map(_is_glob, a.allow_patterns))):
        return Outcome(a, PRESENT)
    return _fetch_hub(a)


# ------------------------------------------------------------------------------------------ command
def _describe(group: list[Outcome]) -> str:
    a = group[0].artifact
    if a.kind == "hf_repo":
        rev = f"@{a.revision}" if a.revision else ""
        files = ", ".join(a.allow_patterns[:4]) + (", ..." if len(a.allow_patterns) > 4 else "")
        return f"{a.what}  [dim]{a.repo_id}{rev}: {files}[/]"
    if a.kind == "url":
        names = ", ".join(os.path.basename(o.artifact.path or "") for o in group)
        return f"{a.what}  [dim]{os.path.dirname(a.path or '')}/ {{{names}}}[/]"
    there = a.path is not None and os.path.exists(a.path)
    where = f"  [dim]{a.path}{'' if there else ' does not exist'}[/]" if a.path else ""
    return f"{a.what}{where}"


def _groups(outcomes: list[Outcome]) -> list[list[Outcome]]:
    """Outcomes in order, those of one artefact family (the files of a factor set) with one status together."""
    groups: dict[tuple[str, str, str], list[Outcome]] = {}
    for o in outcomes:
        groups.setdefault((o.artifact.kind, o.artifact.what, o.status), []).append(o)
    return list(groups.values())


def _unique(items: Iterable[Artifact]) -> list[Artifact]:
    return list(dict.fromkeys(items))


STYLE = {PRESENT: "green", FETCHED: "cyan", MISSING: "red", MANUAL: "yellow", FAILED: "red"}


def fetch(argv: list[str]) -> int:
    """``uqvlm fetch [-m] <overrides>``; returns the exit status (0: every artefact is on this machine)."""
    from uqvlm.tasks.common import load_settings

    multirun = any(a in MULTIRUN_FLAGS for a in argv)
    overrides = [a for a in argv if a not in MULTIRUN_FLAGS]
    if unknown := [a for a in overrides if a.startswith("-")]:
        raise UqvlmError(f"uqvlm fetch takes overrides as uqvlm run does (and -m), not {' '.join(unknown)}")
    configs = job_configs(overrides, multirun)
    artifacts: list[Artifact] = []
    for cfg in configs:
        artifacts += run_artifacts(load_settings(cfg))
    artifacts = _unique(artifacts)
    download = not hub.is_offline()
    state = "downloading what is missing" if download else "hub offline (HF_HUB_OFFLINE or no connection)"
    console.print(f"[bold]uqvlm fetch[/]: {len(configs)} run(s), {len(artifacts)} artefact(s); {state}")
    outcomes = [resolve(a, download) for a in artifacts]
    groups = _groups(outcomes)
    for group in groups:
        status = group[0].status
        if status == MANUAL:
            continue
        details = sorted({o.detail for o in group if o.detail})
        detail = f" ({'; '.join(details)})" if details else ""
        console.print(f"  [{STYLE[status]}]{status:8}[/] {_describe(group)}{detail}")
    manual = [g for g in groups if g[0].status == MANUAL]
    if manual:
        console.print("[bold]to provide by hand[/] (no download can):")
        for group in manual:
            console.print(f"  [yellow]{MANUAL:8}[/] {_describe(group)}: {group[0].detail}")
    lacking = [o for o in outcomes if o.status in (MISSING, MANUAL, FAILED)]
    counts = {s: sum(o.status == s for o in outcomes) for s in (PRESENT, FETCHED, MISSING, MANUAL, FAILED)}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    if lacking:
        console.print(f"[bold red]not ready[/]: {summary}")
        return 1
    console.print(f"[bold green]ready[/]: {summary}; `HF_HUB_OFFLINE=1 uqvlm run ...` runs from the caches")
    return 0
