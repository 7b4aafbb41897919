"""Remote engines: ``santa complete/infill --endpoint URL --api santa|tgi|openai``.

A :class:`RemoteEngine` has the ``infill``/``complete`` API of :class:`~santacli.engine.Engine`
and returns streams with the same contract (iterate for text, then ``result``), so front ends
use either. Against a santa server the request goes to ``/infill`` as it is. Against TGI or an
OpenAI-compatible server this side does what the local engine does around the model: the FIM
layout and token budget with the model's own tokenizer (config.json + tokenizer.json only; no
weights), stop rules and post-processing. The prompt travels as text with the sentinels spelled
out, and generation is cut off (the connection closed) as soon as a stop rule ends the text.

HTTP goes through the standard library, so the CLI needs no extra dependency for it.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from http.client import HTTPResponse
from typing import Any

from santacli import fim, hub
from santacli.completion import CompletionOptions, CompletionResult, ResultStream
from santacli.config import ModelConfig
from santacli.errors import RemoteError, UsageError
from santacli.tokenizer import Tokenizer

APIS = ("santa", "tgi", "openai")



# ---------------------------------------------------------------------------------------------
# HTTP


def _error_message(payload: bytes) -> str:
    """The one-line message from a santa, TGI, OpenAI or FastAPI error body."""
    try:
        body = json.loads(payload)
    except ValueError:
        return payload.decode("utf-8", "replace").strip().splitlines()[0][:200] if payload.strip() else ""
    if isinstance(body, dict):
        error = body.get("error", body.get("detail", body.get("message")))
        if isinstance(error, dict):
            error = error.get("message")
        if error is not None:
            return str(error).strip().splitlines()[0] if str(error).strip() else ""
    return json.dumps(body)[:200]


class _Http:
    """JSON POSTs and server-sent events over urllib, with santa's error messages."""

    def __init__(self, endpoint: str, *, timeout: float, api_key: str | None) -> None:
        if not endpoint.startswith(("http://", "https://")):
            raise UsageError(f"endpoint {endpoint!r} must start with http:// or https://")
        self.endpoint = endpoint.rstrip("/")
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "User-Agent": "santacli"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def post(self, path: str, body: dict[str, Any]) -> HTTPResponse:
        url = self.endpoint + path
        data = json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=self.headers, method="POST")
        try:
            response: HTTPResponse = urllib.request.urlopen(request, timeout=self.timeout)
            return response
        except urllib.error.HTTPError as exc:
            raise self._status_error(url, exc.code, exc.read()) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(f"cannot reach {url} ({reason}); is the server running?") from None

    def _status_error(self, url: str, status: int, payload: bytes) -> RemoteError | UsageError:
        message = _error_message(payload) or f"HTTP {status}"
        if status == 401 or status == 403:
            return RemoteError(f"{url} refused the request ({status}: {message}); check the API key "
                               "(--api-key or SANTA_API_KEY)")
        if status in (400, 413, 422):
            return UsageError(f"the server rejected the request: {message}")
        if status == 404:
            return RemoteError(f"{url} not found (404); check --endpoint and --api")
        if status == 503:
            return RemoteError(f"the server is busy (503: {message}); retry in a moment")
        return RemoteError(f"the server failed ({status}: {message})")

    def events(self, response: HTTPResponse) -> Generator[dict[str, Any], None, None]:
        """JSON payloads of an SSE stream until ``[DONE]`` or its end; error events raise."""
        try:
            for raw in response:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise RemoteError(f"the server sent a malformed event: {data[:80]!r}") from None
                if isinstance(event, dict) and event.get("error") is not None:
                    raise RemoteError(f"the server failed: {_error_message(data.encode())}")
                yield event
        except TimeoutError:  # socket.timeout is an alias
            raise RemoteError(f"the server sent nothing for {self.timeout:g} s; try a larger timeout"
                              ) from None
        except OSError as exc:
            raise RemoteError(f"the connection to the server broke ({exc})") from None
        finally:
            response.close()  # mid-stream, this is what tells the server to stop generating


# ---------------------------------------------------------------------------------------------
# Streams


class RemoteCompletionStream(ResultStream):
    """A completion computed by a server; ``cancel()`` closes the connection at the next piece."""

    def __init__(self, run: Callable[[RemoteCompletionStream], Iterator[str]]) -> None:
        super().__init__()
        self._run = run
        self._started = False

    def __iter__(self) -> Iterator[str]:
        if self._started:
            return
        self._started = True
        yield from self._run(self)

    def _finish(self, result: CompletionResult) -> None:
        self._result = result


_TGI_FINISH = {"eos_token": "eos", "length": "max_tokens", "stop_sequence": "eos"}
_OPENAI_FINISH = {"stop": "eos", "length": "max_tokens"}

# (row, text piece or None, the server's end of that row or None)
Piece = tuple[int, str | None, str | None]


class RemoteEngine:
    """Completions from a server, with :class:`~santacli.engine.Engine`'s ``infill``/``complete``.

    Args:
        endpoint: the server's base URL (``http://127.0.0.1:8080``; for OpenAI servers with or
            without the trailing ``/v1``).
        api: ``santa`` (a ``santa serve``), ``tgi`` (text-generation-inference or anything that
            speaks ``/generate_stream``) or ``openai`` (``/v1/completions``).
        model: folder, alias or hub id of the served model; for ``tgi``/``openai`` only its
            config.json and tokenizer.json are read (to lay out prompts), and its name goes in
            OpenAI requests. Not needed for ``santa``.
        timeout: seconds to wait for the server to connect or send the next piece.
        api_key: sent as ``Authorization: Bearer KEY`` (default: ``$SANTA_API_KEY``).

    Raises:
        UsageError: unknown api, bad endpoint, or no model for tgi/openai.
        ModelNotFoundError, ConfigError, CheckpointError: the model's files cannot be read.
    """

    def __init__(self, endpoint: str, api: str = "santa", model: str | None = None, timeout: float = 60.0,
                 *, api_key: str | None = None) -> None:
        if api not in APIS:
            raise UsageError(f"api must be one of {', '.join(APIS)}, got {api!r}")
        if not timeout > 0:
            raise UsageError(f"timeout must be > 0 seconds, got {timeout}")
        self.api = api
        self.model = model
        self.http = _Http(endpoint, timeout=timeout, api_key=api_key or os.environ.get("SANTA_API_KEY"))
        self.endpoint = self.http.endpoint
        self.tokenizer: Tokenizer | None = None
        self.config: ModelConfig | None = None
        if api != "santa":
            if not model:
                raise UsageError(f"--api {api} needs --model: the served model's tokenizer lays out "
                                 "the prompt")
            folder = hub.resolve_model(model)
            self.config = ModelConfig.from_file(folder / "config.json")
            self.tokenizer = Tokenizer.from_file(folder / "tokenizer.json")

    @property
    def name(self) -> str:
        return self.model or self.endpoint

    def infill(self, prefix: str, suffix: str, options: CompletionOptions | None = None,
               **overrides: object) -> RemoteCompletionStream:
        """Fill in the middle between ``prefix`` and ``suffix`` on the server (see ``Engine.infill``).

        Raises:
            UsageError, ContextLengthError: invalid options or no room for the prompt.
            RemoteError: (while iterating) the server cannot be reached or failed.
        """
        opts = replace(options or CompletionOptions(), **overrides)  # type: ignore[arg-type]
        mode = fim.choose_mode(opts.mode, prefix, suffix)
        if self.api == "santa":
            return RemoteCompletionStream(lambda s: self._run_santa(s, prefix, suffix, mode, opts))
        prompt = self._prompt(prefix, suffix, opts)
        text = self._spell_out(prompt.ids)
        pieces = self._tgi_pieces if self.api == "tgi" else self._openai_pieces
        return RemoteCompletionStream(lambda s: self._run_client_side(s, prompt, text, mode, opts, pieces))

    def complete(self, prefix: str, options: CompletionOptions | None = None,
                 **overrides: object) -> RemoteCompletionStream:
        """Continue ``prefix`` left to right (an infill with an empty suffix)."""
        return self.infill(prefix, "", options, **overrides)

    # -- prompts (tgi, openai) ------------------------------------------------------------------

    def _prompt(self, prefix: str, suffix: str, opts: CompletionOptions) -> fim.Prompt:
        tok, config = self.tokenizer, self.config
        assert tok is not None and config is not None  # loaded for tgi/openai
        use_name = opts.use_filename and tok.filename_id is not None and bool(opts.filename)
        return fim.build_prompt(
            tok.encode, prefix=prefix, suffix=suffix, fim=tok.fim, fim_mode=opts.fim_mode,
            n_positions=config.n_positions, max_tokens=opts.max_tokens,
            filename_id=tok.filename_id if use_name else None, filename=opts.filename if use_name else None,
        )

    def _spell_out(self, ids: list[int]) -> str:
        """The prompt as text with its control tokens spelled out, which the server's tokenizer
        turns back into exactly ``ids``."""
        tok = self.tokenizer
        assert tok is not None
        text = tok.decode_with_specials(ids)
        if tok.encode_raw(text) != ids:
            raise UsageError(
                "the input contains text that spells a special token (such as <|endoftext|> or a FIM "
                "sentinel); a TGI/OpenAI server would read it as a control token. Use --api santa, "
                "or complete locally"
            )
        return text

    # -- runs ------------------------------------------------------------------------------------

    def _run_client_side(self, stream: RemoteCompletionStream, prompt: fim.Prompt, text: str, mode: str,
                         opts: CompletionOptions, source: Callable[..., Generator[Piece, None, None]]
                         ) -> Iterator[str]:
        """Mirror of ``CompletionStream.__iter__`` with the model on the other end of a socket."""
        started = time.perf_counter()
        n = opts.n
        suffix = prompt.suffix if prompt.fim else ""
        filters = [fim.CompletionFilter(mode, prefix=prompt.prefix, suffix=suffix, stops=opts.stop)
                   for _ in range(n)]
        reasons: list[str | None] = [None] * n
        counts = [0] * n
        first_token_at: float | None = None
        pieces = source(text, opts, lambda row: reasons[row] is not None)
        try:
            for row, piece, finish in pieces:
                if first_token_at is None and piece is not None:
                    first_token_at = time.perf_counter()
                if reasons[row] is None and piece is not None:
                    counts[row] += 1
                    out = filters[row].feed(piece)
                    if filters[row].stopped:
                        reasons[row] = filters[row].stopped
                    if row == 0 and out:
                        yield out
                if reasons[row] is None and finish is not None:
                    reasons[row] = finish
                if stream.cancelled:
                    reasons = [r or "cancelled" for r in reasons]
                if all(reasons):
                    break
        finally:
            pieces.close()  # closes the connection: the server stops generating
        texts = []
        for row in range(n):
            if reasons[row] is None:
                reasons[row] = "max_tokens"
            rest = filters[row].finish(ended_by_rule=reasons[row] != "eos")
            if row == 0 and rest:
                yield rest
            texts.append(filters[row].text)
        done = time.perf_counter()
        first = first_token_at or done
        generated = max(counts)
        stream._finish(CompletionResult(
            text=texts[0], candidates=texts, stop_reasons=[r or "max_tokens" for r in reasons], mode=mode,
            fim=prompt.fim, fim_mode=opts.fim_mode, prompt_tokens=len(prompt.ids), reused_prompt_tokens=0,
            generated_tokens=generated, time_to_first_token=first - started,
            tokens_per_second=(generated - 1) / (done - first) if generated > 1 and done > first else 0.0,
            elapsed=done - started, truncation=prompt.truncation, model=self.name,
        ))

    def _tgi_pieces(self, text: str, opts: CompletionOptions, done: Callable[[int], bool]
                    ) -> Generator[Piece, None, None]:
        # TGI has no n: one request per candidate, each with its own seed.
        for row in range(opts.n):
            params: dict[str, Any] = {"max_new_tokens": opts.max_tokens, "details": True,
                                      "return_full_text": False, "do_sample": opts.temperature > 0}
            if opts.temperature > 0:
                params["temperature"] = opts.temperature
                if opts.top_p < 1:
                    params["top_p"] = opts.top_p
                if opts.top_k:
                    params["top_k"] = opts.top_k
                if opts.seed is not None:
                    params["seed"] = opts.seed + row
            response = self.http.post("/generate_stream", {"inputs": text, "parameters": params})
            events = self.http.events(response)
            try:
                for event in events:
                    token = event.get("token") or {}
                    details = event.get("details") or {}
                    finish = _TGI_FINISH.get(details.get("finish_reason", ""))
                    yield row, str(token.get("text", "")), finish
                    if done(row):
                        break
            finally:
                events.close()

    def _openai_pieces(self, text: str, opts: CompletionOptions, done: Callable[[int], bool]
                    ) -> Generator[Piece, None, None]:
        body: dict[str, Any] = {"model": self.model, "prompt": text, "max_tokens": opts.max_tokens,
                                "temperature": opts.temperature, "top_p": opts.top_p, "n": opts.n,
                                "stream": True}
        if opts.top_k:
            body["top_k"] = opts.top_k  # an extension that santa, vLLM and llama.cpp accept
        if opts.seed is not None:
            body["seed"] = opts.seed
        path = "/completions" if self.endpoint.endswith("/v1") else "/v1/completions"
        events = self.http.events(self.http.post(path, body))
        try:
            for event in events:
                for choice in event.get("choices") or []:
                    row = int(choice.get("index", 0))
                    if not 0 <= row < opts.n:
                        continue
                    reason = choice.get("finish_reason")
                    finish = _OPENAI_FINISH.get(reason, "eos") if reason else None
                    yield row, str(choice.get("text") or ""), finish
        finally:
            events.close()

    def _run_santa(self, stream: RemoteCompletionStream, prefix: str, suffix: str, mode: str,
                   opts: CompletionOptions) -> Iterator[str]:
        started = time.perf_counter()
        body: dict[str, Any] = {
            "prefix": prefix, "suffix": suffix, "mode": mode, "fim_mode": opts.fim_mode,
            "max_tokens": opts.max_tokens, "temperature": opts.temperature, "top_p": opts.top_p,
            "top_k": opts.top_k, "seed": opts.seed, "n": opts.n, "stop": list(opts.stop), "stream": True,
        }
        if opts.use_filename and opts.filename:
            body["path"] = opts.filename
        events = self.http.events(self.http.post("/infill", body))
        shown = ""
        try:
            for event in events:
                if "text" in event:
                    shown += event["text"]
                    yield event["text"]
                elif "result" in event:
                    elapsed = time.perf_counter() - started
                    stream._finish(self._result_from_dict(event["result"], opts, elapsed))
                    return
                if stream.cancelled:
                    break
        finally:
            events.close()
        # Cancelled, or the stream ended without a result: report what arrived.
        elapsed = time.perf_counter() - started
        stream._finish(CompletionResult(
            text=shown, candidates=[shown], stop_reasons=["cancelled"], mode=mode, fim=bool(suffix),
            fim_mode=opts.fim_mode, prompt_tokens=0, reused_prompt_tokens=0, generated_tokens=0,
            time_to_first_token=elapsed, tokens_per_second=0.0, elapsed=elapsed, truncation=fim.Truncation(),
            model=self.name,
        ))

    def _result_from_dict(self, d: dict[str, Any], opts: CompletionOptions, elapsed: float
                          ) -> CompletionResult:
        """Rebuild the server's ``CompletionResult.to_dict()``; ``elapsed`` is measured here."""
        try:
            tokens, timings, cut = d["tokens"], d["timings"], d["truncated"]
            return CompletionResult(
                text=d["completion"], candidates=list(d["candidates"]), stop_reasons=list(d["stop_reasons"]),
                mode=d["mode"], fim=bool(d["fim"]), fim_mode=d["fim_mode"] or opts.fim_mode,
                prompt_tokens=int(tokens["prompt"]), reused_prompt_tokens=int(tokens["prompt_reused"]),
                generated_tokens=int(tokens["generated"]),
                time_to_first_token=float(timings["time_to_first_token_s"]),
                tokens_per_second=float(timings["tokens_per_s"]), elapsed=elapsed,
                truncation=fim.Truncation(prefix_chars=int(cut["prefix_chars"]),
                                          prefix_lines=int(cut["prefix_lines"]),
                                          suffix_chars=int(cut["suffix_chars"]),
                                          suffix_lines=int(cut["suffix_lines"])),
                model=str(d["model"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise RemoteError(f"the server's answer is not a santa result (missing or bad {exc})") from None
