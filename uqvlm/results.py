"""Results tables: CSV + Markdown + JSON provenance on disk, and a rich table on the console."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
from omegaconf import DictConfig
from rich.table import Table

from uqvlm.cache import atomic_write
from uqvlm.console import console


def model_slug(model_cfg: DictConfig) -> str:
    """A file-name-safe model identifier: the open_clip name, plus the pretrained tag when it is one."""
    name = str(model_cfg.name).replace("/", "_")
    tag = model_cfg.get("pretrained")
    if tag in (None, "", "shapes") or "/" in str(tag) or str(tag).startswith(("hf-hub:", "local-dir:")):
        return name
    return f"{name}_{tag}"


def write_results(
    table: pd.DataFrame, directory: Path, stem: str, *, title: str, extra: dict[str, Any] | None = None
) -> dict[str, Path]:
    """Write ``<stem>.csv``, ``<stem>.md`` (and ``<stem>.json`` with ``extra``) atomically; print it."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"csv": directory / f"{stem}.csv", "md": directory / f"{stem}.md"}
    with atomic_write(paths["csv"], "w") as f:
        table.to_csv(f, index=False, float_format="%.5f")
    with atomic_write(paths["md"], "w") as f:
        f.write(table.to_markdown(index=False, floatfmt=".4f") + "\n")
    if extra is not None:
        paths["json"] = directory / f"{stem}.json"
        with atomic_write(paths["json"], "w") as f:
            json.dump(extra, f, indent=2, default=str)
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
