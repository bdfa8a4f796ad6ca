"""``uqvlm run [hydra overrides...]`` composes configs/ and runs the selected task."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from uqvlm.console import console
from uqvlm.errors import UqvlmError

USAGE = """usage: uqvlm run [overrides...]      compose configs/ and run a task (Hydra: --help, --cfg job, -m)

examples:
  uqvlm run                                   the offline default: tiny CLIP on the shapes world
  uqvlm run dataset=shapes-noisy posterior=kfac
  uqvlm run model=clip-b32 dataset=imagenet-r
  uqvlm run -m posterior.prior_precision=1,10,100
"""

TASKS = {
    "zeroshot": "uqvlm.tasks.zeroshot",
    "hessian": "uqvlm.tasks.hessian",
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
    return importlib.import_module(TASKS[name]).run(cfg)


@hydra.main(config_path="pkg://uqvlm.configs", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run_task(cfg)
    except UqvlmError as err:
        console.print(f"[bold red]error:[/] {err}")
        raise SystemExit(2) from None


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
    print(f"uqvlm: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
