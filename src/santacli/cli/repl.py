"""``santa repl``: load the model once and start the interactive session (the REPL itself is
the :mod:`santacli.repl` package, imported only when the command runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from santacli.cli.options import (
    DEFAULT_MARKER,
    Attention,
    Candidates,
    CommonOptions,
    Decode,
    Device,
    Dtype,
    FimMode,
    MaxTokens,
    Mode,
    Model,
    Quantize,
    Seed,
    Temperature,
    TopK,
    TopP,
)
from santacli.settings import load_settings


def repl(
    model: Model = None, max_tokens: MaxTokens = None, temperature: Temperature = None, top_p: TopP = None,
    top_k: TopK = None, seed: Seed = None, candidates: Candidates = 1, mode: Mode = None,
    fim_mode: FimMode = None, device: Device = None, dtype: Dtype = None, attention: Attention = None,
    quantize: Quantize = None, decode: Decode = None,
    marker: Annotated[str, typer.Option(help="Cursor marker for infill.")] = DEFAULT_MARKER,
    history: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="History file [default: santa/history in the platform data dir].")] = None,
) -> None:
    """An interactive session that keeps the model loaded: type code, get completions."""
    from santacli.repl.ui import run

    settings = load_settings()
    common = CommonOptions(
        model=model, device=device, dtype=dtype, attention=attention, quantize=quantize, decode=decode,
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, n=candidates,
        mode=mode, fim_mode=fim_mode)
    opts = common.completion_options(settings, None)
    engine = common.load_engine(settings)
    run(engine, opts, marker=marker, history_file=history)
