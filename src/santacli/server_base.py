"""The server's plumbing shared by its three APIs: request parsing, errors, auth, the worker
hand-off and server-sent events. The routes live in server.py (santa's own), server_openai.py
and server_tgi.py."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from santacli.engine import CompletionOptions, Engine
from santacli.errors import SantaError, UsageError
from santacli.generate import SamplingParams
from santacli.serving import ApiError, Job, Work, Worker, from_exception

MAX_STOPS = 16
MAX_SEED = 2**63 - 1  # torch generators take a 64-bit seed


# ---------------------------------------------------------------------------------------------
# Errors


def tgi_error_type(status: int) -> str:
    fallback = "validation" if status < 500 else "generation"
    return {503: "overloaded", 401: "authentication"}.get(status, fallback)


def error_response(err: ApiError, *, tgi: bool = False) -> JSONResponse:
    if tgi:
        # TGI clients (huggingface_hub, llm-ls) read {"error": str, "error_type": str}.
        body: dict[str, Any] = {"error": err.message, "error_type": tgi_error_type(err.status)}
    else:
        body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.status}}
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


# ---------------------------------------------------------------------------------------------
# Request parsing


_MISSING = object()


def field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING, *,
          lo: float | None = None, hi: float | None = None, nullable: bool = True) -> Any:
    """``body[key]`` checked for type and range (None counts as absent when ``nullable``)."""
    value = body.get(key, _MISSING)
    if value is _MISSING or (value is None and nullable):
        if default is _MISSING:
            raise ApiError(422, f"'{key}' is required", param=key)
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        names = " or ".join(k.__name__ for k in kinds).replace("str", "string").replace("float", "number")
        raise ApiError(422, f"'{key}' must be a {names}, got {json.dumps(value)[:60]}", param=key)
    if lo is not None and value < lo:
        raise ApiError(422, f"'{key}' must be >= {lo:g}, got {value}", param=key)
    if hi is not None and value > hi:
        raise ApiError(422, f"'{key}' must be <= {hi:g}, got {value}", param=key)
    return value


def stop_list(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ApiError(422, f"'{key}' must be a string or a list of strings", param=key)
    if len(value) > MAX_STOPS:
        raise ApiError(422, f"'{key}' may hold at most {MAX_STOPS} strings", param=key)
    return [s for s in value if s]


def reject_unsupported(body: dict[str, Any], checks: dict[str, Callable[[Any], bool]]) -> None:
    """Refuse options santa cannot honour instead of silently ignoring them."""
    for key, is_default in checks.items():
        value = body.get(key)
        if value is not None and not is_default(value):
            raise ApiError(422, f"'{key}' is not supported by this server", param=key)


def sampling_params(temperature: float, top_p: float, top_k: int, seed: int | None) -> SamplingParams:
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except UsageError as exc:
        raise ApiError(422, str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Server-sent events


def sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def sse_error(exc: BaseException) -> bytes:
    err = from_exception(exc)
    return sse({"error": {"message": err.message, "type": err.kind}})


def unsent(final: str, sent: str) -> str:
    """What a stream still owes its client of ``final`` after sending ``sent``."""
    return final[len(sent):] if final.startswith(sent) else ""


# ---------------------------------------------------------------------------------------------
# The app's plumbing


class AppBase:
    """One engine, its worker and the server's limits; what every route handler needs."""

    def __init__(self, engine: Engine, *, api_key: str | None, max_queue: int, max_body_bytes: int,
                 max_tokens_limit: int, model_name: str | None) -> None:
        if max_tokens_limit < 1:
            raise UsageError(f"max tokens limit must be >= 1, got {max_tokens_limit}")
        self.engine = engine
        self.api_key = api_key or None
        self.worker = Worker(max_queue)
        self.max_body_bytes = max_body_bytes
        self.max_tokens_limit = max_tokens_limit
        self.model_name = model_name or engine.info.name
        self.created = int(time.time())

    # -- plumbing -----------------------------------------------------------------------------

    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        right = hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        if scheme.lower() != "bearer" or not right:
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           "authentication_error")

    async def _json(self, request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f"request body is larger than {self.max_body_bytes} bytes")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"request body is larger than {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    def _max_tokens(self, body: dict[str, Any], key: str, default: int) -> int:
        value: int = field(body, key, int, min(default, self.max_tokens_limit), lo=1)
        if value > self.max_tokens_limit:
            raise ApiError(422, f"'{key}' must be <= {self.max_tokens_limit} on this server, got {value}",
                           param=key)
        return value

    async def _start(self, request: Request, work: Work
                     ) -> tuple[Job, asyncio.Task[None], Any]:
        """Queue ``work`` and wait for its first event; a client that disconnects cancels it."""
        job = Job(asyncio.get_running_loop(), work)
        if not self.worker.submit(job):
            raise ApiError(503, f"server is busy ({self.worker.capacity} requests in progress or "
                                "queued); retry later", "overloaded")
        watcher = asyncio.create_task(self._watch_disconnect(request, job))
        try:
            kind, payload = await job.next()
        except BaseException:
            job.cancel()
            watcher.cancel()
            raise
        if kind == "error":
            watcher.cancel()
            raise from_exception(payload)
        return job, watcher, payload

    @staticmethod
    async def _watch_disconnect(request: Request, job: Job) -> None:
        # After the body is read, the only message left for this request is the disconnect.
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                job.cancel()
                return

    async def _finish(self, job: Job, watcher: asyncio.Task[None]) -> Any:
        """Wait for the job's final event; return its payload or raise its error."""
        try:
            while True:
                kind, payload = await job.next()
                if kind == "done":
                    return payload
                if kind == "error":
                    raise from_exception(payload)
        finally:
            watcher.cancel()
            if not job.finished:
                job.cancel()

    def _sse_response(self, events: AsyncIterator[bytes], job: Job, watcher: asyncio.Task[None]
                      ) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in events:
                    yield chunk
            finally:
                watcher.cancel()
                if not job.finished:
                    job.cancel()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def route(self, handler: Callable[[Request], Awaitable[Response]], *, tgi: bool = False,
              auth: bool = True) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    self._check_auth(request)
                return await handler(request)
            except ApiError as err:
                return error_response(err, tgi=tgi)
            except ClientDisconnect:
                return Response(status_code=499)  # nobody is listening any more
            except SantaError as exc:
                return error_response(from_exception(exc), tgi=tgi)

        return endpoint

    @staticmethod
    def _options(**kwargs: Any) -> CompletionOptions:
        try:
            return CompletionOptions(**kwargs)
        except UsageError as exc:
            raise ApiError(422, str(exc)) from None
