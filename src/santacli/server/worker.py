"""The model side of ``santa serve``: one worker thread that owns the engine, a bounded queue in
front of it, and the :class:`Job` that carries one request's completion back to the event loop.

No HTTP here: the routes turn requests into jobs and a job's pieces into responses. A job runs
a completion stream on the model thread and sends its pieces to an asyncio queue; when its
client goes away (``until_gone`` returns) it cancels the stream, which stops at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any

from santacli.completion import CompletionResult, Piece, ResultStream
from santacli.errors import SantaError, UsageError

log = logging.getLogger("santacli.server")


class ClientGone(Exception):
    """The client went away before its request ran."""


class Job:
    """One request's completion on the model thread, read on the event loop as an async
    iterator of :class:`~santacli.completion.Piece` s; :meth:`result` is the final result.

    Args:
        open_stream: makes the completion stream; called on the model thread, so validation
            errors (and tokenization) happen there and surface from :meth:`started`.
        until_gone: an awaitable that returns when the client disconnects; the job then
            cancels itself. It is watched from :meth:`started` until :meth:`close`.
        around: a context the whole run happens in, on the model thread (the client's scope
            of the warm prompt cache).
    """

    def __init__(self, open_stream: Callable[[], ResultStream],
                 until_gone: Callable[[], Awaitable[object]] | None = None,
                 around: Callable[[], AbstractContextManager[object]] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.open_stream = open_stream
        self._until_gone = until_gone
        self._around = around
        self._watcher: asyncio.Task[None] | None = None
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.client_gone = False  # the client disconnected: nothing more is sent to it
        self._stream: ResultStream | None = None
        self._result: CompletionResult | None = None
        self.finished = False

    # -- model thread -------------------------------------------------------------------------

    def run(self) -> CompletionResult:
        """Run the completion, sending ``start`` and each piece; return its result (the worker
        sends that, or the error, once the request's queue slot is free)."""
        if self.cancelled.is_set():
            raise ClientGone
        with self._around() if self._around is not None else contextlib.nullcontext():
            stream = self.open_stream()  # validation errors surface before "start"
            self._stream = stream
            if self.cancelled.is_set():
                stream.cancel()
            self.emit(("start", None))
            for piece in stream.pieces():
                self.emit(("piece", piece))
            return stream.result

    def emit(self, event: tuple[str, Any]) -> None:
        try:
            self.loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def cancel(self) -> None:
        """Stop at the next token (from any thread)."""
        self.cancelled.set()
        stream = self._stream
        if stream is not None:
            stream.cancel()

    # -- event loop ---------------------------------------------------------------------------

    async def started(self) -> None:
        """Wait until the completion has started; raise its error if it could not."""
        if self._until_gone is not None and self._watcher is None:
            self._watcher = asyncio.create_task(self._watch())
        try:
            await self._take()  # "start"
        except BaseException:
            self.close()
            raise

    async def _watch(self) -> None:
        assert self._until_gone is not None
        await self._until_gone()
        self.client_gone = True
        self.cancel()

    async def _take(self) -> tuple[str, Any]:
        """The next event from the model thread; its error raised, a final one noted."""
        kind, payload = await self._events.get()
        self.finished = kind in ("done", "error")
        if kind == "error":
            raise payload
        return kind, payload

    async def _next(self) -> Piece | None:
        """The next piece, or None at the end (the result is then set); raises the job's error."""
        if self.finished:
            return None
        kind, payload = await self._take()
        if kind == "done":
            self._result = payload
            return None
        piece: Piece = payload
        return piece

    def __aiter__(self) -> AsyncIterator[Piece]:
        return self

    async def __anext__(self) -> Piece:
        piece = await self._next()
        if piece is None:
            raise StopAsyncIteration
        return piece

    async def result(self) -> CompletionResult:
        """Read to the end; the completion's result."""
        async for _ in self:
            pass
        assert self._result is not None
        return self._result

    def close(self) -> None:
        """Stop watching the client; cancel the completion unless it has finished."""
        if self._watcher is not None:
            self._watcher.cancel()
        if not self.finished:
            self.cancel()


class Worker:
    """One thread runs every request on the model, in arrival order.

    ``max_queue`` requests may wait while one runs; more are refused rather than piling up
    behind a slow model.
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
        """Queue ``job``; False when the queue is full."""
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
            final: tuple[str, Any] = ("error", SantaError("the request ended without a result"))
            try:
                final = ("done", job.run())
            except Exception as exc:  # reported to the client; never kill the worker
                if not isinstance(exc, (SantaError, ClientGone)):
                    log.exception("request failed")
                final = ("error", exc)
            finally:
                # Free the slot before the last event goes out, so a client that sends its next
                # request as soon as it has the answer is never refused.
                with self._lock:
                    self._admitted -= 1
                job.emit(final)
