"""``uqvlm run [hydra overrides...]`` composes configs/ and runs the selected task."""

from __future__ import annotations

import errno
import json
import os
import sys

import hydra
from omegaconf import DictConfig

from uqvlm.console import console
from uqvlm.errors import UqvlmError

USAGE = """usage: uqvlm run [overrides...]      compose configs/ and run a task (Hydra: --help, --cfg job, -m)
       uqvlm report [--results DIR] [--out DIR]   gather all runs into the paper's tables

examples:
  uqvlm run                                   the offline default: tiny CLIP on the shapes world
  uqvlm run dataset=shapes-noisy posterior=kfac
  uqvlm run model=clip-b32 dataset=imagenet-r
  uqvlm run -m posterior.prior_precision=1,10,100
"""

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

TASKS = {
    "zeroshot": "uqvlm.tasks.zeroshot",
    "hessian": "uqvlm.tasks.hessian",
    "active_learning": "uqvlm.tasks.active_learning",
}


def describe(cfg: DictConfig) -> str:
    """The composed config in one line per seam."""
    post = cfg.posterior
    return (
        f"[bold]task[/] {cfg.task.name}  [bold]model[/] {cfg.model.name} ({cfg.model.pretrained})  "
        f"[bold]dataset[/] {cfg.dataset.name}\n"
        f"[bold]posterior[/] {list(post.structures) or 'map only'} n={post.n} "
        f"prior_precision={post.prior_precision} predictive={post.predictive}  "
        f"[bold]hessian data[/] {cfg.hessian_data.name}\n"
        f"[bold]cache[/] {cfg.paths.cache_dir}  [bold]results[/] {cfg.paths.results_dir}"
    )


def run_task(cfg: DictConfig):
    """Run ``cfg.task.name``; uqvlm's own errors become one clear line and exit status 2."""
    import importlib

    name = cfg.task.name
    if name not in TASKS:
        raise UqvlmError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    console.print(describe(cfg))
    module = importlib.import_module(TASKS[name])
    if should_skip_existing(cfg) and hasattr(module, "finished_record"):
        record = module.finished_record(cfg)
        if record is not None:
            console.print(f"[green]already done[/] (same config hash): {record}; skipping")
            return json.loads(record.read_text()).get("provenance", {}).get("objective")
    result = module.run(cfg)
    return getattr(result, "attrs", {}).get("objective")


def should_skip_existing(cfg: DictConfig) -> bool:
    """``skip_existing: auto`` skips finished configs in multiruns (so a re-launched sweep resumes)."""
    setting = cfg.get("skip_existing", "auto")
    if setting == "auto":
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return bool(setting)


def task_main(cfg: DictConfig) -> float | None:
    """Hydra's task function (module-level and undecorated, so launchers such as submitit can pickle it
    by reference)."""
    try:
        return run_task(cfg)
    except (UqvlmError, ValueError) as err:
        # Bad input (config values, data, caches): one clear line. UQVLM_DEBUG=1 shows the traceback.
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
        os.environ.setdefault("HYDRA_FULL_ERROR", "0")
        sys.argv = [f"{os.path.basename(sys.argv[0])} run", *rest]
        _hydra_main()
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
