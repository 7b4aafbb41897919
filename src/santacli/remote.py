"""Remote engines: ``santa complete/infill --endpoint URL --api santa|tgi|openai``.

A :class:`RemoteEngine` is a :class:`~santacli.completion.CompletionEngine` like the local
:class:`~santacli.engine.Engine`, so front ends use either. Against a santa server the request
goes to ``/infill`` as it is. Against TGI or an OpenAI-compatible server the server is only a
token source for santa's own text loop (:class:`~santacli.completion.CompletionRun`): the FIM
layout and token budget use the model's own tokenizer (config.json + tokenizer.json only; no
weights), the prompt travels as text with the sentinels spelled out, and generation is cut off
(the connection closed) as soon as a stop rule ends the text.

HTTP goes through the standard library, so the CLI needs no extra dependency for it.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from http.client import HTTPResponse
from typing import Any

from santacli import fim, hub
from santacli.completion import (
    CompletionOptions,
    CompletionResult,
    CompletionRun,
    Piece,
    ResultStream,
    TokenEvent,
    layout_prompt,
)
from santacli.config import ModelConfig
from santacli.daemon import ModelSpec, UnixHTTPConnection
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
        self.unix_socket: str | None = None
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", "User-Agent": "santacli"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        if endpoint.startswith("unix:"):  # unix:/path/to/socket (the per-user daemon)
            self.unix_socket, self.endpoint = endpoint.removeprefix("unix:"), endpoint
            return
        if not endpoint.startswith(("http://", "https://")):
            raise UsageError(f"endpoint {endpoint!r} must start with http:// or https://")
        try:
            parts = urllib.parse.urlsplit(endpoint)
            parts.port  # noqa: B018 (a bad port raises here)
        except ValueError as exc:
            raise UsageError(f"endpoint {endpoint!r} is not a valid URL ({exc})") from None
        if not parts.hostname:
            raise UsageError(f"endpoint {endpoint!r} names no host")
        self.endpoint = endpoint.rstrip("/")

    def post(self, path: str, body: dict[str, Any]) -> HTTPResponse:
        url = self.endpoint + path
        data = json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=self.headers, method="POST")
        try:
            if self.unix_socket is not None:
                return self._post_unix(path, data, url)
            response: HTTPResponse = urllib.request.urlopen(request, timeout=self.timeout)
            return response
        except urllib.error.HTTPError as exc:
            raise self._status_error(url, exc.code, exc.read()) from None
        except http.client.HTTPException as exc:
            raise RemoteError(f"{url} did not answer as an HTTP server ({type(exc).__name__}); check --endpoint"
                              ) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RemoteError(f"cannot reach {url} ({reason}); is the server running?") from None

    def _post_unix(self, path: str, data: bytes, url: str) -> HTTPResponse:
        assert self.unix_socket is not None
        conn = UnixHTTPConnection(self.unix_socket, self.timeout)
        conn.request("POST", path, body=data, headers=self.headers)
        response = conn.getresponse()
        if response.status >= 400:
            raise self._status_error(url, response.status, response.read())
        return response

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
        except http.client.HTTPException as exc:
            raise RemoteError(f"the server's answer broke off ({type(exc).__name__})") from None
        except TimeoutError:  # socket.timeout is an alias
            raise RemoteError(f"the server sent nothing for {self.timeout:g} s; try a larger timeout"
                              ) from None
        except OSError as exc:
            raise RemoteError(f"the connection to the server broke ({exc})") from None
        finally:
            response.close()  # mid-stream, this is what tells the server to stop generating


# ---------------------------------------------------------------------------------------------
# Servers as token sources


_TGI_FINISH = {"eos_token": "eos", "length": "max_tokens", "stop_sequence": "eos"}
_OPENAI_FINISH = {"stop": "eos", "length": "max_tokens"}

# Reads a server's stream into token events; skips rows in the given set (a stop rule ended them).
EventReader = Callable[[set[int]], Generator[TokenEvent, None, None]]


class _ServerTokens:
    """A :class:`~santacli.completion.TokenSource` over one streamed HTTP exchange; closing it
    closes the connection, which is what tells the server to stop generating."""

    reused_prompt_tokens = 0  # a TGI/OpenAI server does not say

    def __init__(self, read: EventReader) -> None:
        self._stopped: set[int] = set()
        self._events = read(self._stopped)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    def stop_row(self, row: int) -> None:
        self._stopped.add(row)

    def close(self) -> None:
        self._events.close()


class _SantaStream(ResultStream):
    """A completion that a santa server computes whole: its text as it streams, then its result."""

    def __init__(self, engine: RemoteEngine, body: dict[str, Any], opts: CompletionOptions) -> None:
        super().__init__()
        self._engine, self._body, self._opts = engine, body, opts

    def _run(self) -> Iterator[Piece]:
        http, started = self._engine.http, time.perf_counter()
        events = http.events(http.post("/infill", self._body))
        shown = ""
        try:
            for event in events:
                if "text" in event:
                    shown += event["text"]
                    yield Piece(0, None, event["text"])
                elif "result" in event:
                    self._result = _result_from_dict(event["result"], self._opts, time.perf_counter() - started)
                    return
                if self.cancelled:
                    break
        finally:
            events.close()
        # Cancelled, or the stream ended without a result: report what arrived.
        elapsed = time.perf_counter() - started
        self._result = CompletionResult(
            text=shown, candidates=[shown], stop_reasons=["cancelled"], mode=self._body["mode"],
            fim=bool(self._body["suffix"]), fim_mode=self._opts.fim_mode, prompt_tokens=0, reused_prompt_tokens=0,
            generated_tokens=0, time_to_first_token=elapsed, tokens_per_second=0.0, elapsed=elapsed,
            truncation=fim.Truncation(), model=self._engine.name,
        )


class RemoteEngine:
    """Completions from a server, with :class:`~santacli.engine.Engine`'s ``infill``/``complete``.

    Args:
        endpoint: the server's base URL (``http://127.0.0.1:8080``; for OpenAI servers with or
            without the trailing ``/v1``), or ``unix:/path/to/socket``.
        api: ``santa`` (a ``santa serve``), ``tgi`` (text-generation-inference or anything that
            speaks ``/generate_stream``) or ``openai`` (``/v1/completions``).
        model: folder, alias or hub id of the served model; for ``tgi``/``openai`` only its
            config.json and tokenizer.json are read (to lay out prompts), and its name goes in
            OpenAI requests. Not needed for ``santa``.
        timeout: seconds to wait for the server to connect or send the next piece.
        api_key: sent as ``Authorization: Bearer KEY`` (default: ``$SANTA_API_KEY``).
        model_spec: the model (and how to run it) that the per-user daemon must hold.

    Raises:
        UsageError: unknown api, bad endpoint, or no model for tgi/openai.
        ModelNotFoundError, ConfigError, CheckpointError: the model's files cannot be read.
    """

    def __init__(self, endpoint: str, api: str = "santa", model: str | None = None, timeout: float = 60.0,
                 *, api_key: str | None = None, model_spec: ModelSpec | None = None) -> None:
        if api not in APIS:
            raise UsageError(f"api must be one of {', '.join(APIS)}, got {api!r}")
        if not timeout > 0:
            raise UsageError(f"timeout must be > 0 seconds, got {timeout}")
        self.api = api
        self.model = model
        self.http = _Http(endpoint, timeout=timeout, api_key=api_key or os.environ.get("SANTA_API_KEY"))
        self.endpoint = self.http.endpoint
        if model_spec is not None:  # the daemon loads this model if it holds another
            self.http.headers["X-Santa-Model"] = json.dumps(model_spec.to_dict())
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
               **overrides: object) -> ResultStream:
        """Fill in the middle between ``prefix`` and ``suffix`` on the server (see ``Engine.infill``).

        Raises:
            UsageError, ContextLengthError: invalid options or no room for the prompt.
            RemoteError: (while iterating) the server cannot be reached or failed.
        """
        opts = replace(options or CompletionOptions(), **overrides)  # type: ignore[arg-type]
        mode = fim.choose_mode(opts.mode, prefix, suffix)
        if self.api == "santa":
            return _SantaStream(self, self._santa_body(prefix, suffix, mode, opts), opts)
        tok, config = self.tokenizer, self.config
        assert tok is not None and config is not None  # loaded for tgi/openai
        prompt = layout_prompt(tok, config.n_positions, prefix, suffix, opts)
        text = self._spell_out(prompt.ids)
        read = self._tgi_events if self.api == "tgi" else self._openai_events
        return CompletionRun(lambda: _ServerTokens(lambda stopped: read(text, opts, stopped)), prompt=prompt,
                             mode=mode, options=opts, model=self.name)

    def complete(self, prefix: str, options: CompletionOptions | None = None,
                 **overrides: object) -> ResultStream:
        """Continue ``prefix`` left to right (an infill with an empty suffix)."""
        return self.infill(prefix, "", options, **overrides)

    # -- prompts (tgi, openai) ------------------------------------------------------------------

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

    # -- reading servers' streams --------------------------------------------------------------

    def _tgi_events(self, text: str, opts: CompletionOptions, stopped: set[int]
                    ) -> Generator[TokenEvent, None, None]:
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
                    # A special token's text (TGI spells out <|endoftext|>) is never user text.
                    yield row, "" if token.get("special") else str(token.get("text", "")), finish
                    if finish is not None or row in stopped:
                        break
            finally:
                events.close()

    def _openai_events(self, text: str, opts: CompletionOptions, stopped: set[int]
                       ) -> Generator[TokenEvent, None, None]:
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

    def _santa_body(self, prefix: str, suffix: str, mode: str, opts: CompletionOptions) -> dict[str, Any]:
        body: dict[str, Any] = {
            "prefix": prefix, "suffix": suffix, "mode": mode, "fim_mode": opts.fim_mode,
            "max_tokens": opts.max_tokens, "temperature": opts.temperature, "top_p": opts.top_p,
            "top_k": opts.top_k, "seed": opts.seed, "n": opts.n, "stop": list(opts.stop), "stream": True,
            "speculate": opts.speculate, "time_budget_ms": opts.time_budget_ms,
            "context": [{"path": c.path, "text": c.text} for c in opts.context], "context_tokens": opts.context_tokens,
        }
        if opts.metadata_filename:
            body["path"] = opts.metadata_filename
        return body


def _result_from_dict(d: dict[str, Any], opts: CompletionOptions, elapsed: float) -> CompletionResult:
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
            context=tuple(fim.UsedSnippet(str(c["path"]), int(c["start_line"]), int(c["end_line"]), int(c["tokens"]))
                          for c in d.get("context") or ()),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise RemoteError(f"the server's answer is not a santa result (missing or bad {exc})") from None
