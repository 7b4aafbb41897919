"""The server's state and the HTTP side of a request: auth, the body read under a size cap,
limits, and handing a completion to the model worker as a :class:`~santacli.server.worker.Job`
that watches its client."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from santacli.completion import CompletionOptions, CompletionResult, LoadedEngine, Piece, ResultStream
from santacli.daemon import ModelSpec
from santacli.errors import SantaError, UsageError
from santacli.server.identity import identity
from santacli.server.wire import ApiError, error_response, field, from_exception
from santacli.server.worker import Job, Worker

BODY_TIMEOUT = 30.0  # seconds for a whole request body to arrive
log = logging.getLogger("santacli.server")
Loader = Callable[[ModelSpec], LoadedEngine]

Handler = Callable[["ServerState", Request], Awaitable[Response]]


class ServerState:
    """One engine, its worker and the server's limits: what every route needs."""

    def __init__(self, engine: LoadedEngine, *, api_key: str | None, max_queue: int, max_body_bytes: int,
                 max_tokens_limit: int, model_name: str | None, body_timeout: float = BODY_TIMEOUT,
                 loader: Loader | None = None, spec: ModelSpec | None = None) -> None:
        if max_tokens_limit < 1:
            raise UsageError(f"max tokens limit must be >= 1, got {max_tokens_limit}")
        self.engine = engine
        self.api_key = api_key or None
        self.worker = Worker(max_queue)
        self.max_body_bytes = max_body_bytes
        self.max_tokens_limit = max_tokens_limit
        self.body_timeout = body_timeout
        self.model_name = model_name or engine.name
        self.created = int(time.time())
        # The per-user daemon loads the model a request names (X-Santa-Model) in place of its own.
        self.loader, self.spec = loader, spec
        self.last_used = time.monotonic()

    # -- requests -----------------------------------------------------------------------------

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        right = hmac.compare_digest(token.strip().encode(), self.api_key.encode())
        if scheme.lower() != "bearer" or not right:
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                           "authentication_error")

    async def json_body(self, request: Request) -> dict[str, Any]:
        """The request's JSON object, read within the size cap and the time limit.

        Only ``application/json`` is accepted: a web page can send other types cross-origin
        without asking (CSRF), but not this one.
        """
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, "send the request body as JSON with 'Content-Type: application/json'")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise ApiError(413, f"request body is larger than {self.max_body_bytes} bytes")
        try:
            data = await asyncio.wait_for(self._read_body(request), self.body_timeout)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body took longer than {self.body_timeout:g} s to arrive") from None
        try:
            body = json.loads(data)
            json.dumps(body, ensure_ascii=False).encode("utf-8")  # lone surrogates ("\ud800") fail here
        except (ValueError, UnicodeError) as exc:
            raise ApiError(400, f"request body is not valid JSON ({exc})") from None
        except RecursionError:
            raise ApiError(400, "request body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError(400, "request body must be a JSON object")
        return body

    async def _read_body(self, request: Request) -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"request body is larger than {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def max_tokens(self, body: dict[str, Any], key: str, default: int) -> int:
        value: int = field(body, key, int, min(default, self.max_tokens_limit), lo=1)
        if value > self.max_tokens_limit:
            raise ApiError(422, f"'{key}' must be <= {self.max_tokens_limit} on this server, got {value}",
                           param=key)
        return value

    @staticmethod
    def options(**kwargs: Any) -> CompletionOptions:
        try:
            return CompletionOptions(**kwargs)
        except UsageError as exc:
            raise ApiError(422, str(exc)) from None

    # -- the model ----------------------------------------------------------------------------

    async def start(self, request: Request, open_stream: Callable[[], ResultStream]) -> Job:
        """Queue a completion and wait until it has started; a client that disconnects
        cancels it."""
        self.last_used = time.monotonic()
        wanted = self._requested_model(request)
        if wanted is not None and wanted != self.spec:
            plain = open_stream

            def open_stream() -> ResultStream:  # on the model thread, so loads never overlap a run
                self._switch_model(wanted)
                return plain()

        scope = identity(request)
        job = Job(open_stream, until_gone=lambda: _disconnected(request),
                  around=lambda: self.engine.prompt_scope(scope))
        if not self.worker.submit(job):
            raise ApiError(503, f"server is busy ({self.worker.capacity} requests in progress or "
                                "queued); retry later", "overloaded")
        try:
            await job.started()
        except ApiError:
            raise
        except Exception as exc:
            raise from_exception(exc) from None
        return job

    def _requested_model(self, request: Request) -> ModelSpec | None:
        header = request.headers.get("x-santa-model")
        if header is None or self.loader is None:
            return None
        try:
            return ModelSpec.from_dict(json.loads(header))
        except (ValueError, UsageError) as exc:
            raise ApiError(422, f"X-Santa-Model: {exc}") from None

    def _switch_model(self, spec: ModelSpec) -> None:
        if spec == self.spec or self.loader is None:
            return
        log.info("loading %s in place of %s", spec.model, self.spec.model if self.spec else self.model_name)
        self.engine = self.loader(spec)  # errors (no such model...) go to this request's client
        self.spec, self.model_name = spec, self.engine.name

    @staticmethod
    async def finish(job: Job, pieces: list[Piece] | None = None) -> CompletionResult:
        """The job's result (its error as an :class:`ApiError`), its pieces added to ``pieces``."""
        try:
            async for piece in job:
                if pieces is not None:
                    pieces.append(piece)
            return await job.result()
        except Exception as exc:
            raise from_exception(exc) from None
        finally:
            job.close()

    @staticmethod
    def sse_response(events: AsyncIterator[bytes], job: Job) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in events:
                    if job.client_gone:  # writing on would only hit a closed socket
                        break
                    yield chunk
            finally:
                job.close()

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def route(self, handler: Handler, *, tgi: bool = False, auth: bool = True
              ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` as a starlette endpoint with auth and errors in the API's shape."""
        async def endpoint(request: Request) -> Response:
            try:
                if auth:
                    self.check_auth(request)
                return await handler(self, request)
            except ApiError as err:
                return error_response(err, tgi=tgi)
            except ClientDisconnect:
                return Response(status_code=499)  # nobody is listening any more
            except SantaError as exc:
                return error_response(from_exception(exc), tgi=tgi)

        return endpoint


async def _disconnected(request: Request) -> None:
    # After the body is read, the only message left for this request is the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
