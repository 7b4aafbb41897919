"""TGI-compatible routes: ``POST /generate``, ``/generate_stream``, ``/`` and ``GET /info``.

Raw prompts (spelled-out FIM sentinels in ``inputs`` become control tokens), as llm.nvim and
``huggingface_hub.InferenceClient`` send them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from santacli.completion import CompletionOptions, CompletionResult, Piece
from santacli.server.state import ServerState
from santacli.server.wire import MAX_SEED, ApiError, field, reject_unsupported, sse, sse_error, stop_list
from santacli.server.worker import Job

TGI_DEFAULT_MAX_NEW_TOKENS = 100
_FINISH = {"eos": "eos_token", "max_tokens": "length", "time_budget": "length"}  # others keep their names


def _request(state: ServerState, body: dict[str, Any]) -> tuple[str, dict[str, Any], CompletionOptions, int | None]:
    inputs = field(body, "inputs", str)
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ApiError(422, "'parameters' must be an object", param="parameters")
    reject_unsupported(params, {
        "best_of": lambda v: v == 1, "grammar": lambda v: False, "top_n_tokens": lambda v: v == 0,
        "decoder_input_details": lambda v: v is False, "watermark": lambda v: v is False,
        "repetition_penalty": lambda v: v == 1, "frequency_penalty": lambda v: v == 0,
        "typical_p": lambda v: v == 1, "adapter_id": lambda v: False,
    })
    max_new = state.max_tokens(params, "max_new_tokens", TGI_DEFAULT_MAX_NEW_TOKENS)
    temperature = field(params, "temperature", float, None, lo=0)
    top_p = field(params, "top_p", float, 1.0)
    top_k = field(params, "top_k", int, 0, lo=0)
    do_sample = field(params, "do_sample", bool, False)
    # As in TGI: sampling when asked, or when any sampling knob moves off its neutral value.
    sample = do_sample or (temperature not in (None, 1.0)) or top_p < 1.0 or top_k > 0
    temperature = 1.0 if temperature is None else temperature
    opts = state.options(max_tokens=max_new, temperature=temperature if sample else 0.0, top_p=top_p, top_k=top_k,
                         seed=field(params, "seed", int, None, lo=0, hi=MAX_SEED),
                         stop=tuple(stop_list(params, "stop")))
    return inputs, params, opts, field(params, "truncate", int, None, lo=1)


async def _start(state: ServerState, request: Request, body: dict[str, Any]) -> tuple[str, dict[str, Any], Job]:
    inputs, params, opts, truncate = _request(state, body)
    job = await state.start(request, lambda: state.engine.generate_text(inputs, opts, include_stop=True,
                                                                        truncate=truncate))
    return inputs, params, job


def _token(piece: Piece) -> dict[str, Any]:
    # santa computes no log-probabilities; TGI itself sends null where it has none.
    return {"id": piece.token, "text": piece.text, "logprob": None, "special": piece.special}


def _generated_text(inputs: str, params: dict[str, Any], result: CompletionResult) -> str:
    return inputs + result.text if params.get("return_full_text") else result.text


async def generate(state: ServerState, request: Request) -> Response:
    body = await state.json_body(request)
    if body.get("stream") is True:
        return await _generate_stream(state, request, body)
    return await _generate(state, request, body)


async def generate_only(state: ServerState, request: Request) -> Response:
    return await _generate(state, request, await state.json_body(request))


async def generate_stream(state: ServerState, request: Request) -> Response:
    return await _generate_stream(state, request, await state.json_body(request))


async def _generate(state: ServerState, request: Request, body: dict[str, Any]) -> Response:
    inputs, params, job = await _start(state, request, body)
    pieces: list[Piece] = []
    result = await state.finish(job, pieces)
    tokens: list[dict[str, Any]] = []
    for piece in pieces:
        if piece.token is not None:
            tokens.append(_token(piece))
        elif tokens:  # the text released at the end belongs to the last token
            tokens[-1]["text"] += piece.text
    out: dict[str, Any] = {"generated_text": _generated_text(inputs, params, result)}
    if params.get("details"):
        out["details"] = {
            "finish_reason": _FINISH.get(result.stop_reason, result.stop_reason), "generated_tokens": len(tokens),
            "seed": params.get("seed"), "prefill": [], "tokens": tokens, "best_of_sequences": None,
        }
    return JSONResponse(out)


async def _generate_stream(state: ServerState, request: Request, body: dict[str, Any]) -> Response:
    inputs, params, job = await _start(state, request, body)

    async def events() -> AsyncIterator[bytes]:
        # The last token's event carries the final text and details, so hold one back.
        held: dict[str, Any] | None = None
        index = 0
        try:
            async for piece in job:
                if piece.token is None:
                    if held is not None:
                        held["token"]["text"] += piece.text
                    continue
                if held is not None:
                    yield sse(held)
                index += 1
                held = {"index": index, "token": _token(piece), "generated_text": None, "details": None}
            result = await job.result()
        except Exception as exc:
            yield sse_error(exc, tgi=True)
            return
        if held is None:  # cancelled before any token
            return
        held["generated_text"] = _generated_text(inputs, params, result)
        held["details"] = {"finish_reason": _FINISH.get(result.stop_reason, result.stop_reason),
                           "generated_tokens": index, "seed": params.get("seed"),
                           "input_length": result.prompt_tokens}
        yield sse(held)

    return state.sse_response(events(), job)


async def info(state: ServerState, request: Request) -> Response:
    from santacli import __version__

    facts = state.engine.info
    return JSONResponse({
        "model_id": state.model_name, "model_dtype": facts.dtype, "model_device_type": facts.device,
        "max_total_tokens": facts.context_length, "max_new_tokens": state.max_tokens_limit,
        "max_concurrent_requests": state.worker.capacity, "version": __version__, "router": "santacli",
    })
