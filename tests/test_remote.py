"""RemoteEngine against a running santa server, through each API, equals the local engine."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from santacli.engine import Engine
from santacli.errors import UsageError
from santacli.remote import RemoteEngine, RemoteError
from santacli.server.app import create_app
from test_server import PREFIX, SUFFIX, running

KEY = "remote-key"
APIS = ("santa", "tgi", "openai")


@pytest.fixture(scope="module")
def served(engine: Engine) -> Engine:
    return engine


@pytest.fixture(scope="module")
def local(reference: Engine) -> Engine:
    return reference


@pytest.fixture(scope="module")
def url(served: Engine) -> Iterator[str]:
    with running(create_app(served, api_key=KEY, max_tokens_limit=64)) as base:
        yield base


@pytest.fixture(autouse=True)
def cold(served: Engine, local: Engine) -> None:
    # Compare cold prompts on both sides (a warm prefix can move the last bits of the logits).
    served.prompt_cache.clear()
    local.prompt_cache.clear()


def remote(url: str, api: str, checkpoint: Path) -> RemoteEngine:
    return RemoteEngine(url + ("/v1" if api == "openai" else ""), api=api, model=str(checkpoint), api_key=KEY)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("mode", ["auto", "line", "block", "full"])
def test_greedy_infill_equals_local(url: str, api: str, mode: str, tiny_checkpoint: Path, local: Engine,
                                    served: Engine) -> None:
    engine = remote(url, api, tiny_checkpoint)
    for prefix, suffix in ((PREFIX, SUFFIX), ("class Point:\n    def __init__(self, x, y):\n", "")):
        served.prompt_cache.clear()
        local.prompt_cache.clear()
        want = local.infill(prefix, suffix, max_tokens=24, mode=mode).result
        stream = engine.infill(prefix, suffix, max_tokens=24, mode=mode)
        chunks = list(stream)
        got = stream.result
        assert got.text == want.text, (api, mode, prefix)
        assert "".join(chunks) == got.text
        assert got.stop_reasons == want.stop_reasons
        assert (got.mode, got.fim, got.prompt_tokens) == (want.mode, want.fim, want.prompt_tokens)


@pytest.mark.parametrize("api", ["santa", "openai"])
def test_seeded_candidates_equal_local(url: str, api: str, tiny_checkpoint: Path, local: Engine) -> None:
    want = local.infill(PREFIX, SUFFIX, max_tokens=12, mode="full", temperature=0.8, seed=7, n=2).result
    got = remote(url, api, tiny_checkpoint).infill(PREFIX, SUFFIX, max_tokens=12, mode="full",
                                                   temperature=0.8, seed=7, n=2).result
    assert got.candidates == want.candidates


def test_complete_and_stop_strings(url: str, tiny_checkpoint: Path, local: Engine) -> None:
    want = local.complete("import os\n", max_tokens=20, mode="full").result
    if len(want.text) < 3:
        pytest.skip("the random model ended too soon to pick a stop string")
    stop = want.text[1:3]
    for api in APIS:
        local.prompt_cache.clear()
        expected = local.complete("import os\n", max_tokens=20, mode="full", stop=(stop,)).result
        got = remote(url, api, tiny_checkpoint).complete("import os\n", max_tokens=20, mode="full",
                                                         stop=(stop,)).result
        assert got.text == expected.text and got.stop_reason == "stop_sequence", api


def test_errors_are_one_line_santa_errors(url: str, tiny_checkpoint: Path) -> None:
    with pytest.raises(RemoteError, match="API key"):
        RemoteEngine(url, api="santa", api_key="wrong").infill(PREFIX, SUFFIX).text()
    with pytest.raises(UsageError, match="max_tokens"):
        RemoteEngine(url, api="santa", api_key=KEY).infill(PREFIX, SUFFIX, max_tokens=100).text()
    with pytest.raises(RemoteError, match="cannot reach"):
        RemoteEngine("http://127.0.0.1:9", api="santa", timeout=2).infill(PREFIX, SUFFIX).text()
    with pytest.raises(UsageError, match="special token"):
        remote(url, "tgi", tiny_checkpoint).infill("x = '<fim-prefix>'\n", "y\n", max_tokens=8)
    with pytest.raises(UsageError, match="--model"):
        RemoteEngine(url, api="tgi")
    with pytest.raises(UsageError, match="api must be"):
        RemoteEngine(url, api="grpc")
    with pytest.raises(UsageError, match="http"):
        RemoteEngine("localhost:8080", api="santa")
