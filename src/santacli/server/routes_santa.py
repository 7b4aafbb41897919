"""santa's own routes: ``POST /infill`` (the ``--json`` schema, for editor plugins and
``--endpoint``) and ``GET /health``.

``/infill`` is llama.cpp's path too: a body with ``input_prefix``/``input_suffix`` is llama.cpp's
protocol and goes to :mod:`santacli.server.routes_llamacpp`; santa's own has ``prefix``/``suffix``,
and may bring ``context: [{"path", "text"}]`` chunks (ranked and laid out as cross-file context,
see :mod:`santacli.context`) and ``context_tokens``.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from santacli.completion import CompletionOptions, ResultStream
from santacli.context import client_chunks, select
from santacli.server import routes_llamacpp
from santacli.server.state import ServerState
from santacli.server.wire import MAX_SEED, field, sse, sse_error, stop_list, unsent


async def health(state: ServerState, request: Request) -> Response:
    body: dict[str, object] = {"status": "ok", "model": state.model_name, "queued": state.worker.load}
    if state.spec is not None:  # the per-user daemon: what santa daemon status shows
        body |= {"pid": os.getpid(), "spec": state.spec.to_dict(), "idle_s": round(time.monotonic() - state.last_used)}
    return JSONResponse(body)


async def infill(state: ServerState, request: Request) -> Response:
    body = await state.json_body(request)
    if "input_prefix" in body or "input_suffix" in body:
        return await routes_llamacpp.infill(state, request, body)
    prefix = field(body, "prefix", str)
    suffix = field(body, "suffix", str, "")
    chunks = routes_llamacpp.extra_chunks(body, "context", "path")
    path = field(body, "path", str, None)
    opts = state.options(
        max_tokens=state.max_tokens(body, "max_tokens", CompletionOptions.max_tokens),
        temperature=field(body, "temperature", float, 0.0), top_p=field(body, "top_p", float, 1.0),
        top_k=field(body, "top_k", int, 0), seed=field(body, "seed", int, None, lo=0, hi=MAX_SEED),
        n=field(body, "n", int, 1), mode=field(body, "mode", str, "auto"),
        fim_mode=field(body, "fim_mode", str, "psm"), stop=tuple(stop_list(body, "stop")),
        filename=path, context_tokens=field(body, "context_tokens", int, CompletionOptions.context_tokens, lo=0),
        speculate=field(body, "speculate", str, CompletionOptions.speculate),
        time_budget_ms=field(body, "time_budget_ms", int, None, lo=1),
    )

    def open_stream() -> ResultStream:
        # On the model thread: ranking the chunks never holds up the event loop.
        snippets = select(prefix, suffix, target=path, client=client_chunks(chunks)) if chunks else ()
        return state.engine.infill(prefix, suffix, replace(opts, context=snippets))

    job = await state.start(request, open_stream)
    if not field(body, "stream", bool, False):
        result = await state.finish(job)
        return JSONResponse(result.to_dict())

    async def events() -> AsyncIterator[bytes]:
        sent = ""
        try:
            async for piece in job:
                if piece.row == 0 and piece.text:
                    sent += piece.text
                    yield sse({"text": piece.text})
            result = await job.result()
        except Exception as exc:
            yield sse_error(exc)
            return
        rest = unsent(result.text, sent)
        if rest:
            yield sse({"text": rest})
        yield sse({"done": True, "result": result.to_dict()})
        yield sse("[DONE]")

    return state.sse_response(events(), job)
