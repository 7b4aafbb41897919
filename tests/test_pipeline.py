"""One completion pipeline: the text loop of santacli.completion serves every front end.

The same stop rule (a user stop string, implemented once in santacli.stoprules) ends the text
identically when the model runs in this process, behind ``--endpoint`` with each ``--api``,
and through each of the server's three APIs. Cancellation and prompt-cache bookkeeping live
in the engine, not in callers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from santacli.completion import CompletionEngine, CompletionOptions, CompletionRun  # noqa: E402
from santacli.engine import Engine  # noqa: E402
from santacli.remote import RemoteEngine  # noqa: E402
from santacli.server.app import create_app  # noqa: E402
from test_server import PREFIX, SUFFIX, running  # noqa: E402

TOKENS = 32


@pytest.fixture(scope="module")
def url(reference: Engine) -> Iterator[str]:
    with running(create_app(reference, max_tokens_limit=64)) as base:
        yield base


def pick_stop(text: str) -> str:
    """A stop string that first occurs a few characters into ``text``."""
    for start in range(3, len(text) - 2):
        stop = text[start:start + 2]
        if stop.strip() and text.find(stop) == start:
            return stop
    pytest.skip(f"the tiny model's text {text!r} offers no stop string")


def test_one_stop_rule_through_every_path(engine: Engine, tiny_checkpoint: Path, url: str) -> None:
    free = engine.infill(PREFIX, SUFFIX, max_tokens=TOKENS, mode="full").result
    stop = pick_stop(free.text)
    want = engine.infill(PREFIX, SUFFIX, max_tokens=TOKENS, mode="full", stop=(stop,)).result
    assert want.stop_reason == "stop_sequence" and stop not in want.text
    assert len(want.text) < len(free.text)

    # --endpoint, each API: santa's server applies the rule, or santa's loop does client-side.
    for api in ("santa", "tgi", "openai"):
        remote: CompletionEngine = RemoteEngine(url, api=api, model=str(tiny_checkpoint))
        got = remote.infill(PREFIX, SUFFIX, max_tokens=TOKENS, mode="full", stop=(stop,)).result
        assert (got.text, got.stop_reason) == (want.text, "stop_sequence"), api

    body = {"prefix": PREFIX, "suffix": SUFFIX, "max_tokens": TOKENS, "mode": "full", "stop": [stop]}
    answer = httpx.post(f"{url}/infill", json=body, timeout=30).json()
    assert (answer["completion"], answer["stop_reason"]) == (want.text, "stop_sequence")

    openai = {"model": "m", "prompt": PREFIX, "suffix": SUFFIX, "max_tokens": TOKENS, "temperature": 0,
              "stop": stop}
    choice = httpx.post(f"{url}/v1/completions", json=openai, timeout=30).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (want.text, "stop")

    # Raw prompts (the client laid out FIM itself): the same rule, each API's own convention for
    # the stop string (OpenAI drops it; TGI keeps the token that completed it).
    tok = engine.tokenizer
    raw = tok.decode_with_specials(engine.build_prompt(PREFIX, SUFFIX, CompletionOptions(max_tokens=TOKENS)).ids)
    opts = CompletionOptions(max_tokens=TOKENS, stop=(stop,))
    dropped = engine.generate_text(raw, opts).result
    kept = engine.generate_text(raw, opts, include_stop=True).result
    assert dropped.stop_reason == kept.stop_reason == "stop_sequence"
    assert stop not in dropped.text and kept.text.startswith(dropped.text + stop)
    choice = httpx.post(f"{url}/v1/completions", json=openai | {"prompt": raw, "suffix": None}, timeout=30
                        ).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (dropped.text, "stop")
    tgi = {"inputs": raw, "parameters": {"max_new_tokens": TOKENS, "stop": [stop], "details": True}}
    generated = httpx.post(f"{url}/generate", json=tgi, timeout=30).json()
    assert generated["generated_text"] == kept.text
    assert generated["details"]["finish_reason"] == "stop_sequence"


def test_prompt_cache_is_the_engines_business(engine: Engine) -> None:
    """Every way a completion ends leaves the warm cache usable: finished, stopped by a rule,
    cancelled mid-way, abandoned by its reader, or never started."""
    engine.prompt_cache.clear()
    engine.infill(PREFIX, SUFFIX, max_tokens=8, mode="full").result  # noqa: B018
    assert len(engine.prompt_cache) == 1
    again = engine.infill(PREFIX, SUFFIX, max_tokens=8, mode="full").result
    assert again.reused_prompt_tokens == again.prompt_tokens - 1

    stream = engine.infill(PREFIX, SUFFIX, max_tokens=8, mode="full")
    next(iter(stream))
    stream.cancel()
    assert stream.result.stop_reason == "cancelled" and len(engine.prompt_cache) == 1

    abandoned = iter(engine.infill(PREFIX, SUFFIX, max_tokens=8, mode="full"))
    next(abandoned)
    abandoned.close()  # the reader walked away: the generator's cleanup returns the cache
    assert len(engine.prompt_cache) == 1

    never = engine.infill(PREFIX, SUFFIX, max_tokens=8, mode="full")
    never.cancel()
    result = never.result
    assert result.stop_reason == "cancelled" and result.generated_tokens == 0
    assert len(engine.prompt_cache) == 1


def test_candidates_share_the_loop(engine: Engine) -> None:
    stream = engine.infill(PREFIX, SUFFIX, max_tokens=12, mode="full", n=3, temperature=0.8, seed=7)
    assert isinstance(stream, CompletionRun)
    texts = ["", "", ""]
    for piece in stream.pieces():
        texts[piece.row] += piece.text
    result = stream.result
    assert texts == result.candidates
    assert len(result.candidate_tokens) == 3 and max(result.candidate_tokens) == result.generated_tokens
