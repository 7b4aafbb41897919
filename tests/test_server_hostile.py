"""santa serve against hostile clients: any body, any header, any pace gets a 4xx (or a 2xx) in
the API's own error shape, never a 500 or a dropped connection; web pages cannot drive it;
slow or piled-up connections are bounded."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from santacli.engine import Engine  # noqa: E402
from santacli.server.app import create_app  # noqa: E402
from test_server import running  # noqa: E402

TGI = ("/", "/generate", "/generate_stream")
PATHS = ("/infill", "/v1/completions", *TGI)
FIELDS = ["prefix", "suffix", "prompt", "inputs", "parameters", "max_tokens", "max_new_tokens", "n", "stream",
          "temperature", "top_p", "top_k", "seed", "stop", "mode", "fim_mode", "path", "truncate", "details",
          "stream_options", "echo", "logprobs", "do_sample", "return_full_text"]


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    app = create_app(engine, max_tokens_limit=3, max_body_bytes=20_000, body_timeout=0.5,
                     cors_origins=["http://editor.example"])
    with running(app, header_timeout=0.5, max_connections=8) as base:
        yield base


def check_shape(response: httpx.Response, path: str) -> None:
    """A response that a client of this API can parse: 2xx, or 4xx in the API's error shape."""
    assert response.status_code < 500, (response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        if path in TGI:
            assert isinstance(body["error"], str) and isinstance(body["error_type"], str)
        else:
            assert isinstance(body["error"]["message"], str) and body["error"]["code"] == response.status_code


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=8),
                                                               inner, max_size=5),
    max_leaves=12,
)
bodies = (
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6).map(lambda v: json.dumps(v).encode())
    | st.sampled_from([b'{"prefix": "\\ud800x"}', b'{"inputs": "\\udfff"}', b"[" * 5000, b'{"a":' * 3000,
                       b'{"prefix": "' + b"\xff\xfe" + b'"}', b"{}", b"", b"null"])
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(PATHS), body=bodies,
       content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", None]),
       extra=st.dictionaries(st.sampled_from(["Authorization", "X-Santa-Session", "Accept", "Content-Encoding"]),
                             st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=20)
                             .map(str.strip),
                             max_size=2))
def test_any_request_gets_an_answer_in_shape(url: str, path: str, body: bytes, content_type: str | None,
                                             extra: dict[str, str]) -> None:
    headers = dict(extra)
    if content_type:
        headers["Content-Type"] = content_type
    with httpx.Client(timeout=30) as client:
        response = client.post(url + path, content=body, headers=headers)
        response.read()
    check_shape(response, path)


def test_invalid_unicode_and_deep_nesting_are_400(url: str) -> None:
    for path in PATHS:
        for body in (b'{"prefix": "\\ud800", "prompt": "\\ud800", "inputs": "\\ud800"}', b"[" * 15_000):
            response = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"})
            assert response.status_code == 400, (path, body[:20], response.text)
            check_shape(response, path)


def test_web_pages_cannot_drive_the_server(url: str) -> None:
    body = {"prefix": "def f(", "max_tokens": 2}
    # A form or fetch() with text/plain needs no preflight: refused for its content type.
    plain = httpx.post(f"{url}/infill", content=json.dumps(body), headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415
    # DNS rebinding: the page's own name arrives in Host.
    rebound = httpx.post(f"{url}/infill", json=body, headers={"Host": "attacker.example"})
    assert rebound.status_code == 400 and "host" in rebound.json()["error"]["message"]
    assert httpx.post(f"{url}/generate", json={"inputs": "x"}, headers={"Host": "evil:80"}).json()["error_type"]
    # A foreign origin: no preflight passes, and requests that carry it are refused.
    preflight = httpx.options(f"{url}/infill", headers={"Origin": "http://evil.example",
                                                        "Access-Control-Request-Method": "POST"})
    assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    assert httpx.post(f"{url}/infill", json=body, headers={"Origin": "http://evil.example"}).status_code == 403
    # An origin the operator allowed (--cors-origin) gets CORS headers.
    ok = httpx.options(f"{url}/infill", headers={"Origin": "http://editor.example",
                                                 "Access-Control-Request-Method": "POST"})
    assert ok.status_code == 204 and ok.headers["access-control-allow-origin"] == "http://editor.example"
    allowed = httpx.post(f"{url}/infill", json=body, headers={"Origin": "http://editor.example"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://editor.example"
    # Loopback names are fine.
    port = url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
        assert httpx.post(f"{url}/infill", json=body, headers={"Host": host}).status_code == 200


def raw_connection(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_slow_headers_body_and_silence_are_cut_off(url: str) -> None:
    started = time.monotonic()
    with raw_connection(url) as silent:  # connects and sends nothing
        assert read_all(silent).startswith(b"HTTP/1.1 408")
    with raw_connection(url) as dripping:  # never finishes its headers
        dripping.sendall(b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(0.2)
        dripping.sendall(b"X-Slow: 1\r\n")
        assert read_all(dripping).startswith(b"HTTP/1.1 408")
    with raw_connection(url) as short:  # promises a body it never sends
        short.sendall(b"POST /infill HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"prefix\":")
        answer = read_all(short)
        assert answer.startswith(b"HTTP/1.1 408") and b"took longer" in answer
    assert time.monotonic() - started < 8
    assert httpx.get(f"{url}/health").status_code == 200


def test_connection_limit_answers_503_with_retry_after(url: str) -> None:
    held = [raw_connection(url) for _ in range(8)]
    try:
        time.sleep(0.1)
        with raw_connection(url) as extra:
            answer = read_all(extra)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    assert httpx.get(f"{url}/health").status_code == 200


def test_the_prompt_cache_tells_no_client_about_another(url: str) -> None:
    """Reuse counts (and so timing) come only from a client's own earlier prompts."""
    secret = {"prefix": "API_TOKEN = 'hunter2-very-secret'\ndef connect():\n    ", "suffix": "\n", "max_tokens": 1}
    alice, mallory = {"X-Santa-Session": "alice"}, {"X-Santa-Session": "mallory"}
    assert httpx.post(f"{url}/infill", json=secret, headers=alice).status_code == 200
    # Mallory guesses the start of Alice's file: nothing of hers is reused for him.
    guess = httpx.post(f"{url}/infill", json=secret, headers=mallory).json()
    assert guess["tokens"]["prompt_reused"] == 0
    # Alice's own next request still finds her warm prompt.
    again = httpx.post(f"{url}/infill", json=secret, headers=alice).json()
    assert again["tokens"]["prompt_reused"] > 0


def test_a_loopback_client_is_known_by_its_user() -> None:
    from santacli.server.identity import socket_owner

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            accepted, _ = server.accept()
            with accepted:
                owner = socket_owner(client.getsockname(), server.getsockname())
    if not Path("/proc/net/tcp").exists():
        pytest.skip("no /proc/net/tcp on this system")
    assert owner == os.getuid()
