"""The model side of ``santa serve``: one worker thread that owns the engine, a bounded job
queue in front of it, and the units of work it runs (infill and raw prompts).

No HTTP here: :mod:`santacli.server` turns requests into jobs and events into responses. A job
streams events (``start``, ``step``, ``text``, ``done``, ``error``) to an asyncio queue; a client
that goes away sets the job's ``cancelled`` flag and generation stops at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from santacli.engine import CompletionOptions, CompletionStream, Engine
from santacli.errors import ContextLengthError, SantaError, UsageError
from santacli.fim import partial_match_length
from santacli.generate import SamplingParams

log = logging.getLogger("santacli.server")


class ApiError(Exception):
    """An error answered as JSON with an HTTP status (never a traceback)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def from_exception(exc: BaseException) -> ApiError:
    """Map an engine exception to an HTTP error; SantaError messages are already user-facing."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (UsageError, ContextLengthError)):
        return ApiError(422, str(exc))
    if isinstance(exc, SantaError):
        return ApiError(500, str(exc), "server_error")
    return ApiError(500, f"internal error ({type(exc).__name__}); see the server log", "server_error")


# ---------------------------------------------------------------------------------------------
# The model worker


Event = tuple[str, Any]  # ("start" | "step" | "text" | "done" | "error", payload)
Work = Callable[["Job"], Generator[Event, None, None]]
Usage = dict[str, int]


class Job:
    """One request's work on the model thread and its channel back to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, work: Work) -> None:
        self.loop = loop
        self.work = work
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.stream: CompletionStream | None = None  # set while engine.infill runs
        self.finished = False

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def cancel(self) -> None:
        """Stop at the next token (called when the client goes away)."""
        self.cancelled.set()
        stream = self.stream
        if stream is not None:
            stream.cancel()

    async def next(self) -> Event:
        event = await self.events.get()
        if event[0] in ("done", "error"):
            self.finished = True
        return event


class Worker:
    """One thread runs every request on the model, in arrival order.

    ``max_queue`` requests may wait while one runs; more are refused (503) rather than piling
    up behind a slow model.
    """

    def __init__(self, max_queue: int) -> None:
        if max_queue < 0:
            raise UsageError(f"max queue must be >= 0, got {max_queue}")
        self.capacity = max_queue + 1
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._admitted = 0
        self._thread: threading.Thread | None = None

    @property
    def load(self) -> int:
        return self._admitted

    def submit(self, job: Job) -> bool:
        with self._lock:
            if self._admitted >= self.capacity:
                return False
            self._admitted += 1
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="santa-model", daemon=True)
                self._thread.start()
        self._jobs.put(job)
        return True

    def stop(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            final: Event = ("error", ApiError(499, "client closed the request"))
            try:
                if not job.cancelled.is_set():
                    final = self._drive(job)
            except Exception as exc:  # reported to the client; never kill the worker
                if not isinstance(exc, SantaError):
                    log.exception("request failed")
                final = ("error", exc)
            finally:
                # Free the slot before the last event goes out, so a client that sends its next
                # request as soon as it has the answer is never refused.
                with self._lock:
                    self._admitted -= 1
                job.emit(final)

    @staticmethod
    def _drive(job: Job) -> Event:
        """Run the job's generator, forwarding its events as they come except the final "done"
        (which ``_run`` sends). Work generators watch ``job.cancelled`` themselves."""
        final: Event = ("error", ApiError(500, "the request ended without a result", "server_error"))
        gen = job.work(job)
        try:
            for event in gen:
                if event[0] == "done":
                    final = event
                else:
                    job.emit(event)
        finally:
            gen.close()
        return final


# ---------------------------------------------------------------------------------------------
# Work on the model thread: FIM through engine.infill, raw prompts through a token stream


def infill_work(engine: Engine, prefix: str, suffix: str, opts: CompletionOptions
                 ) -> Work:
    def work(job: Job) -> Generator[Event, None, None]:
        stream = engine.infill(prefix, suffix, opts)  # validation errors surface before "start"
        job.stream = stream
        if job.cancelled.is_set():
            stream.cancel()
        yield ("start", None)
        for piece in stream:
            yield ("text", piece)
        yield ("done", stream.result)

    return work


class StopText:
    """Stop strings over streamed text. ``include``: TGI keeps the text up to the token that
    completed a stop string; otherwise (OpenAI) the stop string and what follows are dropped,
    and text that might begin a stop string is held back until it is known not to."""

    def __init__(self, stops: list[str], *, include: bool) -> None:
        self.stops = [s for s in stops if s]
        self.include = include
        self.raw = ""
        self.released = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        start = max(0, len(self.raw) - max((len(s) for s in self.stops), default=0))
        self.raw += piece
        hits = [at for at in (self.raw.find(s, start) for s in self.stops) if at >= 0]
        if hits:
            self.stopped = True
            if not self.include:
                self.raw = self.raw[: min(hits)]
            return self._release(len(self.raw))
        if self.include:
            return self._release(len(self.raw))
        return self._release(len(self.raw) - partial_match_length(self.raw, self.stops))

    def finish(self) -> str:
        return self._release(len(self.raw))

    def _release(self, upto: int) -> str:
        if upto <= self.released:
            return ""
        out, self.released = self.raw[self.released:upto], upto
        return out


@dataclass
class RawRow:
    text: str = ""
    tokens: list[tuple[int, str, bool]] = field(default_factory=list)  # (id, text, special)
    finish: str | None = None  # eos_token | stop_sequence | length | cancelled


@dataclass
class RawResult:
    rows: list[RawRow]
    prompt_tokens: int
    reused_prompt_tokens: int
    tails: list[str]  # text released only at the end (held back or flushed)


def raw_work(engine: Engine, text: str, *, max_new_tokens: int, sampling: SamplingParams, n: int,
              stops: list[str], include_stop: bool, truncate: int | None = None
              ) -> Work:
    """Generate after a raw prompt. Events: start, then per step ``[(row, id, released text,
    special)]``, then done with a :class:`RawResult`. Sentinel tokens end a row and add no text."""

    def work(job: Job) -> Generator[Event, None, None]:
        tok = engine.tokenizer
        ids = tok.encode_raw(text)
        if truncate is not None and len(ids) > truncate:
            ids = ids[-truncate:]
        if not ids:
            raise UsageError("the prompt is empty")
        stream = engine.stream_ids(ids, max_new_tokens=max_new_tokens, sampling=sampling, n=n,
                                   use_prompt_cache=True)
        rows = [RawRow() for _ in range(n)]
        decoders = [tok.stream() for _ in range(n)]
        stoppers = [StopText(stops, include=include_stop) for _ in range(n)]
        tails = [""] * n
        yield ("start", len(ids))
        try:
            for step in stream:
                out: list[tuple[int, int, str, bool]] = []
                for i, token in enumerate(step):
                    row = rows[i]
                    if token is None or row.finish:
                        continue
                    special = token in tok.sentinel_ids
                    raw = decoders[i].flush() if special else decoders[i].push(token)
                    released = stoppers[i].feed(raw)
                    row.text += released
                    row.tokens.append((token, raw, special))  # never sentinel text: specials are not decoded
                    if special:
                        row.finish = "eos_token"
                    elif stoppers[i].stopped:
                        row.finish = "stop_sequence"
                        stream.stop_row(i)
                    out.append((i, token, released, special))
                yield ("step", out)
                if job.cancelled.is_set():
                    for row in rows:
                        row.finish = row.finish or "cancelled"
                    break
        finally:
            engine.keep_prompt(stream)
        for i, row in enumerate(rows):
            if row.finish is None:
                row.finish = "length"
                tails[i] = stoppers[i].feed(decoders[i].flush())
            tails[i] += stoppers[i].finish()
            row.text += tails[i]
        yield ("done", RawResult(rows, len(ids), stream.reused, tails))

    return work
