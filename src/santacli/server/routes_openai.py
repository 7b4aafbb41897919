"""OpenAI-compatible routes: ``GET /v1/models`` and ``POST /v1/completions``.

A request with ``suffix`` is a fill-in-the-middle request laid out by santa; a bare ``prompt``
is used as raw text. Both stream every choice as it grows.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from santacli.completion import CompletionResult, ResultStream
from santacli.server.state import ServerState
from santacli.server.wire import (
    MAX_SEED,
    field,
    reject_unsupported,
    single_prompt,
    sse,
    sse_error,
    stop_list,
    unsent,
)

OPENAI_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's own default


def finish_reason(stop_reason: str) -> str:
    """santa's stop reason in OpenAI's words."""
    return "length" if stop_reason in ("max_tokens", "time_budget") else "stop"


async def models(state: ServerState, request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "santacli"},
    ]})


async def completions(state: ServerState, request: Request) -> Response:
    body = await state.json_body(request)
    prompt = single_prompt(body, status=422)
    reject_unsupported(body, {
        "echo": lambda v: v is False, "logprobs": lambda v: v in (0, False), "best_of": lambda v: v == 1,
        "logit_bias": lambda v: v == {},
        "presence_penalty": lambda v: v == 0, "frequency_penalty": lambda v: v == 0,
    })
    suffix = field(body, "suffix", str, "")
    opts = state.options(
        max_tokens=state.max_tokens(body, "max_tokens", OPENAI_DEFAULT_MAX_TOKENS),
        temperature=field(body, "temperature", float, 1.0, lo=0, hi=2), top_p=field(body, "top_p", float, 1.0),
        top_k=field(body, "top_k", int, 0, lo=0),  # an extension (vLLM, llama.cpp have it too)
        seed=field(body, "seed", int, None, lo=0, hi=MAX_SEED), n=field(body, "n", int, 1, lo=1, hi=16),
        # FIM: "full" keeps OpenAI's semantics (run to EOS, a stop string or max_tokens) unless
        # the client asks for one of santa's modes.
        mode=field(body, "mode", str, "full") if suffix else "full", stop=tuple(stop_list(body, "stop")),
    )
    stream = field(body, "stream", bool, False)
    options = body.get("stream_options") or {}
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def envelope(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": ident, "object": "text_completion", "created": created,
                               "model": state.model_name, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def final(result: CompletionResult, sent: list[str] | None) -> dict[str, Any]:
        """The last choices (only what a stream has not sent yet) and the usage."""
        choices = [choice(i, unsent(text, sent[i]) if sent else text, finish_reason(result.stop_reasons[i]))
                   for i, text in enumerate(result.candidates)]
        generated = sum(result.candidate_tokens)
        return envelope(choices, {"prompt_tokens": result.prompt_tokens, "completion_tokens": generated,
                                  "total_tokens": result.prompt_tokens + generated})

    def open_stream() -> ResultStream:
        if suffix:
            return state.engine.infill(prompt, suffix, opts)
        return state.engine.generate_text(prompt, opts)

    job = await state.start(request, open_stream)
    if not stream:
        return JSONResponse(final(await state.finish(job), None))

    async def events() -> AsyncIterator[bytes]:
        sent = [""] * opts.n
        try:
            async for piece in job:
                if piece.text:
                    sent[piece.row] += piece.text
                    yield sse(envelope([choice(piece.row, piece.text, None)]))
            last = final(await job.result(), sent)
        except Exception as exc:
            yield sse_error(exc)
            return
        yield sse(last)
        if include_usage:
            yield sse(envelope([], last["usage"]))
        yield sse("[DONE]")

    return state.sse_response(events(), job)


def choice(index: int, text: str, finish: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish}
