"""``santa repl``: load the model once and start the interactive session (the REPL itself is
the :mod:`santacli.repl` package, imported only when the command runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from santacli.cli.options import DEFAULT_MARKER, CommonOptions, with_common_options
from santacli.settings import load_settings


@with_common_options(files=False, remote=False)
def repl(
    common: CommonOptions,
    marker: Annotated[str, typer.Option(help="Cursor marker for infill.")] = DEFAULT_MARKER,
    history: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="History file [default: santa/history in the platform data dir].")] = None,
) -> None:
    """An interactive session that keeps the model loaded: type code, get completions."""
    from santacli.repl.ui import no_echo, run

    settings = load_settings()
    opts = common.completion_options(settings, None)
    with no_echo():  # keys typed while the model loads wait for the prompt instead of showing as ^[[A
        engine = common.load_engine(settings)
    run(engine, opts, marker=marker, history_file=history)
