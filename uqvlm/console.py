"""The shared rich console and progress bars."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(highlight=False)
if not console.is_terminal:
    # Logs and CI: wide enough that result tables are never truncated.
    console.width = max(console.width, 160)


def progress(*extra_columns) -> Progress:
    """A progress bar for long loops (rendered once at the end when output is not a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
