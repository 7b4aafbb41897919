"""``santa info``: a model's architecture, size, context, FIM sentinels and the backend santa
would use, read without loading its weights."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from santacli.cli.options import Attention, Device, Dtype, Quantize, Speculate, complete_model
from santacli.settings import load_settings


def info(
    model: Annotated[Optional[str], typer.Argument(  # noqa: UP045
        help="Alias, hub id or folder (default: configured).", autocompletion=complete_model)] = None,
    device: Device = None, dtype: Dtype = None, attention: Attention = None, quantize: Quantize = None,
    speculate: Speculate = None,
) -> None:
    """Show the architecture, size, context and FIM sentinels of a model, and the backend santa would use."""
    from santacli.engine import describe_model

    settings = load_settings()
    facts = describe_model(model or settings.resolved_model, device=device or settings.device,
                           dtype=dtype or settings.dtype, attention=attention or settings.attention,
                           quantize=quantize or settings.quantize, speculate=speculate or settings.speculate)
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        sys.stdout.write(f"{key:<{width}}  {value}\n")
