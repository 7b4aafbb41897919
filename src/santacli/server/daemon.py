"""The per-user daemon's server side: santa's usual app on a Unix socket in the user's private
runtime folder (see :mod:`santacli.daemon`), that loads the model a request names and exits
after a spell without requests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time

import uvicorn

from santacli.daemon import ModelSpec, socket_path, status
from santacli.errors import UsageError
from santacli.server.app import create_app
from santacli.server.state import Loader, ServerState
from santacli.server.transport import uvicorn_config

log = logging.getLogger("santacli.server")


def _bind(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` that only this user can connect to."""
    if os.path.exists(path):
        if status(timeout=1.0) is not None:
            raise UsageError(f"a santa daemon already answers at {path}")
        os.unlink(path)  # left by a daemon that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # the socket file is 0600 from the start
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    return sock


async def _exit_when_idle(server: uvicorn.Server, state: ServerState, idle_s: float) -> None:
    while not server.should_exit:
        await asyncio.sleep(min(5.0, idle_s / 4))
        if state.worker.load == 0 and time.monotonic() - state.last_used > idle_s:
            log.info("idle for %.0f s: exiting", idle_s)
            server.should_exit = True


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(0)


def serve_daemon(load: Loader, spec: ModelSpec, *, idle_minutes: float, log_level: str = "info") -> None:
    """Load ``spec`` and serve on the user's daemon socket until stopped or idle (blocking).

    Raises:
        UsageError: a daemon already answers, or the runtime folder is not private.
    """
    if not idle_minutes > 0:
        raise UsageError(f"idle minutes must be > 0, got {idle_minutes}")
    path = str(socket_path())
    sock = _bind(path)
    try:
        app = create_app(load(spec))
        state: ServerState = app.state.santa
        state.loader, state.spec = load, spec
        server = uvicorn.Server(uvicorn_config(app, log_level=log_level, access_log=False))
        # uvicorn re-raises the SIGTERM it handled once it has shut down; exit through the
        # finally below then, so the socket file goes too.
        signal.signal(signal.SIGTERM, _exit)

        async def main() -> None:
            watcher = asyncio.create_task(_exit_when_idle(server, state, idle_minutes * 60))
            try:
                await server.serve(sockets=[sock])
            finally:
                watcher.cancel()

        asyncio.run(main())
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
