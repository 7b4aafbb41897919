"""``santa models`` (the aliases and what the hub cache holds) and ``santa pull`` (download a
model into the hub cache)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from santacli import catalog
from santacli.cli.options import complete_model
from santacli.cli.output import err


def models() -> None:
    """List model aliases, what is cached locally and its size."""
    from rich.table import Table

    from santacli.hub import cached_models

    cached = dict(cached_models())
    rows: list[tuple[str, str, str, str]] = []
    for alias in catalog.ALIASES.values():
        if alias.repo_id:
            size = cached.pop(alias.repo_id, None)
            rows.append((alias.name, alias.repo_id, _size(size) if size is not None else "-", alias.description))
        else:
            present = (catalog.BUNDLED_DIR / "config.json").is_file()
            rows.append((alias.name, "(bundled)", "bundled" if present else "missing", alias.description))
    rows += [("", repo_id, _size(size), "in the hub cache") for repo_id, size in cached.items()]
    out = Console()
    if not out.is_terminal:
        # Pipes get plain tab-separated lines, easy to grep and never wrapped.
        sys.stdout.writelines("\t".join(row) + "\n" for row in rows)
        return
    table = Table(title="santa models", title_justify="left")
    for column in ("alias", "model", "cached", "about"):
        table.add_column(column, no_wrap=column != "about")
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def pull(model: Annotated[str, typer.Argument(help="Alias or hub id to download.",
                                              autocompletion=complete_model)]) -> None:
    """Download the config, tokenizer and safetensors of a model into the local hub cache."""
    from santacli.hub import download_model

    folder = download_model(model)
    err.print(f"santa: {model} is ready in {folder}", soft_wrap=True)
