"""``santa serve``: a resident completion server over one loaded engine; this module assembles
the routes of each API (``routes_*.py``) into one starlette app and runs it with uvicorn.

Endpoints (see README.md, "The server"):

- ``POST /v1/completions``, ``GET /v1/models``: OpenAI-compatible. A request with ``suffix`` is a
  fill-in-the-middle request laid out by santa; a bare ``prompt`` is used as raw text.
- ``POST /generate``, ``POST /generate_stream``, ``POST /``: TGI-compatible raw prompts
  (spelled-out FIM sentinels in ``inputs`` become control tokens), as llm.nvim and
  ``huggingface_hub.InferenceClient`` send them.
- ``POST /infill``: santa's own FIM endpoint for editor plugins; returns the ``--json`` schema.
- ``GET /health``.

The model runs on one worker thread fed by a bounded queue (``worker.py``), so requests never
run the model concurrently and the engine's warm prompt cache sees every request. The HTTP side
is asyncio; the two talk through per-request jobs. starlette and uvicorn are imported only in
this package.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from santacli.completion import LoadedEngine
from santacli.errors import UsageError
from santacli.server import routes_llamacpp, routes_openai, routes_santa, routes_tgi
from santacli.server.guard import LOOPBACK_NAMES, RequestGuard, allowed_hosts_for, is_loopback
from santacli.server.state import BODY_TIMEOUT, ServerState
from santacli.server.transport import uvicorn_config
from santacli.server.wire import ApiError, error_response, from_exception
from santacli.settings import Settings

log = logging.getLogger("santacli.server")

MAX_QUEUE = Settings().max_queue
MAX_BODY_BYTES = 1_000_000
MAX_TOKENS_LIMIT = 1024  # the most tokens one request may ask for


def check_bind(host: str, *, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless explicitly allowed (before the model is loaded).

    Raises:
        UsageError: ``host`` is reachable from other machines and ``allow_remote`` is false.
    """
    if not is_loopback(host) and not allow_remote:
        raise UsageError(
            f"refusing to listen on {host}: it is reachable from other machines; pass --allow-remote "
            "(and set --api-key) to serve beyond this computer, or use --host 127.0.0.1"
        )


def create_app(engine: LoadedEngine, *, api_key: str | None = None, max_queue: int = MAX_QUEUE,
               max_body_bytes: int = MAX_BODY_BYTES, max_tokens_limit: int = MAX_TOKENS_LIMIT,
               model_name: str | None = None, allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES,
               cors_origins: Sequence[str] = (), body_timeout: float = BODY_TIMEOUT) -> Starlette:
    """An ASGI app serving ``engine``; run it with uvicorn (or use :func:`serve`).

    Args:
        api_key: when set, every endpoint but ``/health`` requires ``Authorization: Bearer KEY``.
        max_queue: requests that may wait while one runs; more get 503.
        max_body_bytes: larger request bodies get 413.
        max_tokens_limit: the most tokens one request may ask for (422 above it).
        model_name: the name reported to clients (default: the engine's model name).
        allowed_hosts: the names a request's ``Host`` may give (None: any); loopback names by
            default, so a web page that rebinds its DNS name to 127.0.0.1 is refused.
        cors_origins: browser origins allowed to call the server (none by default).
        body_timeout: seconds a request body may take to arrive (408 after).
    """
    state = ServerState(engine, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes,
                        max_tokens_limit=max_tokens_limit, model_name=model_name, body_timeout=body_timeout)
    r = state.route
    routes = [
        Route("/health", r(routes_santa.health, auth=False), methods=["GET"]),
        Route("/infill", r(routes_santa.infill), methods=["POST"]),
        Route("/v1/models", r(routes_openai.models), methods=["GET"]),
        Route("/v1/completions", r(routes_openai.completions), methods=["POST"]),
        Route("/", r(routes_tgi.generate, tgi=True), methods=["POST"]),
        Route("/generate", r(routes_tgi.generate_only, tgi=True), methods=["POST"]),
        Route("/generate_stream", r(routes_tgi.generate_stream, tgi=True), methods=["POST"]),
        Route("/info", r(routes_tgi.info), methods=["GET"]),
        Route("/completion", r(routes_llamacpp.completion), methods=["POST"]),
        Route("/completions", r(routes_llamacpp.completion), methods=["POST"]),
        Route("/props", r(routes_llamacpp.props), methods=["GET"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(ApiError(exc.status_code, str(exc.detail), "invalid_request_error"))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return error_response(from_exception(exc))

    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        state.worker.stop()

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error},
                    lifespan=asynccontextmanager(lifespan),
                    middleware=[Middleware(RequestGuard, allowed_hosts=allowed_hosts, cors_origins=cors_origins)])
    app.state.santa = state
    return app


def serve(engine: LoadedEngine, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          allow_remote: bool = False, max_queue: int = MAX_QUEUE, max_body_bytes: int = MAX_BODY_BYTES,
          max_tokens_limit: int = MAX_TOKENS_LIMIT, model_name: str | None = None, log_level: str = "info",
          cors_origins: Sequence[str] = (), allowed_hosts: Sequence[str] = ()) -> None:
    """Serve ``engine`` over HTTP until interrupted (blocking).

    ``Host`` headers must name a loopback address, ``host`` itself or one of ``allowed_hosts``
    (any, when ``host`` is a wildcard address).

    Raises:
        UsageError: ``host`` is not a loopback address and ``allow_remote`` is false.
    """
    import uvicorn

    check_bind(host, allow_remote=allow_remote)
    if not 0 <= port <= 65535:
        raise UsageError(f"port must be between 0 and 65535, got {port}")
    app = create_app(engine, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes,
                     max_tokens_limit=max_tokens_limit, model_name=model_name,
                     allowed_hosts=allowed_hosts_for(host, allowed_hosts), cors_origins=cors_origins)
    if not is_loopback(host) and not api_key:
        logging.getLogger("uvicorn.error").warning(
            "serving on %s without an API key: anyone who can reach this port can use the model", host)
    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level)).run()
