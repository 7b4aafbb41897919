"""Who a request comes from, for the warm prompt cache: requests reuse only the cached prompts of
their own identity, so a client learns nothing of another client's text from ``prompt_reused``
or from how fast its answer comes.

An identity is the connecting user (on Linux, the owner of the client's loopback socket, read
from ``/proc/net/tcp``: two local users never share; elsewhere the client's address), the API
key it presented, and an optional ``X-Santa-Session`` header by which one user's clients can
keep apart from each other.
"""

from __future__ import annotations

import hashlib
import ipaddress
from pathlib import Path

from starlette.requests import Request

SESSION_HEADER = "x-santa-session"


def _proc_address(host: str, port: int) -> str | None:
    """An address as /proc/net/tcp{,6} writes it (little-endian hex words), or None."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    packed = ip.packed
    words = [packed[i:i + 4][::-1].hex().upper() for i in range(0, len(packed), 4)]
    return f"{''.join(words)}:{port:04X}"


def socket_owner(client: tuple[str, int], server: tuple[str, int]) -> int | None:
    """The user id owning the client end of a local TCP connection (Linux), or None."""
    local, remote = _proc_address(*client), _proc_address(*server)
    if local is None or remote is None:
        return None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 7 and fields[1] == local and fields[2] == remote:
                return int(fields[7])
    return None


def identity(request: Request) -> str:
    """A short stable name for whoever sent ``request`` (see the module docstring)."""
    client, server = request.client, request.scope.get("server")
    who = "unknown"
    if client is not None:
        uid = socket_owner((client.host, client.port), (server[0], server[1])) \
            if server and _is_loopback(client.host) else None
        who = f"uid {uid}" if uid is not None else f"host {client.host}"
    key = request.headers.get("authorization", "")
    session = request.headers.get(SESSION_HEADER, "")
    return hashlib.sha256(f"{who}\0{key}\0{session}".encode()).hexdigest()[:16]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
