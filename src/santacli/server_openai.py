"""OpenAI-compatible routes: ``GET /v1/models`` and ``POST /v1/completions``.

A request with ``suffix`` is a fill-in-the-middle request laid out by santa; a bare ``prompt``
is used as raw text.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from santacli.engine import CompletionResult
from santacli.server_base import (
    MAX_SEED,
    AppBase,
    field,
    reject_unsupported,
    sampling_params,
    sse,
    sse_error,
    stop_list,
    unsent,
)
from santacli.serving import ApiError, RawResult, Usage, infill_work, raw_work

OPENAI_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's own default
_OPENAI_FINISH = {"eos": "stop", "max_tokens": "length", "cancelled": "stop"}


def openai_final(envelope: Callable[..., dict[str, Any]], choices: list[dict[str, Any]], use: Usage,
                  include_usage: bool) -> list[bytes]:
    """The closing events of an OpenAI stream: last choices, the usage chunk if asked, [DONE]."""
    events = [sse(envelope(choices, use))]
    if include_usage:
        events.append(sse(envelope([], use)))
    events.append(sse("[DONE]"))
    return events


class OpenAIRoutes(AppBase):
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
        reject_unsupported(body, {
            "echo": lambda v: v is False, "logprobs": lambda v: v in (0, False), "best_of": lambda v: v == 1,
            "logit_bias": lambda v: v == {},
            "presence_penalty": lambda v: v == 0, "frequency_penalty": lambda v: v == 0,
        })
        suffix = field(body, "suffix", str, "")
        max_tokens = self._max_tokens(body, "max_tokens", OPENAI_DEFAULT_MAX_TOKENS)
        temperature = field(body, "temperature", float, 1.0, lo=0, hi=2)
        top_p = field(body, "top_p", float, 1.0)
        top_k = field(body, "top_k", int, 0, lo=0)  # an extension (vLLM, llama.cpp have it too)
        seed = field(body, "seed", int, None, lo=0, hi=MAX_SEED)
        n = field(body, "n", int, 1, lo=1, hi=16)
        stops = stop_list(body, "stop")
        stream = field(body, "stream", bool, False)
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
                                 mode=field(body, "mode", str, "full"), stop=tuple(stops))
            job, watcher, _ = await self._start(request, infill_work(self.engine, prompt, suffix, opts))

            def fim_final(result: CompletionResult, sent: str | None) -> tuple[list[dict[str, Any]], Usage]:
                choices = [choice(i, unsent(text, sent) if sent is not None and i == 0 else text,
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
                        yield sse(envelope([choice(0, payload, None)]))
                    elif kind == "done":
                        for event in openai_final(envelope, *fim_final(payload, sent), include_usage):
                            yield event
                        return
                    else:
                        yield sse_error(payload)
                        return

            return self._sse_response(fim_events(), job, watcher)

        sampling = sampling_params(temperature, top_p, top_k, seed)
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
                        yield sse(envelope(pieces))
                elif kind == "done":
                    for event in openai_final(envelope, *raw_final(payload, True), include_usage):
                        yield event
                    return
                else:
                    yield sse_error(payload)
                    return

        return self._sse_response(raw_events(), job, watcher)
