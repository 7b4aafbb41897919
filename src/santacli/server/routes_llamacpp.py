"""llama.cpp's server protocol, as llama.vim and llama.vscode speak it, beside santa's own.

- ``POST /infill`` with ``input_prefix``/``input_suffix`` (santa's ``/infill`` hands such bodies
  here; its own have ``prefix``/``suffix``): ``prompt`` (the text typed on the cursor's line
  before the cursor: it ends the prefix and the completion continues it), ``input_extra``
  (``[{filename, text}]``: chunks ranked and laid out as cross-file context, see
  :mod:`santacli.context`), ``n_predict`` (``0``: only fill the prompt cache, as llama.vim's
  warm-up requests ask), ``n_indent``, ``t_max_predict_ms``, ``stop``, ``temperature``,
  ``top_k``, ``top_p``, ``seed``, ``stream``, ``response_fields`` (the answer holds only these
  ``a/b`` paths, flattened, as llama.cpp returns them). ``t_max_prompt_ms``, ``cache_prompt``,
  ``samplers``, ``id_slot``, ``model`` and fields santa does not know are accepted and ignored
  (santa always keeps its prompt cache; llama.cpp does not implement ``t_max_prompt_ms``).
- ``POST /completion`` (and ``/completions``): a raw ``prompt``, whose spelled-out control tokens
  count as such.
- ``GET /props``.

Answers have llama.cpp's fields (``content``, ``stop``, ``stop_type``, ``stopped_eos``...,
``tokens_cached``, ``truncated``, ``timings/*``) plus ``santa`` (the stop reason in santa's words and
the context snippets used). Bad input is a 400 in llama.cpp's error shape. Unlike llama.cpp,
santa decodes greedily unless the request sets a ``temperature`` (llama.vim sends none).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from santacli.completion import CompletionOptions, CompletionResult, ResultStream
from santacli.context import client_chunks, select
from santacli.errors import SantaError
from santacli.server.state import ServerState
from santacli.server.wire import MAX_SEED, ApiError, field, from_exception, single_prompt, sse, stop_list, unsent
from santacli.server.worker import Job

MAX_EXTRA_CHUNKS = 256  # input_extra entries per request
MAX_EXTRA_CHARS = 64 * 2**10  # characters per input_extra text
MAX_FIELDS = 64  # response_fields entries
_LLAMA_SEED_RANDOM = (-1, 0xFFFFFFFF)  # llama.cpp's "pick a random seed"
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                501: "not_supported_error", 503: "unavailable_error"}


def error_response(err: ApiError) -> JSONResponse:
    """An error in llama.cpp's shape; santa's 422 (a bad field) is llama.cpp's 400."""
    status = 400 if err.status == 422 else err.status
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    headers = {"Retry-After": "1"} if status == 503 else {}
    return JSONResponse({"error": {"code": status, "message": err.message, "type": kind}}, status_code=status,
                        headers=headers)


_Handler = Callable[[ServerState, Request, dict[str, Any]], Awaitable[Response]]


def _llama_errors(handler: _Handler) -> _Handler:
    """``handler`` with its errors answered in llama.cpp's shape."""
    async def run(state: ServerState, request: Request, body: dict[str, Any]) -> Response:
        try:
            return await handler(state, request, body)
        except ApiError as err:
            return error_response(err)
        except SantaError as exc:
            return error_response(from_exception(exc))

    return run


# ---------------------------------------------------------------------------------------------
# Requests


class _Request:
    """One llama.cpp completion request, checked, in santa's terms."""

    def __init__(self, state: ServerState, body: dict[str, Any]) -> None:
        n_predict = field(body, "n_predict", int, -1, lo=-1)
        limit = state.max_tokens_limit
        # -1 is llama.cpp's "until the end": santa's default, within the server's limit; more
        # than the limit is capped, as llama.cpp caps it at its own --n-predict.
        self.prefill_only = n_predict == 0
        max_tokens = min(CompletionOptions.max_tokens if n_predict < 0 else max(n_predict, 1), limit)
        temperature = max(field(body, "temperature", float, 0.0), 0.0)  # <= 0 is greedy there too
        seed = field(body, "seed", int, None, lo=-1, hi=MAX_SEED)
        self.n_indent: int = field(body, "n_indent", int, 0, lo=0)
        budget = field(body, "t_max_predict_ms", int, 0)
        field(body, "t_max_prompt_ms", int, 0)  # accepted: llama.cpp does not implement it either
        field(body, "cache_prompt", bool, True)  # santa always keeps its warm prompt cache
        samplers = body.get("samplers")
        if samplers is not None and not isinstance(samplers, (list, str)):
            raise ApiError(400, "'samplers' must be a list of sampler names", param="samplers")
        self.stream: bool = field(body, "stream", bool, False)
        self.fields = _response_fields(body)
        self.options = state.options(
            max_tokens=max_tokens, temperature=temperature,
            top_k=field(body, "top_k", int, 40 if temperature > 0 else 0, lo=0),
            top_p=field(body, "top_p", float, 0.95 if temperature > 0 else 1.0),
            seed=None if seed in _LLAMA_SEED_RANDOM else seed,
            stop=tuple(stop_list(body, "stop")), mode=field(body, "mode", str, "auto"),
            time_budget_ms=budget if budget > 0 and not self.prefill_only else None,
        )


def _response_fields(body: dict[str, Any]) -> list[str] | None:
    value = body.get("response_fields")
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or len(value) > MAX_FIELDS:
        raise ApiError(400, f"'response_fields' must be a list of at most {MAX_FIELDS} strings",
                       param="response_fields")
    return value


def extra_chunks(body: dict[str, Any], key: str = "input_extra", name: str = "filename") -> list[tuple[str, str]]:
    """``body[key]``, a list of ``{name: string, "text": string}``, as ``(name, text)`` pairs,
    checked as llama.cpp checks ``input_extra``, with santa's size limits (santa's own
    ``/infill`` takes ``context: [{"path", "text"}]`` the same way).

    Raises:
        ApiError: 400 for a wrong type, too many chunks or too long a text.
    """
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(400, f"'{key}' must be an array of {{\"{name}\": string, \"text\": string}}", param=key)
    if len(value) > MAX_EXTRA_CHUNKS:
        raise ApiError(400, f"'{key}' may hold at most {MAX_EXTRA_CHUNKS} chunks", param=key)
    out = []
    for i, chunk in enumerate(value):
        if not isinstance(chunk, dict) or not isinstance(chunk.get("text"), str):
            raise ApiError(400, f"{key}[{i}] must contain a \"text\" field with a string value", param=key)
        label = chunk.get(name)
        if label is not None and not isinstance(label, str):
            raise ApiError(400, f"{key}[{i}]: \"{name}\" must be a string", param=key)
        if len(chunk["text"]) > MAX_EXTRA_CHARS:
            raise ApiError(400, f"{key}[{i}]: \"text\" is longer than {MAX_EXTRA_CHARS} characters", param=key)
        out.append((label or "", chunk["text"]))
    return out


def _string(body: dict[str, Any], key: str, *, required: bool) -> str:
    value = body.get(key)
    if value is None:
        if required:
            raise ApiError(400, f"\"{key}\" is required", param=key)
        return ""
    if not isinstance(value, str):
        raise ApiError(400, f"\"{key}\" must be a string", param=key)
    return value


def _target(body: dict[str, Any], chunks: list[tuple[str, str]]) -> str | None:
    """The file being edited, for the comment syntax of the context block: santa's ``path``
    extension field, else the most common extension among the chunks' file names (llama.vim
    does not say which file the cursor is in; its chunks mostly come from the same language)."""
    path = body.get("path")
    if isinstance(path, str) and path:
        return path
    names = [name for name, _ in chunks if "." in name.rsplit("/", 1)[-1]]
    if not names:
        return None
    ext, _ = Counter(name.rsplit(".", 1)[1] for name in names).most_common(1)[0]
    return f"file.{ext}"


# ---------------------------------------------------------------------------------------------
# Answers


def indent_cut(text: str, n_indent: int) -> int | None:
    """Where llama.cpp's ``n_indent`` ends ``text``: before the first later line that starts
    with fewer than ``n_indent`` spaces or tabs (santa drops that line's newline too)."""
    start = text.find("\n")
    while start >= 0:
        line = text[start + 1:].split("\n", 1)[0]
        body = line.lstrip(" \t")
        if body and len(line) - len(body) < n_indent:
            return start
        start = text.find("\n", start + 1)
    return None


def _undecided(text: str) -> int:
    """How much of ``text`` may be sent while ``n_indent`` can still cut: all but a last line
    that is only indentation so far (with its newline)."""
    last = text.rfind("\n")
    return last if last >= 0 and not text[last + 1:].strip(" \t") else len(text)


_STOP_TYPES = {"eos": "eos", "stop_sequence": "word", "cancelled": "none"}


def _answer(state: ServerState, req: _Request, result: CompletionResult, content: str, *, by_indent: bool
            ) -> dict[str, Any]:
    """The final answer object, as llama.cpp's ``to_json_non_oaicompat`` writes it."""
    opts = req.options
    reason = "max_tokens" if by_indent else result.stop_reason
    stop_type = "limit" if req.prefill_only else _STOP_TYPES.get(reason, "limit")
    predicted = 0 if req.prefill_only else result.generated_tokens
    prompt_n = result.prompt_tokens - result.reused_prompt_tokens
    prompt_ms = result.time_to_first_token * 1000
    predicted_ms = 0.0 if req.prefill_only else max(result.elapsed - result.time_to_first_token, 0.0) * 1000
    word = opts.stop[0] if reason == "stop_sequence" and len(opts.stop) == 1 else ""
    return {
        "index": 0, "content": content, "tokens": [], "id_slot": 0, "stop": True, "model": state.model_name,
        "tokens_predicted": predicted, "tokens_evaluated": result.prompt_tokens,
        "generation_settings": {"n_predict": 0 if req.prefill_only else opts.max_tokens,
                                "temperature": opts.temperature, "top_k": opts.top_k, "top_p": opts.top_p,
                                "seed": opts.seed, "stop": list(opts.stop), "n_indent": req.n_indent,
                                "t_max_predict_ms": opts.time_budget_ms or -1},
        "has_new_line": "\n" in content, "truncated": result.truncation.any,
        "stop_type": stop_type, "stopping_word": word, "stopped_eos": stop_type == "eos",
        "stopped_word": stop_type == "word", "stopped_limit": stop_type == "limit",
        "tokens_cached": result.prompt_tokens + predicted,
        "timings": {
            "cache_n": result.reused_prompt_tokens, "prompt_n": prompt_n, "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / prompt_n if prompt_n else 0.0,
            "prompt_per_second": 1000 * prompt_n / prompt_ms if prompt_ms else 0.0,
            "predicted_n": predicted, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / predicted if predicted else 0.0,
            "predicted_per_second": 1000 * predicted / predicted_ms if predicted_ms else 0.0,
        },
        "santa": {"stop_reason": "n_indent" if by_indent else result.stop_reason,
                  "context": result.to_dict()["context"]},
    }


def pick_fields(answer: dict[str, Any], paths: list[str]) -> dict[str, Any]:
    """Only ``paths`` of ``answer`` (``a/b`` reaches into objects), keyed by the path itself, as
    llama.cpp's ``response_fields`` returns them; paths that lead nowhere are left out."""
    out: dict[str, Any] = {}
    for path in paths:
        value: Any = answer
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out


async def _respond(state: ServerState, request: Request, req: _Request, open_stream: Callable[[], ResultStream]
                   ) -> Response:
    job = await state.start(request, open_stream)
    if req.stream:
        return state.sse_response(_events(state, req, job), job)
    text, cut = "", None
    try:
        async for piece in job:
            if piece.row != 0 or not piece.text or cut is not None:
                continue
            text += piece.text
            cut = indent_cut(text, req.n_indent) if req.n_indent else None
            if cut is not None:
                job.cancel()  # the rest would be cut: stop generating it
        result = await job.result()
    except Exception as exc:
        raise from_exception(exc) from None
    finally:
        job.close()
    content = "" if req.prefill_only else (text[:cut] if cut is not None else result.text)
    answer = _answer(state, req, result, content, by_indent=cut is not None)
    return JSONResponse(answer if req.fields is None else pick_fields(answer, req.fields))


async def _events(state: ServerState, req: _Request, job: Job) -> AsyncIterator[bytes]:
    """llama.cpp's stream: one event per piece of text, then the answer with ``stop: true``."""
    text, sent, cut, count = "", "", None, 0
    try:
        async for piece in job:
            if piece.row != 0 or cut is not None or req.prefill_only:
                continue
            count += 1
            text += piece.text
            cut = indent_cut(text, req.n_indent) if req.n_indent else None
            if cut is not None:
                job.cancel()
                text = text[:cut]
            ready = text if cut is not None or not req.n_indent else text[:_undecided(text)]
            if len(ready) > len(sent):
                yield sse({"index": 0, "content": ready[len(sent):], "tokens": [], "stop": False, "id_slot": 0,
                           "tokens_predicted": count})
                sent = ready
        result = await job.result()
    except Exception as exc:
        err = from_exception(exc)
        yield sse({"error": {"code": err.status, "message": err.message, "type": err.kind}})
        return
    content = "" if req.prefill_only else (text if cut is not None else result.text)
    rest = unsent(content, sent)
    if rest:
        yield sse({"index": 0, "content": rest, "tokens": [], "stop": False, "id_slot": 0})
    answer = _answer(state, req, result, content, by_indent=cut is not None)
    answer["content"] = ""  # in a stream the text went out in the pieces
    yield sse(answer if req.fields is None else pick_fields(answer, req.fields))


# ---------------------------------------------------------------------------------------------
# Routes


@_llama_errors
async def infill(state: ServerState, request: Request, body: dict[str, Any]) -> Response:
    """``POST /infill`` with llama.cpp's fields (santa's own ``/infill`` hands the body over)."""
    prefix = _string(body, "input_prefix", required=True) + _string(body, "prompt", required=False)
    suffix = _string(body, "input_suffix", required=True)
    chunks = extra_chunks(body)
    req = _Request(state, body)
    target = _target(body, chunks)

    def open_stream() -> ResultStream:
        # On the model thread: ranking the chunks never holds up the event loop.
        snippets = select(prefix, suffix, target=target, client=client_chunks(chunks)) if chunks else ()
        opts = replace(req.options, context=snippets)
        if req.prefill_only:
            # Fill the prompt cache with the head later requests share (the sentinel, then the
            # context block): one token is "generated", which is prefill and no decode step. An
            # empty suffix would lay out a left-to-right prompt, so a newline stands in.
            return state.engine.infill(prefix, suffix or "\n", replace(opts, max_tokens=1, mode="full"))
        return state.engine.infill(prefix, suffix, opts)

    return await _respond(state, request, req, open_stream)


async def completion(state: ServerState, request: Request) -> Response:
    """``POST /completion``: continue a raw prompt."""
    try:
        body = await state.json_body(request)
    except ApiError as err:
        return error_response(err)
    return await _completion(state, request, body)


@_llama_errors
async def _completion(state: ServerState, request: Request, body: dict[str, Any]) -> Response:
    prompt = single_prompt(body, status=400, quote='"')
    req = _Request(state, body)
    opts = replace(req.options, max_tokens=1) if req.prefill_only else req.options
    return await _respond(state, request, req, lambda: state.engine.generate_text(prompt, opts))


async def props(state: ServerState, request: Request) -> Response:
    """``GET /props``: the server's settings, as llama.cpp reports them."""
    from santacli import __version__

    info = state.engine.info
    defaults = CompletionOptions()
    return JSONResponse({
        "default_generation_settings": {
            "n_ctx": info.context_length, "model": state.model_name,
            "params": {"n_predict": min(defaults.max_tokens, state.max_tokens_limit),
                       "temperature": defaults.temperature, "top_k": defaults.top_k, "top_p": defaults.top_p,
                       "stop": []},
        },
        "total_slots": 1, "model_path": str(info.folder), "model_alias": state.model_name, "chat_template": "",
        "modalities": {"vision": False, "audio": False}, "build_info": f"santacli {__version__}",
    })
