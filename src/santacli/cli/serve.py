"""``santa serve``: load the model once and serve completions over HTTP (the server itself is
the :mod:`santacli.server` package, imported only when the command runs)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from santacli.cli.options import Attention, CommonOptions, Decode, Device, Dtype, Model, Quantize
from santacli.settings import Settings, load_settings


def serve(
    model: Model = None, device: Device = None, dtype: Dtype = None, attention: Attention = None,
    quantize: Quantize = None, decode: Decode = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    api_key: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--api-key", envvar="SANTA_API_KEY", help='Require "Authorization: Bearer KEY".')] = None,
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="Allow binding a non-loopback address.")] = False,
    max_queue: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--max-queue", help=f"Queued requests before 503.  [default: {Settings.max_queue}]")] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--cors-origin", help="Let web pages from this origin (https://host[:port]) call the server "
        "(repeatable; none by default).")] = None,
    allowed_host: Annotated[Optional[list[str]], typer.Option(  # noqa: UP045
        "--allowed-host", help="Another name clients may reach the server by, beyond loopback names and "
        "--host (repeatable).")] = None,
) -> None:
    """Serve completions over HTTP (OpenAI, TGI and native APIs) with the model kept loaded."""
    from santacli.server.app import check_bind
    from santacli.server.app import serve as serve_http

    check_bind(host, allow_remote=allow_remote)
    settings = load_settings()
    common = CommonOptions(model=model, device=device, dtype=dtype, attention=attention, quantize=quantize,
                           decode=decode)
    engine = common.load_engine(settings)
    serve_http(engine, host=host, port=port, api_key=api_key, allow_remote=allow_remote,
               max_queue=settings.max_queue if max_queue is None else max_queue,
               cors_origins=cors_origin or (), allowed_hosts=allowed_host or ())
