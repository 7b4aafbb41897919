"""The model side of ``santa lsp``: one thread owns the engine (loads it, then runs every
completion on it in arrival order), so the event loop never waits on the model and the engine's
warm prompt cache sees one request after another.

Latency rules, all decided here:

- A newer request for the same document supersedes the older one, and so does an edit to that
  document: the older request answers at once with nothing, and its stream is cancelled (the
  model stops at its next token; one that has not started never touches the model).
- A request the client cancels (``$/cancelRequest``: its handler task is cancelled) cancels its
  stream the same way.
- Each request has a time budget counted from its arrival. When it runs out, the stream is
  cancelled and the request answers with the text generated so far (after santa's usual
  clean-up; possibly nothing). A request still queued at its deadline never starts. If the model
  is inside one long step (a prefill) and does not reach its next token within a short grace
  period, the answer is the text released so far without waiting for the step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from santacli.completion import CompletionEngine, CompletionResult, ResultStream
from santacli.errors import SantaError

GRACE = 0.25  # seconds past the budget to wait for the model's next token

# Why a request ended: it ran to its end, its budget ran out, a newer request (or an edit)
# replaced it, or the client cancelled it.
STATUSES = ("done", "budget", "superseded", "cancelled")

OpenStream = Callable[[CompletionEngine], ResultStream]


@dataclass(frozen=True)
class Outcome:
    """What a request answers with."""

    texts: list[str]  # distinct non-empty candidates, best first; empty when superseded/cancelled
    status: str  # one of STATUSES
    result: CompletionResult | None = None  # None when the model never ran it (or was not waited for)


@dataclass(frozen=True)
class Loaded:
    """The outcome of a load: the engine, or the error that stopped it."""

    engine: CompletionEngine | None
    error: BaseException | None
    seconds: float


class Ticket:
    """One completion request, shared by the event loop (which waits for ``future``) and the
    model thread (which runs it)."""

    def __init__(self, key: str, open_stream: OpenStream, deadline: float,
                 future: asyncio.Future[Outcome]) -> None:
        self.key, self.open_stream, self.deadline, self.future = key, open_stream, deadline, future
        self.partial = ""  # the first candidate's text released so far (model thread writes)
        self._lock = threading.Lock()
        self._reason: str | None = None  # why it was cancelled, if it was
        self._stream: ResultStream | None = None

    @property
    def reason(self) -> str | None:
        return self._reason

    def cancel(self, reason: str) -> None:
        """Stop at the next token, from any thread; the first reason given is kept."""
        with self._lock:
            if self._reason is None:
                self._reason = reason
            stream = self._stream
        if stream is not None:
            stream.cancel()

    def attach(self, stream: ResultStream) -> None:
        """The stream now running this request (model thread); cancelled at once if the
        request already was."""
        with self._lock:
            self._stream = stream
            cancelled = self._reason is not None
        if cancelled:
            stream.cancel()


@dataclass
class _Load:
    loader: Callable[[], CompletionEngine]
    done: Callable[[Loaded], None]  # called on the event loop
    loop: asyncio.AbstractEventLoop


class ModelWorker:
    """The model thread and its queue. ``load``/``complete``/``supersede``/``close`` are called
    from the event loop; the engine is only ever touched on the model thread."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Ticket | _Load | None] = queue.SimpleQueue()
        self._latest: dict[str, Ticket] = {}  # the live request per document (event loop only)
        self._engine: CompletionEngine | None = None  # model thread only
        self._load_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def start(self) -> None:
        if self._thread is None:
            # A daemon: exiting the server must not wait for a model step to finish.
            self._thread = threading.Thread(target=self._run, name="santa-model", daemon=True)
            self._thread.start()

    def load(self, loader: Callable[[], CompletionEngine], done: Callable[[Loaded], None]) -> None:
        """Load an engine on the model thread (requests queued later wait for it); ``done`` is
        called on the event loop. A failed reload keeps the previous engine."""
        self.start()
        self._jobs.put(_Load(loader, done, asyncio.get_running_loop()))

    async def complete(self, key: str, open_stream: OpenStream, budget: float) -> Outcome:
        """Run ``open_stream(engine)`` on the model thread within ``budget`` seconds, superseding
        the live request for ``key``.

        Raises:
            SantaError: the request failed (invalid options, context, server errors), or no
                model is loaded (with the load's error when it failed).
            asyncio.CancelledError: the client cancelled it (its stream is cancelled too).
        """
        if self._closed:
            raise SantaError("the server is shutting down")
        self.start()
        loop = asyncio.get_running_loop()
        ticket = Ticket(key, open_stream, time.monotonic() + budget, loop.create_future())
        # An error that arrives after the request stopped waiting is nobody's: mark it retrieved.
        ticket.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.supersede(key)
        self._latest[key] = ticket
        self._jobs.put(ticket)
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(ticket.future), budget)
            except asyncio.TimeoutError:
                ticket.cancel("budget")
            try:  # the model stops at its next token; its result has the cleaned-up text
                return await asyncio.wait_for(asyncio.shield(ticket.future), GRACE)
            except asyncio.TimeoutError:
                return Outcome([ticket.partial] if ticket.partial else [], "budget")
        except asyncio.CancelledError:
            ticket.cancel("cancelled")
            raise
        finally:
            if self._latest.get(key) is ticket:
                del self._latest[key]

    def supersede(self, key: str) -> None:
        """Cancel the live request for ``key`` (a newer one came, or the document changed). It
        answers at once, with nothing: no need to wait for the model's next token."""
        old = self._latest.pop(key, None)
        if old is not None:
            old.cancel("superseded")
            if not old.future.done():
                old.future.set_result(Outcome([], "superseded"))

    def close(self) -> None:
        """Cancel everything and stop the thread after its current step (shutdown)."""
        self._closed = True
        for key in list(self._latest):
            self.supersede(key)
        self._jobs.put(None)

    # -- model thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if isinstance(job, _Load):
                self._load(job)
            else:
                self._serve(job)

    def _load(self, job: _Load) -> None:
        started = time.monotonic()
        try:
            engine = job.loader()
        except Exception as exc:  # reported to the client; the thread lives on
            if self._engine is None:
                self._load_error = exc
            report = Loaded(None, exc, time.monotonic() - started)
        else:
            self._engine, self._load_error = engine, None
            report = Loaded(engine, None, time.monotonic() - started)
        _call_soon(job.loop, job.done, report)

    def _serve(self, ticket: Ticket) -> None:
        if ticket.reason is not None:
            return _settle(ticket, Outcome([], ticket.reason))
        if time.monotonic() >= ticket.deadline:  # waited its whole budget in the queue
            return _settle(ticket, Outcome([], "budget"))
        engine = self._engine
        if engine is None:
            error = self._load_error
            message = f"the model could not be loaded: {error}" if error else "the model is not loaded yet"
            return _settle(ticket, SantaError(message))
        try:
            stream = ticket.open_stream(engine)
            ticket.attach(stream)
            for piece in stream.pieces():
                if piece.row == 0:
                    ticket.partial += piece.text
            result = stream.result
        except Exception as exc:  # SantaError: the request's own; anything else: a bug, reported
            return _settle(ticket, exc)
        reason = ticket.reason
        texts = [] if reason in ("superseded", "cancelled") else list(dict.fromkeys(c for c in result.candidates if c))
        return _settle(ticket, Outcome(texts, reason or "done", result))


def _settle(ticket: Ticket, value: Outcome | BaseException) -> None:
    """Resolve the ticket's future on its event loop (from the model thread)."""

    def settle() -> None:
        if ticket.future.done():
            return
        if isinstance(value, BaseException):
            ticket.future.set_exception(value)
        else:
            ticket.future.set_result(value)

    _call_soon(ticket.future.get_loop(), settle)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: object) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the event loop is closed: the server is exiting, nobody is waiting
        pass
