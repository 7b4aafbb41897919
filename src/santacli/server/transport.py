"""Connections, bounded: how long a client may take to send its request headers, how many
connections may be open at once (more get an immediate 503 with ``Retry-After``), and the
uvicorn settings ``santa serve`` runs with. Body reads are bounded in ``state.json_body``.

A client that opens a connection and drips its headers (or sends nothing) would otherwise hold
it forever: uvicorn only times out idle keep-alive connections.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT = 10.0  # seconds from connecting (or from the first byte of a request) to its headers
MAX_CONNECTIONS = 64
KEEP_ALIVE = 5  # seconds an idle connection stays open between requests


def _status_response(status: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": {"message": message, "type": "overloaded" if status.startswith("503")
                                 else "invalid_request_error", "param": None, "code": int(status[:3])}}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}Connection: close\r\n\r\n").encode() + body


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a request-header deadline and a connection cap."""

    header_timeout = HEADER_TIMEOUT
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_status_response("503 Service Unavailable", "too many connections; retry later",
                                             "Retry-After: 1\r\n"))
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        idle = self.cycle is None or self.cycle.response_complete
        if idle and self._header_deadline is None:
            self._arm()  # the first byte of a new request starts its header deadline
        before = self.cycle
        super().data_received(data)
        if self.cycle is not before:  # the headers are complete: a request cycle began
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_header_deadline", None) is not None:
            assert self._header_deadline is not None
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            self.transport.write(_status_response("408 Request Timeout", "the request headers took too long"))
            self.transport.close()


def protocol(*, header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS
             ) -> type[BoundedH11Protocol]:
    """A :class:`BoundedH11Protocol` with these limits (uvicorn takes a class)."""
    return type("SantaH11Protocol", (BoundedH11Protocol,),
                {"header_timeout": header_timeout, "max_connections": max_connections})


def uvicorn_config(app: Any, *, header_timeout: float = HEADER_TIMEOUT, max_connections: int = MAX_CONNECTIONS,
                   **kwargs: Any) -> uvicorn.Config:
    """How santa serve runs ``app``: bounded connections, short keep-alive, quick shutdown."""
    kwargs.setdefault("timeout_graceful_shutdown", 5)
    return uvicorn.Config(app, http=protocol(header_timeout=header_timeout, max_connections=max_connections),
                          timeout_keep_alive=KEEP_ALIVE, **kwargs)
