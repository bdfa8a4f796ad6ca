"""Results: CSV + Markdown + a JSON record per run on disk, and a rich table on the console.

Each run writes ``<dir>/<stem>.{csv,md,json}`` (the latest result for that dataset and model) and a
record ``<dir>/runs/<stem>-<config hash>.json`` with the config, the rows and their provenance, which
``uqvlm report`` aggregates and which lets a re-launched sweep skip finished jobs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from rich.table import Table

from uqvlm.cache import atomic_write
from uqvlm.console import console

if TYPE_CHECKING:
    from uqvlm.settings import ModelSettings

# Keys that change where or how fast a run happens, not what it computes.
NON_SEMANTIC_KEYS = ("paths", "device", "num_workers", "compile", "hydra", "skip_existing")


def model_slug(model: ModelSettings) -> str:
    """A file-name-safe model identifier: the open_clip name, plus the pretrained tag when it is one."""
    name = str(model.name).replace("/", "_")
    tag = model.pretrained
    if tag in (None, "", "shapes") or "/" in str(tag) or str(tag).startswith(("hf-hub:", "local-dir:")):
        return name
    return f"{name}_{tag}"


# Keys of sections that only split the work: how many jobs estimate the Hessians, and which one this is.
NON_SEMANTIC_SECTION_KEYS = {"hessian_data": ("num_parts", "part")}


def config_hash(config: Mapping[str, Any]) -> str:
    """A hash of everything in the (resolved, plain) config that determines the results."""
    semantic = {k: v for k, v in config.items() if k not in NON_SEMANTIC_KEYS}
    for section, keys in NON_SEMANTIC_SECTION_KEYS.items():
        if isinstance(semantic.get(section), Mapping):
            semantic[section] = {k: v for k, v in semantic[section].items() if k not in keys}
    return hashlib.sha256(json.dumps(semantic, sort_keys=True, default=str).encode()).hexdigest()[:12]


def record_path(directory: Path, stem: str, config: Mapping[str, Any]) -> Path:
    return directory / "runs" / f"{stem}-{config_hash(config)}.json"


def write_results(
    table: pd.DataFrame,
    directory: Path,
    stem: str,
    *,
    title: str,
    config: Mapping[str, Any],
    provenance: dict[str, Any] | None = None,
    latex: bool = False,
    significant: bool = False,
) -> dict[str, Path]:
    """Write the table and its run record (with ``config``, the resolved config) atomically, then print it.
    ``latex``: also ``<stem>.tex``; ``significant``: floats with significant digits (6 in the CSV, 4 in
    the Markdown and LaTeX) instead of fixed decimals, for columns of very different scales (the
    studies' tables)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {
        "csv": directory / f"{stem}.csv",
        "md": directory / f"{stem}.md",
        "json": directory / f"{stem}.json",
        "record": record_path(directory, stem, config),
    }
    if latex:
        paths["tex"] = directory / f"{stem}.tex"
    record = {
        "title": title,
        "config_hash": config_hash(config),
        "config": dict(config),
        "rows": json.loads(table.to_json(orient="records")),
        "provenance": provenance or {},
    }
    with atomic_write(paths["csv"], "w") as f:
        table.to_csv(f, index=False, float_format="%.6g" if significant else "%.5f")
    with atomic_write(paths["md"], "w") as f:
        f.write(table.to_markdown(index=False, floatfmt=".4g" if significant else ".4f") + "\n")
    if latex:
        with atomic_write(paths["tex"], "w") as f:
            f.write(table.to_latex(index=False, float_format="%.4g", caption=title, na_rep="--"))
    for key in ("json", "record"):
        with atomic_write(paths[key], "w") as f:
            json.dump(record, f, indent=2, default=str)
    print_table(table, title)
    console.print(f"results: {paths['csv']}  {paths['md']}")
    return paths


def print_table(table: pd.DataFrame, title: str) -> None:
    rich_table = Table(title=title)
    for col in table.columns:
        rich_table.add_column(str(col), justify="left" if table[col].dtype == object else "right")
    for _, row in table.iterrows():
        rich_table.add_row(*[f"{v:.4f}" if isinstance(v, float) else str(v) for v in row])
    console.print(rich_table)
