"""santa serve: the real server (uvicorn on a free loopback port) driven by real clients.

OpenAI's client, huggingface_hub's InferenceClient (the TGI protocol) and plain httpx, each
checked against a direct ``engine.infill`` / ``engine.generate`` on the same tiny checkpoint.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from santacli.completion import CompletionRun, Piece  # noqa: E402
from santacli.engine import Engine  # noqa: E402
from santacli.errors import UsageError  # noqa: E402
from santacli.server.app import create_app, serve  # noqa: E402
from santacli.server.guard import is_loopback as _is_loopback  # noqa: E402
from santacli.server.transport import uvicorn_config  # noqa: E402
from santacli.stoprules import CompletionFilter  # noqa: E402

PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nfor i in range(10):\n    print(i)\n"
KEY = "test-key"


@contextmanager
def running(app: Any, **limits: Any) -> Iterator[str]:
    """Serve ``app`` as santa serve does (``limits``: header_timeout, max_connections) in a
    thread on a free 127.0.0.1 port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=2, **limits)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def base_url(engine: Engine) -> Iterator[str]:
    with running(create_app(engine, api_key=KEY, max_tokens_limit=64, model_name="tiny")) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
        yield client


@pytest.fixture(autouse=True)
def cold(engine: Engine, reference: Engine) -> None:
    # Equal outputs are compared from cold prompts on both sides: a warm prefix changes the
    # shapes of the matmuls, and with them the last bits of the logits.
    engine.prompt_cache.clear()
    reference.prompt_cache.clear()


def spelled_fim(engine: Engine, prefix: str, suffix: str) -> str:
    fim = engine.tokenizer.fim
    assert fim is not None
    names = {engine.tokenizer.token_to_id(t): t for t in ("<fim-prefix>", "<fim-suffix>", "<fim-middle>")}
    return f"{names[fim.prefix]}{prefix}{names[fim.suffix]}{suffix}{names[fim.middle]}"


def raw_greedy(engine: Engine, prompt: str, max_new_tokens: int) -> tuple[str, str]:
    """The oracle for raw prompts: greedy ids decoded without specials, and TGI's finish reason."""
    ids = engine.generate(engine.tokenizer.encode_raw(prompt), max_new_tokens=max_new_tokens)
    ended = bool(ids) and ids[-1] in engine.tokenizer.sentinel_ids
    return engine.tokenizer.decode(ids), "eos_token" if ended else "length"


# ---------------------------------------------------------------------------------------------
# OpenAI


def test_openai_fim_matches_engine(base_url: str, reference: Engine) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)
    want = reference.infill(PREFIX, SUFFIX, max_tokens=24, mode="full").result
    got = client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=24, temperature=0)
    assert got.choices[0].text == want.text
    assert got.choices[0].finish_reason == ("stop" if want.stop_reason == "eos" else "length")
    assert got.usage is not None and got.usage.prompt_tokens == want.prompt_tokens
    assert got.model == "tiny"

    chunks = list(client.completions.create(model="tiny", prompt=PREFIX, suffix=SUFFIX, max_tokens=24,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_openai_raw_prompt_and_models(base_url: str, reference: Engine) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == ["tiny"]
    prompt = "import os\nimport sys\n"
    want, _ = raw_greedy(reference, prompt, 20)
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0)
    assert got.choices[0].text == want
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=20, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == want
    # Sampling with a seed is reproducible, and n gives that many choices.
    a = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, seed=3, n=2)
    b = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=1.0, seed=3, n=2)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len(a.choices) == 2


def test_openai_stop_strings_are_cut(base_url: str, reference: Engine, http: httpx.Client) -> None:
    prompt = "import os\nimport sys\n"
    full, _ = raw_greedy(reference, prompt, 30)
    if len(full) < 4:
        pytest.skip("the random model ended too soon to pick a stop string")
    stop = full[2:4]
    got = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 30, "temperature": 0,
                                             "stop": [stop]}).json()
    assert got["choices"][0]["text"] == full[: full.find(stop)]
    assert got["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------------------------------------
# TGI


def test_tgi_inference_client(base_url: str, reference: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    hub = pytest.importorskip("huggingface_hub")
    # huggingface_hub refuses every request, loopback included, while HF_HUB_OFFLINE=1 is set
    # (as it is on offline machines); a client of a local server has to lift it for itself.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    client = hub.InferenceClient(base_url, token=KEY)
    prompt = spelled_fim(reference, PREFIX, SUFFIX)  # FIM laid out by the client, as llm.nvim does
    want, finish = raw_greedy(reference, prompt, 24)

    assert client.text_generation(prompt, max_new_tokens=24) == want
    for text in [want]:
        assert "<fim" not in text and "<|endoftext|>" not in text

    out = client.text_generation(prompt, max_new_tokens=24, details=True)
    assert out.generated_text == want
    assert out.details.finish_reason == finish
    assert "".join(t.text for t in out.details.tokens) == want
    assert out.details.generated_tokens == len(out.details.tokens)

    pieces = list(client.text_generation(prompt, max_new_tokens=24, stream=True))
    assert "".join(pieces) == want

    events = list(client.text_generation(prompt, max_new_tokens=24, stream=True, details=True))
    assert events[-1].generated_text == want
    assert events[-1].details.finish_reason == finish
    assert events[-1].details.input_length == len(reference.tokenizer.encode_raw(prompt))
    assert all(e.details is None for e in events[:-1])


def test_tgi_routes_with_httpx(http: httpx.Client, reference: Engine) -> None:
    prompt = spelled_fim(reference, PREFIX, SUFFIX)
    want, _ = raw_greedy(reference, prompt, 16)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 16, "return_full_text": False}}
    assert http.post("/generate", json=body).json() == {"generated_text": want}
    with http.stream("POST", "/generate_stream", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]
    assert "".join(e["token"]["text"] for e in events) == want
    assert events[-1]["generated_text"] == want
    full = http.post("/generate", json={**body, "parameters": {"max_new_tokens": 16, "return_full_text": True}})
    assert full.json()["generated_text"] == prompt + want
    # TGI keeps the text up to and including the stop string.
    if len(want) >= 4:
        stop = want[2:4]
        stopped = http.post("/generate", json={"inputs": prompt, "parameters": {
            "max_new_tokens": 16, "stop": [stop], "details": True}}).json()
        assert stop in stopped["generated_text"] and want.startswith(stopped["generated_text"])
        assert stopped["details"]["finish_reason"] == "stop_sequence"
    # TGI's error shape, which huggingface_hub turns into its ValidationError.
    bad = http.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 0}})
    assert bad.status_code == 422
    assert bad.json()["error_type"] == "validation"
    assert "max_new_tokens" in bad.json()["error"]


# ---------------------------------------------------------------------------------------------
# santa's own endpoints


def test_infill_equals_engine(http: httpx.Client, reference: Engine) -> None:
    for mode in ("auto", "line", "block", "full"):
        reference.prompt_cache.clear()
        want = reference.infill(PREFIX, SUFFIX, max_tokens=24, mode=mode).result.to_dict()
        got = http.post("/infill", json={"prefix": PREFIX, "suffix": SUFFIX, "max_tokens": 24, "mode": mode})
        assert got.status_code == 200
        got_d = got.json()
        for key in ("completion", "candidates", "stop_reasons", "mode", "fim", "fim_mode", "truncated"):
            assert got_d[key] == want[key], key
        assert got_d["tokens"]["prompt"] == want["tokens"]["prompt"]
        assert set(got_d) == set(want)


def test_infill_stream_and_health(http: httpx.Client, base_url: str, reference: Engine) -> None:
    want = reference.infill(PREFIX, SUFFIX, max_tokens=24, mode="full").result
    with http.stream("POST", "/infill", json={"prefix": PREFIX, "suffix": SUFFIX, "max_tokens": 24,
                                             "mode": "full", "stream": True}) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert "".join(p.get("text", "") for p in payloads) == want.text
    assert payloads[-1]["result"]["completion"] == want.text
    # /health needs no key, even on a server that has one.
    health = httpx.get(f"{base_url}/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["model"] == "tiny"


def test_warm_prompt_cache_is_used(http: httpx.Client) -> None:
    first = http.post("/infill", json={"prefix": PREFIX * 3, "suffix": SUFFIX, "max_tokens": 4}).json()
    second = http.post("/infill", json={"prefix": PREFIX * 3, "suffix": SUFFIX, "max_tokens": 4}).json()
    assert first["tokens"]["prompt_reused"] == 0
    assert second["tokens"]["prompt_reused"] > 0


# ---------------------------------------------------------------------------------------------
# Errors and limits


def test_auth(base_url: str) -> None:
    for path, body in (("/infill", {"prefix": "x"}), ("/v1/completions", {"prompt": "x"}),
                       ("/generate", {"inputs": "x"})):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.post(base_url + path, json=body, headers=headers)
            assert response.status_code == 401, (path, headers)
    assert httpx.get(f"{base_url}/v1/models").status_code == 401
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/infill", b"{not json", 400),
    ("/infill", b"[1, 2]", 400),
    ("/infill", b'{"suffix": "x"}', 422),
    ("/infill", b'{"prefix": "x", "max_tokens": 65}', 422),
    ("/infill", b'{"prefix": "x", "max_tokens": "many"}', 422),
    ("/infill", b'{"prefix": "x", "mode": "sideways"}', 422),
    ("/infill", b'{"prefix": "x", "temperature": -1}', 422),
    ("/infill", b'{"prefix": "x", "n": 99}', 422),
    ("/infill", b'{"prefix": "x", "stop": [1]}', 422),
    ("/infill", b'{"prefix": "x", "seed": -1}', 422),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1000}', 422),
    ("/v1/completions", b'{"prompt": ["a", "b"]}', 422),
    ("/v1/completions", b'{"prompt": "x", "echo": true}', 422),
    ("/v1/completions", b"", 400),
])
def test_bad_requests_are_json_4xx(http: httpx.Client, path: str, body: bytes, status: int) -> None:
    response = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert "Traceback" not in response.text


def test_context_overflow_and_unknown_routes(http: httpx.Client, reference: Engine) -> None:
    n_positions = reference.config.n_positions
    # A raw prompt longer than the context: a validation error, not a crash.
    long_prompt = "x = 1\n" * n_positions
    response = http.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 8})
    assert response.status_code == 422 and "context" in response.json()["error"]["message"]
    assert http.get("/nope").status_code == 404
    assert http.get("/nope").json()["error"]["message"]
    assert http.get("/infill").status_code == 405


def test_body_limit(engine: Engine) -> None:
    with running(create_app(engine, max_body_bytes=100)) as url:
        response = httpx.post(f"{url}/infill", json={"prefix": "x" * 200})
        assert response.status_code == 413
        assert response.json()["error"]["message"]


def test_loopback_only_unless_allowed(engine: Engine) -> None:
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("192.168.1.5") and not _is_loopback("example.com")
    for host in ("0.0.0.0", "::", "10.1.2.3"):
        with pytest.raises(UsageError, match="--allow-remote"):
            serve(engine, host=host, port=0)


def test_stop_text() -> None:
    held = CompletionFilter("raw", stops=["STOP"], include_stop=False)
    assert held.feed("abc ST") == "abc "  # "ST" may begin the stop string
    assert held.feed("OP more") == "" and held.stopped
    assert held.finish() == "" and held.raw == "abc "
    kept = CompletionFilter("raw", stops=["STOP"], include_stop=True)
    assert kept.feed("abc ST") == "abc ST"
    assert kept.feed("OP more") == "OP more" and kept.stopped


# ---------------------------------------------------------------------------------------------
# The queue and cancellation, with an engine whose completions wait on a gate


class GatedEngine:
    """Delegates to a real engine; its completions block until ``gate`` is set."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self.gate = threading.Event()
        self.started = threading.Event()
        self.streams: list[CompletionRun] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def infill(self, *args: Any, **kwargs: Any) -> Any:
        stream = self._engine.infill(*args, **kwargs)
        self.streams.append(stream)
        gated = self

        class Gated:
            def cancel(self) -> None:
                stream.cancel()
                gated.gate.set()

            def pieces(self) -> Iterator[Piece]:
                gated.started.set()
                gated.gate.wait(20)
                yield from stream.pieces()

            @property
            def result(self) -> Any:
                return stream.result

        return Gated()


def test_queue_full_gives_503(engine: Engine) -> None:
    gated = GatedEngine(engine)
    with running(create_app(gated, max_queue=1)) as url:  # type: ignore[arg-type]
        body = {"prefix": PREFIX, "suffix": SUFFIX, "max_tokens": 4}
        results: list[int] = []

        def post() -> None:
            results.append(httpx.post(f"{url}/infill", json=body, timeout=30).status_code)

        first = threading.Thread(target=post)
        first.start()
        assert gated.started.wait(10)
        second = threading.Thread(target=post)  # waits in the queue
        second.start()
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["queued"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        busy = httpx.post(f"{url}/infill", json=body)
        assert busy.status_code == 503
        assert busy.json()["error"]["type"] == "overloaded"
        assert busy.headers["retry-after"] == "1"
        tgi_busy = httpx.post(f"{url}/generate", json={"inputs": "x"})
        assert tgi_busy.status_code == 503 and tgi_busy.json()["error_type"] == "overloaded"
        gated.gate.set()
        first.join(30)
        second.join(30)
        assert results == [200, 200]
        # The slot frees before the answer goes out: back-to-back requests are never refused.
        assert all(httpx.post(f"{url}/infill", json=body).status_code == 200 for _ in range(3))


def test_disconnect_cancels_generation(engine: Engine) -> None:
    gated = GatedEngine(engine)
    with running(create_app(gated, max_queue=0)) as url:
        body = {"prefix": PREFIX, "suffix": SUFFIX, "max_tokens": 32, "stream": True}
        with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/infill", json=body):
            assert gated.started.wait(10)
        # The client hung up while the model was busy: the stream is cancelled and the slot freed.
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/health").json()["queued"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gated.streams and gated.streams[0].result.stop_reason == "cancelled"
        assert httpx.get(f"{url}/health").json()["queued"] == 0
