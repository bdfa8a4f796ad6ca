"""``uqvlm run [hydra overrides...]`` composes configs/ and runs the selected task."""

from __future__ import annotations

import errno
import json
import os
import sys
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig

from uqvlm.console import console
from uqvlm.errors import UqvlmError

USAGE = """usage: uqvlm run [overrides...]      compose configs/ and run a task (Hydra: --help, --cfg job, -m)
       uqvlm fetch [-m] [overrides...]   download what those runs need into the caches (for offline nodes)
       uqvlm report [--results DIR] [--out DIR]   gather all runs into the paper's tables and REPRODUCTION.md

examples:
  uqvlm run                                   the offline default: tiny CLIP on the shapes world
  uqvlm run dataset=shapes-noisy posterior=kfac
  uqvlm run model=clip-b32 dataset=imagenet-r
  uqvlm run -m posterior.prior_precision=1,10,100
  uqvlm fetch experiment=paper_zeroshot       then on the nodes: HF_HUB_OFFLINE=1 uqvlm run experiment=...
"""

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

if TYPE_CHECKING:
    from uqvlm.settings import RunSettings


def describe(settings: RunSettings) -> str:
    """The run's settings in one line per seam."""
    post, model = settings.posterior, settings.model
    return (
        f"[bold]task[/] {settings.task.name}  [bold]model[/] {model.name} ({model.pretrained})  "
        f"[bold]dataset[/] {settings.dataset.name}\n"
        f"[bold]posterior[/] {list(post.structures) or 'map only'} n={post.n:g} "
        f"prior_precision={post.prior_precision}  [bold]hessian data[/] {settings.hessian_data.name}\n"
        f"[bold]cache[/] {settings.paths.cache_dir}  [bold]results[/] {settings.paths.results_dir}"
    )


def run_task(cfg: DictConfig) -> float | None:
    """Check ``cfg`` into typed settings, then run the task ``uqvlm.tasks.<task.name>`` (or skip it when a
    finished run record exists); returns the objective for a sweeper (None without one)."""
    import importlib

    from uqvlm.tasks.common import load_settings

    settings = load_settings(cfg)
    console.print(describe(settings))
    module = importlib.import_module(f"uqvlm.tasks.{settings.task.name}")
    if should_skip_existing(settings.skip_existing):
        record = module.finished_record(settings)
        if record is not None:
            console.print(f"[green]already done[/] (same config hash): {record}; skipping")
            return json.loads(record.read_text()).get("provenance", {}).get("objective")
    return module.run(settings).objective


def should_skip_existing(setting: bool | str) -> bool:
    """``skip_existing: auto`` skips finished configs in multiruns (so a re-launched sweep resumes)."""
    if setting == "auto":
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return bool(setting)


# The user's HYDRA_FULL_ERROR while `uqvlm run` takes over Hydra's reporting of composition errors.
_user_full_error: str | None = None


def task_main(cfg: DictConfig) -> float | None:
    """Hydra's task function (module-level and undecorated, so launchers such as submitit can pickle it
    by reference)."""
    if _user_full_error is not None:  # composition is over: Hydra reports the job's own errors again
        os.environ["HYDRA_FULL_ERROR"] = _user_full_error
    try:
        return run_task(cfg)
    except UqvlmError as err:
        # Bad input (config values, data, caches): one clear line. UQVLM_DEBUG=1 shows the traceback.
        # Any other exception is a bug and keeps its traceback.
        if os.environ.get("UQVLM_DEBUG"):
            raise
        console.print(f"[bold red]error:[/] {err}")
        raise SystemExit(2) from None
    except OSError as err:
        if err.errno not in DISK_ERRORS or os.environ.get("UQVLM_DEBUG"):
            raise
        console.print(
            f"[bold red]error:[/] cannot write {err.filename or 'output'}: {err.strerror}. Nothing partial was "
            "left behind (writes are atomic); free space or choose paths.cache_dir / paths.results_dir elsewhere."
        )
        raise SystemExit(2) from None


_hydra_main = hydra.main(config_path="pkg://uqvlm.configs", config_name="config", version_base="1.3")(
    task_main
)


def override_error_message(err: Exception) -> str | None:
    """One line for an override of a key the composed config lacks (Hydra: "Key 'domian' is not in
    struct"): the closest known key, or the ``+key=value`` form for a known key this config leaves out."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    from uqvlm.tasks.keys import allowed_keys, moved_key_message
    from uqvlm.validation import unknown_key_message

    cause = err.__cause__
    if not isinstance(cause, ConfigAttributeError | ConfigKeyError) or "not in struct" not in str(cause):
        return None
    parent = cause.parent_node
    if not cause.full_key or parent is None:
        return None
    section, _, key = str(cause.full_key).rpartition(".")
    if moved := moved_key_message(str(cause.full_key)):
        return moved
    try:
        allowed = allowed_keys(parent._get_root(), section)
    except Exception:  # noqa: BLE001 - another problem of this config, named by the settings later
        allowed = None
    if allowed is None:
        allowed = set(parent.keys())
    if key in allowed:
        # Hydra's message ends with the override as it should read: "... use +dataset.val_split=val".
        added = str(err).rsplit(" use ", 1)[-1] if " use +" in str(err) else f"+{cause.full_key}=..."
        return f"{cause.full_key} is not set in this config: add it with a leading +, as {added}"
    return unknown_key_message(section, [key], allowed)


def run(overrides: list[str]) -> None:
    """``uqvlm run``: Hydra composes the config and calls ``task_main``. Hydra's composition errors
    come back here, so an override of an unknown key ends in one uqvlm line with the closest known key,
    like the keys the settings refuse; the other errors read as Hydra writes them."""
    global _user_full_error
    from hydra.errors import CompactHydraException, ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    sys.argv = [f"{os.path.basename(sys.argv[0])} run", *overrides]
    user_setting = os.environ.get("HYDRA_FULL_ERROR")
    _user_full_error = user_setting or "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; task_main restores it
    try:
        _hydra_main()
    except CompactHydraException as err:
        if _user_full_error == "1" or os.environ.get("UQVLM_DEBUG"):
            raise
        message = override_error_message(err) if isinstance(err, ConfigCompositionException) else None
        if message is not None:
            console.print(f"[bold red]error:[/] {message}")
            raise SystemExit(2) from None
        print(err, file=sys.stderr)
        if isinstance(err.__cause__, OmegaConfBaseException):
            print(err.__cause__, file=sys.stderr)
        print(
            "\nSet the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.", file=sys.stderr
        )
        raise SystemExit(1) from None
    finally:
        # Runs that never reach task_main (--cfg, --help, composition errors) leave the user's setting too.
        if user_setting is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = user_setting


def fetch(argv: list[str]) -> None:
    """``uqvlm fetch``: the artefacts of the runs these overrides compose, into the caches (uqvlm/fetch.py).
    Exits 1 when something is still missing, 2 on bad input (one line)."""
    from hydra.errors import HydraException

    from uqvlm.fetch import fetch as fetch_artifacts

    try:
        status = fetch_artifacts(argv)
    except (UqvlmError, HydraException) as err:
        if os.environ.get("UQVLM_DEBUG"):
            raise
        message = override_error_message(err) if isinstance(err, HydraException) else None
        console.print(f"[bold red]error:[/] {message or str(err).splitlines()[0]}")
        raise SystemExit(2) from None
    if status:
        raise SystemExit(status)


def report(argv: list[str]) -> None:
    import argparse

    from uqvlm.report import write_report

    parser = argparse.ArgumentParser(prog="uqvlm report", description="gather all runs into tables")
    parser.add_argument("--results", default="results", help="results directory to read (default: results)")
    parser.add_argument("--out", default=None, help="where to write the tables (default: <results>/tables)")
    args = parser.parse_args(argv)
    write_report(args.results, args.out)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command == "run":
        run(rest)
        return
    if command == "fetch":
        fetch(rest)
        return
    if command == "report":
        report(rest)
        return
    print(f"uqvlm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    # `python -m uqvlm.cli`: run the functions of the importable module, not of __main__, so launchers
    # (submitit) pickle the task function by reference.
    from uqvlm.cli import main as importable_main

    importable_main()
