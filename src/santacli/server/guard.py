"""Who may talk to the server at all, checked before any route runs: the ``Host`` a request
names (a web page that rebinds its DNS name to 127.0.0.1 still sends its own name), the
``Origin`` a browser attaches, and CORS preflights, answered only for configured origins.

Together with the JSON-only bodies that the routes require (a page cannot send
``application/json`` cross-origin without a preflight), this keeps web pages from driving a
local server.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from santacli.server.wire import ApiError, error_body

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
TGI_PATHS = frozenset({"/", "/generate", "/generate_stream"})
_CORS_METHODS = "GET, POST, OPTIONS"
_CORS_HEADERS = "Authorization, Content-Type, X-Santa-Session"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without port or IPv6 brackets, lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def allowed_hosts_for(bound: str, extra: Iterable[str] = ()) -> frozenset[str] | None:
    """The Host names to accept for a server bound to ``bound``: the loopback names, the bound
    name itself and ``extra``; None (any) for a wildcard address that names no host."""
    if bound in ("0.0.0.0", "::", ""):
        return None
    return LOOPBACK_NAMES | {host_name(bound)} | {host_name(h) for h in extra}


class RequestGuard:
    """ASGI middleware: refuse a foreign ``Host`` (400) or ``Origin`` (403), and answer CORS
    preflights (204 with the CORS headers for an allowed origin, 403 otherwise)."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: frozenset[str] | None, cors_origins: Iterable[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.cors_origins = frozenset(o.rstrip("/") for o in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        tgi = scope.get("path", "") in TGI_PATHS
        host = headers.get("host")
        if host is not None and self.allowed_hosts is not None and host_name(host) not in self.allowed_hosts:
            await self._refuse(scope, receive, send, ApiError(400, f"this server does not answer for host {host!r}"),
                               tgi)
            return
        origin = headers.get("origin")
        allowed = origin is not None and origin.rstrip("/") in self.cors_origins
        if scope["method"] == "OPTIONS":
            if allowed:
                await Response(status_code=204, headers=self._cors(origin)).__call__(scope, receive, send)
            else:
                await self._refuse(scope, receive, send, ApiError(403, "cross-origin requests are not allowed "
                                                                      "(see santa serve --cors-origin)"), tgi)
            return
        if origin is not None and not allowed and not _same_origin(origin, host):
            await self._refuse(scope, receive, send, ApiError(403, f"requests from {origin} are not allowed "
                                                                   "(see santa serve --cors-origin)"), tgi)
            return
        if not allowed:
            await self.app(scope, receive, send)
            return
        cors = self._cors(origin)

        async def send_with_cors(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      *((k.lower().encode(), v.encode()) for k, v in cors.items())]
            await send(message)

        await self.app(scope, receive, send_with_cors)

    @staticmethod
    def _cors(origin: Any) -> dict[str, str]:
        return {"Access-Control-Allow-Origin": str(origin), "Access-Control-Allow-Methods": _CORS_METHODS,
                "Access-Control-Allow-Headers": _CORS_HEADERS, "Access-Control-Max-Age": "600", "Vary": "Origin"}

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, err: ApiError, tgi: bool) -> None:
        await JSONResponse(error_body(err, tgi=tgi), status_code=err.status)(scope, receive, send)


def _same_origin(origin: str, host: str | None) -> bool:
    """A browser sends Origin on same-origin POSTs too: a page served by this host is fine."""
    return host is not None and origin.split("://", 1)[-1].rstrip("/").lower() == host.strip().lower()
