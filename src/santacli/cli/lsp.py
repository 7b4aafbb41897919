"""``santa lsp``: serve completions to editors over the Language Server Protocol (the server
itself is the :mod:`santacli.lsp` package, imported only when the command runs, with pygls)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from santacli.cli.options import CommonOptions, with_common_options
from santacli.errors import SantaError, UsageError
from santacli.settings import load_settings

if TYPE_CHECKING:
    from santacli.completion import CompletionEngine

# santacli.lsp.config's default, repeated so that `santa --help` loads nothing of santacli.lsp
# (a test keeps the two equal)
DEFAULT_BUDGET_MS = 2000


def parse_tcp(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) on a loopback address: the server has no
    authentication, so it is for debugging on this machine only.

    Raises:
        UsageError: malformed, or not a loopback address.
    """
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--tcp must be HOST:PORT, got {value!r}")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError(f"--tcp must use a loopback address (127.0.0.1, ::1 or localhost), got {host!r}")
    return host, int(port)


@with_common_options(files=False)
def lsp(
    common: CommonOptions,
    budget_ms: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--budget-ms", help=f"Time budget per completion in ms; then the text so far is returned.  "
                            f"[default: {DEFAULT_BUDGET_MS}]")] = None,
    tcp: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--tcp", metavar="HOST:PORT", help="Listen on a loopback TCP port instead of stdio (for debugging).")] = None,
) -> None:
    """Serve completions to editors over the Language Server Protocol (stdio): Helix, Zed, Neovim..."""
    address = parse_tcp(tcp) if tcp is not None else None
    settings = load_settings()
    options = common.completion_options(settings, None)
    try:
        from santacli.lsp.server import serve
    except ModuleNotFoundError as exc:
        if exc.name not in ("pygls", "lsprotocol", "cattrs", "attrs"):
            raise
        raise SantaError("santa lsp needs pygls: pip install 'santacli[lsp]'") from None
    from santacli.lsp.config import LspConfig

    config = LspConfig(model=common.model, endpoint=common.endpoint, max_tokens=options.max_tokens,
                       mode=options.mode, budget_ms=DEFAULT_BUDGET_MS if budget_ms is None else budget_ms)

    def load(model: str | None, endpoint: str | None) -> CompletionEngine:
        return replace(common, model=model, endpoint=endpoint).engine(settings)

    if not serve(load, options, config, tcp=address):
        raise typer.Exit(1)  # the client exited without a shutdown request (LSP: exit code 1)
