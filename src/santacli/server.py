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

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from santacli.engine import CompletionOptions, CompletionResult, Engine
from santacli.errors import SantaError, UsageError
from santacli.generate import SamplingParams
from santacli.serving import ApiError, Job, RawResult, Usage, Work, Worker, from_exception, infill_work, raw_work

log = logging.getLogger("santacli.server")

OPENAI_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's own default
TGI_DEFAULT_MAX_NEW_TOKENS = 100
MAX_STOPS = 16
MAX_SEED = 2**63 - 1  # torch generators take a 64-bit seed


# ---------------------------------------------------------------------------------------------
# Errors


def _tgi_error_type(status: int) -> str:
    fallback = "validation" if status < 500 else "generation"
    return {503: "overloaded", 401: "authentication"}.get(status, fallback)


def _error_response(err: ApiError, *, tgi: bool = False) -> JSONResponse:
    if tgi:
        # TGI clients (huggingface_hub, llm-ls) read {"error": str, "error_type": str}.
        body: dict[str, Any] = {"error": err.message, "error_type": _tgi_error_type(err.status)}
    else:
        body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.status}}
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(body, status_code=err.status, headers=headers)


# ---------------------------------------------------------------------------------------------
# Request parsing


_MISSING = object()


def _field(body: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = _MISSING, *,
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


def _stops(body: dict[str, Any], key: str) -> list[str]:
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


def _reject_unsupported(body: dict[str, Any], checks: dict[str, Callable[[Any], bool]]) -> None:
    """Refuse options santa cannot honour instead of silently ignoring them."""
    for key, is_default in checks.items():
        value = body.get(key)
        if value is not None and not is_default(value):
            raise ApiError(422, f"'{key}' is not supported by this server", param=key)


def _sampling(temperature: float, top_p: float, top_k: int, seed: int | None) -> SamplingParams:
    try:
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    except UsageError as exc:
        raise ApiError(422, str(exc)) from None


# ---------------------------------------------------------------------------------------------
# The app


def _sse(data: Any) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def _sse_error(exc: BaseException) -> bytes:
    err = from_exception(exc)
    return _sse({"error": {"message": err.message, "type": err.kind}})


def _openai_final(envelope: Callable[..., dict[str, Any]], choices: list[dict[str, Any]], use: Usage,
                  include_usage: bool) -> list[bytes]:
    """The closing events of an OpenAI stream: last choices, the usage chunk if asked, [DONE]."""
    events = [_sse(envelope(choices, use))]
    if include_usage:
        events.append(_sse(envelope([], use)))
    events.append(_sse("[DONE]"))
    return events


def _unsent(final: str, sent: str) -> str:
    """What a stream still owes its client of ``final`` after sending ``sent``."""
    return final[len(sent):] if final.startswith(sent) else ""


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


_OPENAI_FINISH = {"eos": "stop", "max_tokens": "length", "cancelled": "stop"}


class _App:
    """Route handlers bound to one engine, its worker and the server's limits."""

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
        value: int = _field(body, key, int, min(default, self.max_tokens_limit), lo=1)
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
                return _error_response(err, tgi=tgi)
            except ClientDisconnect:
                return Response(status_code=499)  # nobody is listening any more
            except SantaError as exc:
                return _error_response(from_exception(exc), tgi=tgi)

        return endpoint

    # -- santa -------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name, "queued": self.worker.load})

    async def infill(self, request: Request) -> Response:
        body = await self._json(request)
        prefix = _field(body, "prefix", str)
        suffix = _field(body, "suffix", str, "")
        path = _field(body, "path", str, None)
        opts = self._options(
            max_tokens=self._max_tokens(body, "max_tokens", CompletionOptions.max_tokens),
            temperature=_field(body, "temperature", float, 0.0), top_p=_field(body, "top_p", float, 1.0),
            top_k=_field(body, "top_k", int, 0), seed=_field(body, "seed", int, None, lo=0, hi=MAX_SEED),
            n=_field(body, "n", int, 1), mode=_field(body, "mode", str, "auto"),
            fim_mode=_field(body, "fim_mode", str, "psm"), stop=tuple(_stops(body, "stop")),
            filename=path,
        )
        stream = _field(body, "stream", bool, False)
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
                    yield _sse({"text": payload})
                elif kind == "done":
                    rest = _unsent(payload.text, sent)
                    if rest:
                        yield _sse({"text": rest})
                    yield _sse({"done": True, "result": payload.to_dict()})
                    yield _sse("[DONE]")
                    return
                else:
                    yield _sse_error(payload)
                    return

        return self._sse_response(events(), job, watcher)

    @staticmethod
    def _options(**kwargs: Any) -> CompletionOptions:
        try:
            return CompletionOptions(**kwargs)
        except UsageError as exc:
            raise ApiError(422, str(exc)) from None

    # -- OpenAI ------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "santacli"},
        ]})

    async def completions(self, request: Request) -> Response:
        body = await self._json(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(422, "'prompt' must be a string (batches and token arrays are not supported)",
                           param="prompt")
        _reject_unsupported(body, {
            "echo": lambda v: v is False, "logprobs": lambda v: v in (0, False), "best_of": lambda v: v == 1,
            "logit_bias": lambda v: v == {},
            "presence_penalty": lambda v: v == 0, "frequency_penalty": lambda v: v == 0,
        })
        suffix = _field(body, "suffix", str, "")
        max_tokens = self._max_tokens(body, "max_tokens", OPENAI_DEFAULT_MAX_TOKENS)
        temperature = _field(body, "temperature", float, 1.0, lo=0, hi=2)
        top_p = _field(body, "top_p", float, 1.0)
        top_k = _field(body, "top_k", int, 0, lo=0)  # an extension (vLLM, llama.cpp have it too)
        seed = _field(body, "seed", int, None, lo=0, hi=MAX_SEED)
        n = _field(body, "n", int, 1, lo=1, hi=16)
        stops = _stops(body, "stop")
        stream = _field(body, "stream", bool, False)
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        ident = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def envelope(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
            out: dict[str, Any] = {"id": ident, "object": "text_completion", "created": created,
                                   "model": self.model_name, "choices": choices}
            if usage is not None:
                out["usage"] = usage
            return out

        def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}

        def usage(prompt_tokens: int, generated: int) -> dict[str, int]:
            return {"prompt_tokens": prompt_tokens, "completion_tokens": generated,
                    "total_tokens": prompt_tokens + generated}

        if suffix:
            # FIM: santa lays out the prompt and post-processes; "full" keeps OpenAI's semantics
            # (run to EOS, a stop string or max_tokens) unless the client asks for a santa mode.
            opts = self._options(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                 seed=seed, n=n,
                                 mode=_field(body, "mode", str, "full"), stop=tuple(stops))
            job, watcher, _ = await self._start(request, infill_work(self.engine, prompt, suffix, opts))

            def fim_final(result: CompletionResult, sent: str | None) -> tuple[list[dict[str, Any]], Usage]:
                choices = [choice(i, _unsent(text, sent) if sent is not None and i == 0 else text,
                                  _OPENAI_FINISH.get(result.stop_reasons[i], "stop"))
                           for i, text in enumerate(result.candidates)]
                return choices, usage(result.prompt_tokens, result.generated_tokens)

            if not stream:
                result = await self._finish(job, watcher)
                choices, use = fim_final(result, None)
                return JSONResponse(envelope(choices, use))

            async def fim_events() -> AsyncIterator[bytes]:
                sent = ""
                while True:
                    kind, payload = await job.next()
                    if kind == "text":
                        sent += payload
                        yield _sse(envelope([choice(0, payload, None)]))
                    elif kind == "done":
                        for event in _openai_final(envelope, *fim_final(payload, sent), include_usage):
                            yield event
                        return
                    else:
                        yield _sse_error(payload)
                        return

            return self._sse_response(fim_events(), job, watcher)

        sampling = _sampling(temperature, top_p, top_k, seed)
        job, watcher, _ = await self._start(request, raw_work(
            self.engine, prompt, max_new_tokens=max_tokens, sampling=sampling, n=n, stops=stops,
            include_stop=False))

        def raw_final(result: RawResult, streamed: bool) -> tuple[list[dict[str, Any]], Usage]:
            choices = [choice(i, result.tails[i] if streamed else row.text,
                              "length" if row.finish == "length" else "stop")
                       for i, row in enumerate(result.rows)]
            return choices, usage(result.prompt_tokens, sum(len(r.tokens) for r in result.rows))

        if not stream:
            result = await self._finish(job, watcher)
            choices, use = raw_final(result, False)
            return JSONResponse(envelope(choices, use))

        async def raw_events() -> AsyncIterator[bytes]:
            while True:
                kind, payload = await job.next()
                if kind == "step":
                    pieces = [choice(i, text, None) for i, _, text, _ in payload if text]
                    if pieces:
                        yield _sse(envelope(pieces))
                elif kind == "done":
                    for event in _openai_final(envelope, *raw_final(payload, True), include_usage):
                        yield event
                    return
                else:
                    yield _sse_error(payload)
                    return

        return self._sse_response(raw_events(), job, watcher)

    # -- TGI ---------------------------------------------------------------------------------

    def _tgi_request(self, body: dict[str, Any]) -> tuple[str, dict[str, Any], Work]:
        inputs = _field(body, "inputs", str)
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            raise ApiError(422, "'parameters' must be an object", param="parameters")
        _reject_unsupported(params, {
            "best_of": lambda v: v == 1, "grammar": lambda v: False, "top_n_tokens": lambda v: v == 0,
            "decoder_input_details": lambda v: v is False, "watermark": lambda v: v is False,
            "repetition_penalty": lambda v: v == 1, "frequency_penalty": lambda v: v == 0,
            "typical_p": lambda v: v == 1, "adapter_id": lambda v: False,
        })
        max_new = self._max_tokens(params, "max_new_tokens", TGI_DEFAULT_MAX_NEW_TOKENS)
        temperature = _field(params, "temperature", float, None, lo=0)
        top_p = _field(params, "top_p", float, 1.0)
        top_k = _field(params, "top_k", int, 0, lo=0)
        do_sample = _field(params, "do_sample", bool, False)
        # As in TGI: sampling when asked, or when any sampling knob moves off its neutral value.
        sample = do_sample or (temperature not in (None, 1.0)) or top_p < 1.0 or top_k > 0
        temperature = 1.0 if temperature is None else temperature
        seed = _field(params, "seed", int, None, lo=0, hi=MAX_SEED)
        sampling = _sampling(temperature if sample else 0.0, top_p, top_k, seed)
        truncate = _field(params, "truncate", int, None, lo=1)
        work = raw_work(self.engine, inputs, max_new_tokens=max_new, sampling=sampling, n=1,
                         stops=_stops(params, "stop"), include_stop=True, truncate=truncate)
        return inputs, params, work

    @staticmethod
    def _token(token: int, text: str, special: bool) -> dict[str, Any]:
        # santa computes no log-probabilities; TGI itself sends null where it has none.
        return {"id": token, "text": text, "logprob": None, "special": special}

    async def generate(self, request: Request) -> Response:
        body = await self._json(request)
        if body.get("stream") is True:
            return await self._generate_stream(request, body)
        return await self._generate(request, body)

    async def generate_only(self, request: Request) -> Response:
        return await self._generate(request, await self._json(request))

    async def generate_stream(self, request: Request) -> Response:
        return await self._generate_stream(request, await self._json(request))

    async def _generate(self, request: Request, body: dict[str, Any]) -> Response:
        inputs, params, work = self._tgi_request(body)
        job, watcher, _ = await self._start(request, work)
        result: RawResult = await self._finish(job, watcher)
        row = result.rows[0]
        text = inputs + row.text if params.get("return_full_text") else row.text
        out: dict[str, Any] = {"generated_text": text}
        if params.get("details"):
            tokens = [self._token(*t) for t in row.tokens]
            if tokens and result.tails[0]:
                tokens[-1]["text"] += result.tails[0]
            out["details"] = {
                "finish_reason": row.finish, "generated_tokens": len(tokens), "seed": params.get("seed"),
                "prefill": [], "tokens": tokens,
                "best_of_sequences": None,
            }
        return JSONResponse(out)

    async def _generate_stream(self, request: Request, body: dict[str, Any]) -> Response:
        inputs, params, work = self._tgi_request(body)
        job, watcher, prompt_tokens = await self._start(request, work)
        full = bool(params.get("return_full_text"))

        async def events() -> AsyncIterator[bytes]:
            # The last token's event carries the final text and details, so hold one back.
            held: dict[str, Any] | None = None
            index = 0
            while True:
                kind, payload = await job.next()
                if kind == "step":
                    for _, token, text, special in payload:
                        if held is not None:
                            yield _sse(held)
                        index += 1
                        held = {"index": index, "token": self._token(token, text, special),
                                "generated_text": None, "details": None}
                elif kind == "done":
                    row = payload.rows[0]
                    if held is None:  # cancelled before any token
                        return
                    held["token"]["text"] += payload.tails[0]
                    held["generated_text"] = inputs + row.text if full else row.text
                    held["details"] = {"finish_reason": row.finish, "generated_tokens": len(row.tokens),
                                       "seed": params.get("seed"), "input_length": prompt_tokens}
                    yield _sse(held)
                    return
                else:
                    err = from_exception(payload)
                    yield _sse({"error": err.message, "error_type": _tgi_error_type(err.status)})
                    return

        return self._sse_response(events(), job, watcher)

    async def info(self, request: Request) -> Response:
        from santacli import __version__

        return JSONResponse({
            "model_id": self.model_name, "model_dtype": self.engine.info.dtype,
            "model_device_type": self.engine.info.device, "max_total_tokens": self.engine.config.n_positions,
            "max_new_tokens": self.max_tokens_limit, "max_concurrent_requests": self.worker.capacity,
            "version": __version__, "router": "santacli",
        })


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
        return _error_response(ApiError(exc.status_code, str(exc.detail), "invalid_request_error"))

    async def internal_error(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return _error_response(from_exception(exc))

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
