"""TGI-compatible routes: ``POST /generate``, ``/generate_stream``, ``/`` and ``GET /info``.

Raw prompts (spelled-out FIM sentinels in ``inputs`` become control tokens), as llm.nvim and
``huggingface_hub.InferenceClient`` send them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from santacli.server_base import (
    MAX_SEED,
    AppBase,
    field,
    reject_unsupported,
    sampling_params,
    sse,
    stop_list,
    tgi_error_type,
)
from santacli.serving import ApiError, RawResult, Work, from_exception, raw_work

TGI_DEFAULT_MAX_NEW_TOKENS = 100


class TgiRoutes(AppBase):
    def _tgi_request(self, body: dict[str, Any]) -> tuple[str, dict[str, Any], Work]:
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
        max_new = self._max_tokens(params, "max_new_tokens", TGI_DEFAULT_MAX_NEW_TOKENS)
        temperature = field(params, "temperature", float, None, lo=0)
        top_p = field(params, "top_p", float, 1.0)
        top_k = field(params, "top_k", int, 0, lo=0)
        do_sample = field(params, "do_sample", bool, False)
        # As in TGI: sampling when asked, or when any sampling knob moves off its neutral value.
        sample = do_sample or (temperature not in (None, 1.0)) or top_p < 1.0 or top_k > 0
        temperature = 1.0 if temperature is None else temperature
        seed = field(params, "seed", int, None, lo=0, hi=MAX_SEED)
        sampling = sampling_params(temperature if sample else 0.0, top_p, top_k, seed)
        truncate = field(params, "truncate", int, None, lo=1)
        work = raw_work(self.engine, inputs, max_new_tokens=max_new, sampling=sampling, n=1,
                         stops=stop_list(params, "stop"), include_stop=True, truncate=truncate)
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
                            yield sse(held)
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
                    yield sse(held)
                    return
                else:
                    err = from_exception(payload)
                    yield sse({"error": err.message, "error_type": tgi_error_type(err.status)})
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
