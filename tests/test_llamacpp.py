"""llama.cpp's protocol on santa serve: /infill beside santa's own, /completion, /props, /health,
checked against the engine itself; bad input is a 400 in llama.cpp's shape, never a 5xx; and the
real llama.vim plugin, unmodified, in Vim in tmux: its suggestion comes from santa and is accepted
with Tab, and its cache warm-ups and input_extra chunks reach santa."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("starlette")
httpx = pytest.importorskip("httpx")

from checkpoints import write_checkpoint  # noqa: E402
from santacli.completion import (  # noqa: E402
    CompletionOptions,
    CompletionResult,
    CompletionRun,
    Piece,
    ResultStream,
    raw_prompt,
)
from santacli.context import client_chunks, select  # noqa: E402
from santacli.engine import Engine  # noqa: E402
from santacli.server.app import create_app  # noqa: E402
from santacli.server.routes_llamacpp import MAX_EXTRA_CHARS, MAX_EXTRA_CHUNKS, indent_cut, pick_fields  # noqa: E402
from test_server import running  # noqa: E402

LLAMA_VIM = Path(__file__).resolve().parents[2] / "shared" / "vendor" / "llama.vim"
UTIL = "def parse_line(line):\n    key, value = line.split('=', 1)\n    return key.strip(), value.strip()\n"
BODY = {"input_prefix": "import os\n\n\ndef read_config(path):\n", "prompt": "    pairs = [parse_line(",
        "input_suffix": "\n    return pairs\n", "input_extra": [{"filename": "util.py", "text": UTIL}],
        "n_predict": 12}


@dataclass
class Call:
    kind: str  # infill | generate_text
    prefix: str
    suffix: str
    options: CompletionOptions
    result: CompletionResult | None = None  # set by the model thread when the request is done


class _Watched(ResultStream):
    """A stream that writes its result into its :class:`Call` when it ends."""

    def __init__(self, inner: ResultStream, call: Call) -> None:
        super().__init__()
        self.inner, self.call = inner, call

    def _run(self) -> Iterator[Piece]:
        yield from self.inner.pieces()
        self._result = self.call.result = self.inner.result

    def cancel(self) -> None:
        super().cancel()
        self.inner.cancel()


class Recorder:
    """The engine, with every request that reaches it written down: the server's side of a test."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info = engine.info
        self.calls: list[Call] = []

    @property
    def name(self) -> str:
        return self.engine.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)  # the rest of the engine's interface (prompt_scope...)

    def _watch(self, call: Call, stream: ResultStream) -> ResultStream:
        self.calls.append(call)
        return _Watched(stream, call)

    def infill(self, prefix: str, suffix: str, options: CompletionOptions | None = None,
               **overrides: object) -> ResultStream:
        opts = replace(options or CompletionOptions(), **overrides)  # type: ignore[arg-type]
        return self._watch(Call("infill", prefix, suffix, opts), self.engine.infill(prefix, suffix, opts))

    def complete(self, prefix: str, options: CompletionOptions | None = None, **overrides: object) -> ResultStream:
        return self.infill(prefix, "", options, **overrides)

    def generate_text(self, text: str, options: CompletionOptions, **kwargs: Any) -> ResultStream:
        return self._watch(Call("generate_text", text, "", options), self.engine.generate_text(text, options, **kwargs))


@pytest.fixture(scope="module")
def roomy(tmp_path_factory, tokenizer) -> Path:
    """The tiny random model with 512 positions: room for a context block."""
    return write_checkpoint(tmp_path_factory.mktemp("roomy") / "model", tokenizer=tokenizer, n_positions=512)


@pytest.fixture(scope="module")
def served(roomy: Path) -> Engine:
    return Engine.load(str(roomy), device="cpu", dtype="float32", attention="eager")


@pytest.fixture(scope="module")
def oracle(roomy: Path) -> Engine:
    return Engine.load(str(roomy), device="cpu", dtype="float32", attention="eager")


@pytest.fixture(scope="module")
def recorder(served: Engine) -> Recorder:
    return Recorder(served)


@pytest.fixture(scope="module")
def url(recorder: Recorder) -> Iterator[str]:
    with running(create_app(recorder, max_tokens_limit=64, model_name="roomy")) as base:
        yield base


@pytest.fixture
def http(url: str, recorder: Recorder, served: Engine, oracle: Engine) -> Iterator[httpx.Client]:
    # Cold prompts on both sides: a warm prefix changes the last bits of the logits.
    served.prompt_cache.clear()
    oracle.prompt_cache.clear()
    recorder.calls.clear()
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def expected_infill(oracle: Engine, body: dict[str, Any], **options: Any) -> str:
    prefix, suffix = body["input_prefix"] + body.get("prompt", ""), body["input_suffix"]
    chunks = [(c.get("filename", ""), c["text"]) for c in body.get("input_extra", [])]
    snippets = select(prefix, suffix, target="file.py", client=client_chunks(chunks))
    return oracle.infill(prefix, suffix, max_tokens=body["n_predict"], context=snippets, **options).result.text


# -- /infill --------------------------------------------------------------------------------------


def test_infill_answers_as_llama_cpp_with_santas_text(http, recorder, oracle):
    reply = http.post("/infill", json=BODY)
    assert reply.status_code == 200, reply.text
    answer = reply.json()
    assert answer["content"] == expected_infill(oracle, BODY)
    assert answer["stop"] is True and answer["stop_type"] in ("eos", "limit", "word")
    assert answer["tokens_predicted"] <= 12 and answer["truncated"] is False
    assert answer["tokens_cached"] == answer["tokens_evaluated"] + answer["tokens_predicted"]
    timings = answer["timings"]
    assert timings["prompt_n"] + timings["cache_n"] == answer["tokens_evaluated"]
    assert set(timings) >= {"prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n",
                            "predicted_ms", "predicted_per_token_ms", "predicted_per_second"}
    [call] = recorder.calls
    assert call.result is not None and call.result.text == answer["content"]
    # The typed part of the line ends the prefix; the chunk reached the prompt as context.
    assert call.prefix == BODY["input_prefix"] + BODY["prompt"] and call.suffix == BODY["input_suffix"]
    assert [s.path for s in call.options.context] == ["util.py"]
    assert [c["path"] for c in answer["santa"]["context"]] == ["util.py"]
    assert call.options.temperature == 0.0  # llama.vim sends no temperature: greedy


def test_response_fields_are_flattened_paths(http):
    fields = ["content", "timings/prompt_n", "timings/predicted_ms", "tokens_cached", "truncated", "no/such"]
    answer = http.post("/infill", json={**BODY, "response_fields": fields}).json()
    assert set(answer) == {"content", "timings/prompt_n", "timings/predicted_ms", "tokens_cached", "truncated"}
    assert isinstance(answer["timings/prompt_n"], int)
    raw = http.post("/infill", json={**BODY, "response_fields": ["content"]}).text
    assert raw.startswith('{"content":"')  # what llama.vim checks before it decodes an answer
    assert pick_fields({"a": {"b": 1}, "c": 2}, ["a/b", "a", "a/x", "", "c/d"]) == {"a/b": 1, "a": {"b": 1}}


def test_warm_up_fills_the_cache_and_the_next_request_reuses_it(http, recorder):
    warm = {"id_slot": 0, "input_prefix": "", "input_suffix": "", "input_extra": BODY["input_extra"], "prompt": "",
            "n_predict": 0, "temperature": 0.0, "samplers": [], "stream": False, "cache_prompt": True,
            "t_max_prompt_ms": 1, "t_max_predict_ms": 1, "response_fields": [""]}
    reply = http.post("/infill", json=warm)
    assert (reply.status_code, reply.json()) == (200, {})
    [call] = recorder.calls
    assert call.options.max_tokens == 1 and [s.path for s in call.options.context] == ["util.py"]
    full = http.post("/infill", json={**warm, "response_fields": None}).json()
    assert full["content"] == "" and full["tokens_predicted"] == 0 and full["stop_type"] == "limit"
    answer = http.post("/infill", json=BODY).json()
    block = sum(c["tokens"] for c in answer["santa"]["context"])
    assert block > 0 and answer["timings"]["cache_n"] >= 1 + block  # the sentinel and the whole block


def test_santas_own_infill_keeps_working_on_the_same_path(http, oracle):
    body = {"prefix": "def f(x):\n    return ", "suffix": "\n", "max_tokens": 6,
            "context": [{"path": "util.py", "text": UTIL}]}
    answer = http.post("/infill", json=body).json()
    assert set(answer) >= {"completion", "stop_reason", "tokens", "context"}
    snippets = select(body["prefix"], body["suffix"], target=None, client=client_chunks([("util.py", UTIL)]))
    assert answer["completion"] == oracle.infill(body["prefix"], body["suffix"], max_tokens=6,
                                                 context=snippets).result.text
    assert [c["path"] for c in answer["context"]] == ["util.py"]
    bad = http.post("/infill", json={"prefix": "x", "context": [{"text": 3}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "context"


def test_stream_sends_the_same_text(http):
    plain = http.post("/infill", json=BODY).json()["content"]
    events = []
    with http.stream("POST", "/infill", json={**BODY, "stream": True}) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert "".join(e["content"] for e in events) == plain
    assert events[-1]["stop"] is True and "timings" in events[-1]
    assert all(e["stop"] is False for e in events[:-1])


def test_time_budget_and_knobs_reach_the_options(http, recorder):
    http.post("/infill", json={**BODY, "t_max_predict_ms": 250, "stop": ["\n\n"], "temperature": 0.5, "seed": 7,
                               "top_k": 20, "samplers": ["top_k", "top_p", "infill"], "n_predict": 500})
    [call] = recorder.calls
    opts = call.options
    assert (opts.time_budget_ms, opts.stop, opts.temperature, opts.seed, opts.top_k) == (250, ("\n\n",), 0.5, 7, 20)
    assert opts.max_tokens == 64  # capped at the server's limit, as llama.cpp caps n_predict
    http.post("/infill", json={**BODY, "seed": -1})
    assert recorder.calls[-1].options.seed is None  # llama.cpp's "random seed"


# -- /completion, /props, /health ---------------------------------------------------------------


def test_completion_continues_a_raw_prompt(http, oracle):
    prompt = "<fim-prefix>def add(a, b):\n    return <fim-suffix>\n<fim-middle>"
    answer = http.post("/completion", json={"prompt": prompt, "n_predict": 8}).json()
    assert answer["content"] == oracle.generate_text(prompt, CompletionOptions(max_tokens=8)).result.text
    assert http.post("/completion", json={"prompt": "x = ", "n_predict": 0}).json()["content"] == ""
    bad = http.post("/completion", json={"prompt": [1, 2, 3]})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_props_and_health(http):
    props = http.get("/props").json()
    assert props["default_generation_settings"]["n_ctx"] == 512 and props["total_slots"] == 1
    health = http.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "roomy"  # llama.cpp's field and santa's


# -- bad input: 400 in llama.cpp's shape, never a 5xx ------------------------------------------


@pytest.mark.parametrize("change", [
    {"input_extra": "not a list"}, {"input_extra": [1]}, {"input_extra": [{"filename": "a.py"}]},
    {"input_extra": [{"text": 5}]}, {"input_extra": [{"text": "x", "filename": 3}]},
    {"input_extra": [{"text": "x"}] * (MAX_EXTRA_CHUNKS + 1)},
    {"input_extra": [{"filename": "big.py", "text": "x = 1\n" * (MAX_EXTRA_CHARS // 6 + 1)}]},
    {"input_prefix": 5}, {"input_suffix": None}, {"prompt": ["x"]}, {"n_predict": -5}, {"n_predict": "8"},
    {"n_indent": -1}, {"response_fields": "content"}, {"samplers": 5}, {"temperature": "hot"}, {"stop": [1]},
    {"top_p": 0.0}, {"mode": "sideways"}, {"seed": -2},
], ids=lambda change: json.dumps(change)[:40])
def test_bad_input_is_a_400(http, recorder, change):
    body = {**BODY, **change}
    body = {k: v for k, v in body.items() if v is not None}
    reply = http.post("/infill", json=body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error" and error["message"]
    assert recorder.calls == []  # refused before the model


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                     max_leaves=12)
_CHUNK = st.fixed_dictionaries({"text": st.text(max_size=200) | _JSON}, optional={"filename": st.text(max_size=20) | _JSON})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.lists(_CHUNK, max_size=5) | _JSON)
def test_any_input_extra_is_answered_without_a_server_error(http, extra):
    reply = http.post("/infill", json={**BODY, "input_extra": extra, "n_predict": 1})
    assert reply.status_code in (200, 400), reply.text


# -- n_indent (a scripted token source through the real server stack) -----------------------------


class _Scripted:
    """A token source that sends fixed text pieces, as a server would."""

    reused_prompt_tokens = 0

    def __init__(self, pieces: tuple[str, ...]) -> None:
        self._pieces = pieces

    def __iter__(self) -> Iterator[tuple[int, int | str, str | None]]:
        for i, piece in enumerate(self._pieces):
            yield 0, piece, "eos" if i == len(self._pieces) - 1 else None

    def stop_row(self, row: int) -> None:
        pass

    def close(self) -> None:
        pass


class ScriptedEngine(Recorder):
    pieces = ("if ready:\n", "        go()\n", "    done()\n", "tail()\n")

    def infill(self, prefix: str, suffix: str, options: CompletionOptions | None = None,
               **overrides: object) -> ResultStream:
        opts = replace(options or CompletionOptions(), **overrides)  # type: ignore[arg-type]
        run = CompletionRun(lambda: _Scripted(self.pieces), prompt=raw_prompt([1], prefix), mode="full", options=opts,
                            model="scripted")
        return self._watch(Call("infill", prefix, suffix, opts), run)


def test_indent_cut_follows_llama_cpp():
    text = "if ready:\n        go()\n    done()\ntail()\n"
    assert indent_cut(text, 0) is None
    assert text[:indent_cut(text, 8)] == "if ready:\n        go()"
    assert text[:indent_cut(text, 4)] == "if ready:\n        go()\n    done()"
    assert indent_cut("a\n\n   \n    b", 4) is None  # blank lines never cut
    assert indent_cut("a\n  ", 4) is None  # undecided until the line has text


def test_n_indent_ends_the_completion(served):
    with running(create_app(ScriptedEngine(served))) as base, httpx.Client(base_url=base, timeout=30) as client:
        body = {"input_prefix": "def f():\n", "prompt": "    ", "input_suffix": "\n", "n_predict": 16}
        assert client.post("/infill", json={**body, "n_indent": 4}).json()["content"] == \
            "if ready:\n        go()\n    done()"
        answer = client.post("/infill", json={**body, "n_indent": 8}).json()
        assert answer["content"] == "if ready:\n        go()" and answer["stop_type"] == "limit"
        events = []
        with client.stream("POST", "/infill", json={**body, "n_indent": 8, "stream": True}) as reply:
            events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: ")]
        assert "".join(e["content"] for e in events) == "if ready:\n        go()"


# -- the real llama.vim ---------------------------------------------------------------------------


OTHER = '''def parse_line(line):
    key, value = line.split("=", 1)
    return key.strip(), value.strip()


def load_settings(path):
    with open(path) as handle:
        return dict(parse_line(line) for line in handle)
'''
PROG = "import os\n\n\ndef read_config(path):\n    settings = load_settings(path)\n    return settings\n"


class Tmux:
    """Vim in a private tmux server (its own socket, so nothing else is touched)."""

    def __init__(self, argv: list[str], cwd: Path, socket: str) -> None:
        self.socket = socket
        env = [f"{k}={v}" for k, v in {"PATH": os.environ["PATH"], "HOME": str(cwd), "TERM": "xterm-256color"}.items()]
        self._tmux("new-session", "-d", "-s", "t", "-x", "120", "-y", "30", "-c", str(cwd), "env", "-i", *env, *argv)

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], capture_output=True, text=True,
                              check=True).stdout

    def keys(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", "t", *(["-l"] if literal else []), *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def wait_for(check: Any, what: str, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def bundled() -> Engine:
    """santa-tiny, the bundled model: a real (small) Python model, so the suggestion is code."""
    return Engine.load("tiny", device="cpu", dtype="float32")


@pytest.mark.slow
def test_llama_vim_suggests_santas_text_and_accepts_it_with_tab(bundled, tmp_path):
    for tool in ("vim", "tmux", "curl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not (LLAMA_VIM / "autoload" / "llama.vim").is_file():
        pytest.skip("../shared/vendor/llama.vim is not present")
    recorder = Recorder(bundled)
    bundled.prompt_cache.clear()
    (tmp_path / "other.py").write_text(OTHER)
    (tmp_path / "prog.py").write_text(PROG)
    with running(create_app(recorder)) as base:
        (tmp_path / "vimrc").write_text(
            "set nocompatible noswapfile\n"
            f"set rtp^={LLAMA_VIM}\n"
            f"let g:llama_config = {{'endpoint_fim': '{base}/infill', 'n_predict': 16, 'show_info': 0,"
            " 'ring_update_ms': 200}\n")
        vim = Tmux(["vim", "-Nu", str(tmp_path / "vimrc"), "-i", "NONE", "other.py"], tmp_path,
                   f"santa-llamavim-{os.getpid()}")
        try:
            # Debian 12's Vim is 9.0: llama.vim warns that it wants 9.1 (and works); dismiss that.
            if "Press ENTER" in wait_for(lambda: next((s for s in [vim.screen()] if "parse_line" in s
                                                       or "Press ENTER" in s), None), "Vim with other.py"):
                vim.keys("Enter")
            # Visiting other.py puts a chunk of it in llama.vim's ring; in normal mode the plugin
            # sends it with an n_predict 0 request to warm the cache.
            warmed = wait_for(lambda: [c for c in recorder.calls if c.options.max_tokens == 1
                                       and any(s.path == "other.py" for s in c.options.context)],
                              "llama.vim's warm-up request with the other.py chunk")
            assert warmed[0].prefix == "" and "load_settings" in warmed[0].options.context[0].text
            vim.keys(":e prog.py", "Enter")
            wait_for(lambda: "read_config" in vim.screen(), "prog.py on screen")
            vim.keys("5G", "A")
            vim.keys(" or", literal=True)  # typing in insert mode asks for a suggestion
            typed = "    settings = load_settings(path) or"

            def suggestions() -> list[tuple[Call, list[str]]]:
                """Each finished completion asked for on this line, as llama.vim lays it out from
                the cursor's line on (it may show one fetched a keystroke earlier that the
                typed text continues)."""
                out = []
                for call in list(recorder.calls):
                    line = call.prefix.rsplit("\n", 1)[-1]
                    if call.result is None or call.options.max_tokens == 1 or not line.startswith(typed[:-3]):
                        continue
                    lines = (line + call.result.text).split("\n")
                    while lines and not lines[-1]:
                        lines.pop()
                    if len(lines) > 0 and lines[0].startswith(typed) and lines[0].rstrip() != typed:
                        out.append((call, lines))
                return out

            def shown() -> tuple[Call, list[str]] | None:
                screen = vim.screen()
                return next(((c, lines) for c, lines in suggestions() if lines[0].rstrip() in screen), None)

            call, lines = wait_for(shown, "llama.vim showing one of santa's completions")
            # input_extra reached santa: the other file's chunk is in that prompt's context.
            assert "other.py" in [s.path for s in call.options.context]
            vim.keys("Tab")
            vim.keys("Escape")
            vim.keys(":w", "Enter")
            expected = PROG.split("\n")
            expected[4:5] = lines
            wait_for(lambda: (tmp_path / "prog.py").read_text() == "\n".join(expected),
                     f"prog.py with the accepted suggestion {lines!r}", timeout=10)
            assert len((tmp_path / "prog.py").read_text()) > len(PROG)
            vim.keys(":qa!", "Enter")
        finally:
            vim.kill()
