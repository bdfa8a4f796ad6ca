"""``task=hessian_merge``: merge the cached parts of a split Hessian estimation (``hessian_data.num_parts``)
into the posteriors a single ``task=hessian`` job would cache. Refuses when a part is missing or was
computed for another config."""

from __future__ import annotations

from pathlib import Path

from uqvlm.console import console
from uqvlm.data.sections import PairDataSettings
from uqvlm.errors import ConfigError
from uqvlm.settings import RunSettings
from uqvlm.tasks.common import TaskResult, load_model, prepare_dirs
from uqvlm.tasks.hessian import merge_posteriors


def finished_record(settings: RunSettings) -> Path | None:
    """None: the merge is cached itself (a re-run loads it)."""
    return None


def run(settings: RunSettings) -> TaskResult:
    data = settings.hessian_data
    if not isinstance(data, PairDataSettings):
        raise ConfigError(
            f"task=hessian_merge merges parts estimated from pairs; hessian_data={data.name} has none"
        )
    dirs = prepare_dirs(settings.paths)
    model = load_model(settings, dirs)
    for structure in settings.task.fitted_structures(settings.posterior):
        posts, _ident = merge_posteriors(data, model, dirs, structure)
        for tower, post in posts.items():
            console.print(f"{structure} {tower}: {post!r}")
    console.print(f"posteriors cached under {dirs.cache / 'posteriors'}")
    return TaskResult()
