"""The per-user daemon: a ``santa serve`` on a Unix socket that only this user can reach, so
that repeated ``santa complete``/``santa infill`` (and the editor plugins' CLI fallback) skip
importing torch and loading the model.

This module is the daemon's client side and bookkeeping, torch-free: where its socket lives
(``$SANTA_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/santa``, else ``/tmp/santa-UID``; a folder of
mode 0700 owned by the user, the socket 0600), whether one answers, starting one in the
background and stopping it. The server side is ``santacli.server.app.serve_daemon``.

A request names the model it wants (:class:`ModelSpec`); a daemon holding another model loads
the requested one first, so a client never gets another model's completion.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from santacli.errors import SantaError, UsageError

SOCKET_NAME = "daemon.sock"
LOG_NAME = "daemon.log"
START_TIMEOUT = 300.0  # a first load of a large model can take minutes


@dataclass(frozen=True)
class ModelSpec:
    """The model a request wants and how to run it (what ``Engine.load`` takes)."""

    model: str
    device: str | None = None
    dtype: str | None = None
    attention: str = "auto"
    quantize: str | None = None
    decode: str = "auto"

    def to_dict(self) -> dict[str, str | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: object) -> ModelSpec:
        """Raises UsageError for anything but an object of known string fields."""
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            raise UsageError("'model' must be an object with a 'model' name")
        known = {f for f in cls.__dataclass_fields__}
        if set(data) - known or not all(v is None or isinstance(v, str) for v in data.values()):
            raise UsageError(f"'model' may hold only string fields {sorted(known)}")
        return cls(**data)


def runtime_dir() -> Path:
    """The user's private folder for the daemon (created 0700; refused if anyone else can use it).

    Raises:
        UsageError: the folder belongs to another user or others may write it.
    """
    env = os.environ.get("SANTA_RUNTIME_DIR")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    folder = Path(env) if env else Path(xdg) / "santa" if xdg else Path(f"/tmp/santa-{os.geteuid()}")
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise UsageError(f"{folder} must be a folder of yours that only you can use (mode 0700); "
                         "fix it or set SANTA_RUNTIME_DIR")
    return folder


def socket_path() -> Path:
    return runtime_dir() / SOCKET_NAME


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (the daemon's only transport)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _get(path: Path, route: str, timeout: float) -> dict[str, object] | None:
    """GET ``route`` from the daemon; None when nothing answers there."""
    conn = UnixHTTPConnection(str(path), timeout)
    try:
        conn.request("GET", route)
        response = conn.getresponse()
        body = json.loads(response.read() or b"{}")
        return body if response.status == 200 and isinstance(body, dict) else None
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def status(timeout: float = 2.0) -> dict[str, object] | None:
    """The running daemon's health (model, pid, idle timeout...), or None if none answers."""
    path = socket_path()
    if not path.exists():
        return None
    return _get(path, "/health", timeout)


def start(spec: ModelSpec, *, idle_minutes: float, wait: float = START_TIMEOUT) -> dict[str, object]:
    """Start a daemon holding ``spec`` in the background (unless one answers) and wait for it.

    Raises:
        SantaError: it did not come up (its log says why).
    """
    running = status()
    if running is not None:
        return running
    folder = runtime_dir()
    log = folder / LOG_NAME
    argv = [sys.executable, "-m", "santacli", "daemon", "run", "--model", spec.model,
            "--idle-minutes", str(idle_minutes), "--attention", spec.attention, "--decode", spec.decode]
    for flag, value in (("--device", spec.device), ("--dtype", spec.dtype), ("--quantize", spec.quantize)):
        if value:
            argv += [flag, value]
    with open(log, "ab") as out:
        os.chmod(log, 0o600)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                env={**os.environ, "SANTA_NO_HINT": "1"})
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        health = status(timeout=1.0)
        if health is not None:
            return health
        if proc.poll() is not None:
            raise SantaError(f"the santa daemon exited at start ({_last_line(log)}); see {log}")
        time.sleep(0.05)
    raise SantaError(f"the santa daemon did not answer within {wait:g} s; see {log}")


def stop(timeout: float = 10.0) -> int | None:
    """Stop the running daemon; its pid, or None if none was running."""
    health = status()
    if health is None:
        return None
    pid = health.get("pid")
    if not isinstance(pid, int):
        raise SantaError("the daemon did not say its process id; stop it by hand")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and status(timeout=0.5) is not None:
        time.sleep(0.05)
    return pid


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    return lines[-1][:200] if lines else "no output"
