"""``santa serve``: a resident completion server over one loaded :class:`~santacli.engine.Engine`.

Endpoints (see README.md, "The server"):

- ``POST /v1/completions``, ``GET /v1/models``: OpenAI-compatible. A request with ``suffix`` is a
  fill-in-the-middle request laid out by santa; a bare ``prompt`` is used as raw text.
- ``POST /generate``, ``POST /generate_stream``, ``POST /``: TGI-compatible raw prompts
  (spelled-out FIM sentinels in ``inputs`` become control tokens), as llm.nvim and
  ``huggingface_hub.InferenceClient`` send them.
- ``POST /infill``: santa's own FIM endpoint for editor plugins; returns the ``--json`` schema.
- ``GET /health``.

The model runs on one worker thread fed by a bounded queue, so requests never run the model
concurrently and the engine's warm prompt cache sees every request. The HTTP side is asyncio;
the two talk through per-request event queues. starlette and uvicorn are imported only here.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from santacli.engine import CompletionOptions, CompletionResult, Engine
from santacli.errors import UsageError
from santacli.server_base import MAX_SEED, error_response, field, sse, sse_error, stop_list, unsent
from santacli.server_openai import OpenAIRoutes
from santacli.server_tgi import TgiRoutes
from santacli.serving import ApiError, from_exception, infill_work

log = logging.getLogger("santacli.server")


def check_bind(host: str, *, allow_remote: bool) -> None:
    """Refuse a non-loopback address unless explicitly allowed (before the model is loaded).

    Raises:
        UsageError: ``host`` is reachable from other machines and ``allow_remote`` is false.
    """
    if not _is_loopback(host) and not allow_remote:
        raise UsageError(
            f"refusing to listen on {host}: it is reachable from other machines; pass --allow-remote "
            "(and set --api-key) to serve beyond this computer, or use --host 127.0.0.1"
        )


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class _App(OpenAIRoutes, TgiRoutes):
    """Every route, bound to one engine, its worker and the server's limits."""

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name, "queued": self.worker.load})

    async def infill(self, request: Request) -> Response:
        body = await self._json(request)
        prefix = field(body, "prefix", str)
        suffix = field(body, "suffix", str, "")
        path = field(body, "path", str, None)
        opts = self._options(
            max_tokens=self._max_tokens(body, "max_tokens", CompletionOptions.max_tokens),
            temperature=field(body, "temperature", float, 0.0), top_p=field(body, "top_p", float, 1.0),
            top_k=field(body, "top_k", int, 0), seed=field(body, "seed", int, None, lo=0, hi=MAX_SEED),
            n=field(body, "n", int, 1), mode=field(body, "mode", str, "auto"),
            fim_mode=field(body, "fim_mode", str, "psm"), stop=tuple(stop_list(body, "stop")),
            filename=path,
        )
        stream = field(body, "stream", bool, False)
        job, watcher, _ = await self._start(request, infill_work(self.engine, prefix, suffix, opts))
        if not stream:
            result: CompletionResult = await self._finish(job, watcher)
            return JSONResponse(result.to_dict())

        async def events() -> AsyncIterator[bytes]:
            sent = ""
            while True:
                kind, payload = await job.next()
                if kind == "text":
                    sent += payload
                    yield sse({"text": payload})
                elif kind == "done":
                    rest = unsent(payload.text, sent)
                    if rest:
                        yield sse({"text": rest})
                    yield sse({"done": True, "result": payload.to_dict()})
                    yield sse("[DONE]")
                    return
                else:
                    yield sse_error(payload)
                    return

        return self._sse_response(events(), job, watcher)


def create_app(engine: Engine, *, api_key: str | None = None, max_queue: int = 16,
               max_body_bytes: int = 1_000_000, max_tokens_limit: int = 1024,
               model_name: str | None = None) -> Starlette:
    """An ASGI app serving ``engine``; run it with uvicorn (or use :func:`serve`).

    Args:
        api_key: when set, every endpoint but ``/health`` requires ``Authorization: Bearer KEY``.
        max_queue: requests that may wait while one runs; more get 503.
        max_body_bytes: larger request bodies get 413.
        max_tokens_limit: the most tokens one request may ask for (422 above it).
        model_name: the name reported to clients (default: the engine's model name).
    """
    state = _App(engine, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes,
                 max_tokens_limit=max_tokens_limit, model_name=model_name)
    r = state.route
    routes = [
        Route("/health", r(state.health, auth=False), methods=["GET"]),
        Route("/infill", r(state.infill), methods=["POST"]),
        Route("/v1/models", r(state.models), methods=["GET"]),
        Route("/v1/completions", r(state.completions), methods=["POST"]),
        Route("/", r(state.generate, tgi=True), methods=["POST"]),
        Route("/generate", r(state.generate_only, tgi=True), methods=["POST"]),
        Route("/generate_stream", r(state.generate_stream, tgi=True), methods=["POST"]),
        Route("/info", r(state.info), methods=["GET"]),
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

    from contextlib import asynccontextmanager

    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: internal_error},
                    lifespan=asynccontextmanager(lifespan))
    app.state.santa = state
    return app


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          allow_remote: bool = False, max_queue: int = 16, max_body_bytes: int = 1_000_000,
          max_tokens_limit: int = 1024, model_name: str | None = None, log_level: str = "info") -> None:
    """Serve ``engine`` over HTTP until interrupted (blocking).

    Raises:
        UsageError: ``host`` is not a loopback address and ``allow_remote`` is false.
    """
    import uvicorn

    check_bind(host, allow_remote=allow_remote)
    if not 0 <= port <= 65535:
        raise UsageError(f"port must be between 0 and 65535, got {port}")
    app = create_app(engine, api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes,
                     max_tokens_limit=max_tokens_limit, model_name=model_name)
    if not _is_loopback(host) and not api_key:
        logging.getLogger("uvicorn.error").warning(
            "serving on %s without an API key: anyone who can reach this port can use the model", host)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
