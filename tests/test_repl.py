"""The REPL: command parsing and session state as units, and whole sessions in a real
pseudo-terminal (pexpect) against tiny checkpoints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from santacli.errors import InputError, UsageError
from santacli.repl.session import (
    Command,
    Last,
    Session,
    format_footer,
    help_text,
    option_name,
    parse_command,
    parse_set,
    set_option,
    visible,
)

pexpect = pytest.importorskip("pexpect")

# a fresh prompt (not the redraws while typing): prompt_toolkit turns bracketed paste back on first
PROMPT = re.compile(r"\x1b\[\?2004h[^\n]*?santa> ?")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>78]|\x1b\][^\x07]*\x07")


@pytest.fixture(scope="module")
def options():
    from santacli.completion import CompletionOptions

    return CompletionOptions(max_tokens=40)


# -- units ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    (":help", Command("help", "")),
    ("  :set temperature 0.2 ", Command("set", "temperature 0.2")),
    (":set stop '\\n\\n'", Command("set", "stop '\\n\\n'")),
    (":q", Command("quit", "")),
    (":exit", Command("quit", "")),
    (":?", Command("help", "")),
    (":ACCEPT 2", Command("accept", "2")),
    (":load a b.py:3:4", Command("load", "a b.py:3:4")),
    (":acc 2", Command("accept", "2")),
    (":st", Command("stats", "")),
    (":wri out.py", Command("write", "out.py")),
])
def test_parse_command(line: str, expected: Command) -> None:
    assert parse_command(line) == expected


@pytest.mark.parametrize("line", ["def f():", "", ":", "::x", ": not a command", ":set x\nprint(1)", "x = {':a': 1}"])
def test_code_is_not_a_command(line: str) -> None:
    assert parse_command(line) is None


def test_unknown_command() -> None:
    with pytest.raises(UsageError, match="unknown command :frobnicate"):
        parse_command(":frobnicate now")


def test_set_option(options) -> None:
    assert set_option(options, "temperature", "0.2").temperature == 0.2
    assert set_option(options, "temp", "0.5").temperature == 0.5
    assert set_option(options, "max-tokens", "64").max_tokens == 64
    assert set_option(options, "mode", "LINE").mode == "line"
    assert set_option(options, "fim_mode", "spm").fim_mode == "spm"
    assert set_option(options, "n", "3").n == 3
    assert set_option(options, "seed", "7").seed == 7
    assert set_option(set_option(options, "seed", "7"), "seed", "none").seed is None
    assert set_option(options, "stop", "'\\n\\n'").stop == ("\n\n",)
    assert set_option(options, "stop", '["\\ndef", "\\nclass"]').stop == ("\ndef", "\nclass")
    assert set_option(options, "stop", "END").stop == ("END",)
    assert set_option(options, "stop", "none").stop == ()
    assert set_option(options, "filename", "a.rs").filename == "a.rs"
    assert set_option(options, "use_filename", "off").use_filename is False
    assert options.max_tokens == 40  # options are immutable; set_option returns a copy


@pytest.mark.parametrize(("name", "value", "message"), [
    ("bogus", "1", "unknown option"),
    ("max_tokens", "many", "whole number"),
    ("max_tokens", "0", "max tokens must be >= 1"),
    ("mode", "paragraph", "expected one of auto, line, block, full"),
    ("fim_mode", "msp", "expected one of psm, spm"),
    ("n", "99", "between 1 and 16"),
    ("temperature", "hot", "expected a number"),
    ("stop", "[1, 2]", "list of non-empty strings"),
    ("stop", "'unterminated", "cannot read stop strings"),
    ("use_filename", "maybe", "on or off"),
])
def test_set_option_errors(options, name: str, value: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        set_option(options, name, value)


def test_parse_set() -> None:
    assert parse_set("temperature 0.2") == ("temperature", "0.2")
    assert parse_set("temperature=0.2") == ("temperature", "0.2")
    assert parse_set("stop a b") == ("stop", "a b")
    assert option_name("TEMP") == "temperature"
    with pytest.raises(UsageError, match="usage"):
        parse_set("temperature")


def _result(*candidates: str):
    return SimpleNamespace(candidates=list(candidates))


def test_session_request_accept_and_marker(options) -> None:
    s = Session(options=options)
    assert s.request("def f():") == ("def f():", "")
    assert s.request("x = <CURSOR> + 1") == ("x = ", " + 1")
    s.last = Last("x = ", " + 1", _result("41", "42"))
    assert s.accept(2) == "42"
    assert (s.before, s.after, s.last) == ("x = 42", " + 1", None)
    # typed text goes in at the buffer's cursor; a marker in it moves the cursor
    assert s.request("") == ("x = 42", " + 1")
    assert s.request(" * 2<CURSOR>;") == ("x = 42 * 2", "; + 1")
    with pytest.raises(UsageError, match="nothing to accept"):
        s.accept()
    s.last = Last("a", "", _result("b"))
    with pytest.raises(UsageError, match="candidate 3 does not exist"):
        s.accept(3)
    with pytest.raises(UsageError, match="appears 2 times"):
        s.request("<CURSOR><CURSOR>")
    s.clear()
    assert (s.buffer, s.last) == ("", None)


def test_session_load(options, tmp_path: Path) -> None:
    f = tmp_path / "prog.py"
    f.write_text("def add(a, b):\n    return a + b\n")
    s = Session(options=options)
    s.load(f"{f}:2:12")
    assert (s.before, s.after) == ("def add(a, b):\n    return ", "a + b\n")
    assert s.options.filename == "prog.py"
    s.load(f"{f}:1")
    assert (s.before, s.after) == ("def add(a, b):", "\n    return a + b\n")
    s.load(str(f))
    assert (s.before, s.after) == (f.read_text(), "")
    with pytest.raises(UsageError, match="out of range"):
        s.load(f"{f}:9")
    with pytest.raises(InputError, match="no such file"):
        s.load(f"{tmp_path / 'missing.py'}:1")
    f.write_text("x = <CURSOR>\n")
    with pytest.raises(InputError, match="contains the cursor marker"):
        s.load(str(f))


def test_visible_keeps_the_terminal_safe() -> None:
    assert visible("a\tb\nc") == "a\tb\nc"
    assert visible("x\ry\x1b[2J\x7f\x85") == "x␍y␛[2J␡\\x85"


def test_help_and_footer() -> None:
    text = help_text("<CURSOR>")
    for word in (":set", ":stats", ":accept", ":load", ":show", ":clear", ":quit", "Esc Enter", "Ctrl-D"):
        assert word in text
    result = SimpleNamespace(generated_tokens=5, stop_reason="eos", mode="line", fim=True, fim_mode="psm",
                             time_to_first_token=0.012, tokens_per_second=300.0,
                             truncation=SimpleNamespace(any=False))
    assert format_footer(result) == "5 tokens · stop: eos · mode: line · fim: psm · first token 12 ms · 300 tok/s"


def test_import_does_not_load_torch() -> None:
    code = "import sys, santacli.repl.ui; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- in a real terminal -----------------------------------------------------------------------


SANTA = Path(sys.executable).with_name("santa")


def _spawn(model: Path, tmp_path: Path, *options: str) -> pexpect.spawn:
    """``santa repl`` in a 50x200 pseudo-terminal, its history under ``tmp_path``."""
    pytest.importorskip("prompt_toolkit")
    if not SANTA.exists():
        pytest.skip("the santa console script is not installed in this environment")
    env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1",
               XDG_DATA_HOME=str(tmp_path / "data"), SANTA_DEBUG="1", COLUMNS="200", LINES="50")
    argv = ["repl", "--model", str(model), "--device", "cpu", *options]
    child = pexpect.spawn(str(SANTA), argv, env=env, dimensions=(50, 200), encoding="utf-8",
                          codec_errors="replace", timeout=20)
    child.expect(PROMPT)
    return child


def _flat(text: str) -> str:
    """Terminal output without escape sequences or whitespace (wrapping, padding and tab
    expansion do not matter; the characters do)."""
    return "".join(ANSI.sub("", text).split())


def _run(child: pexpect.spawn, line: str) -> str:
    """Type ``line``, press Enter and return the output up to the next prompt."""
    child.send(line + "\r")
    child.expect(PROMPT)
    return child.before


def test_repl_session(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from santacli.completion import CompletionOptions
    from santacli.engine import Engine

    engine = Engine.load(str(tiny_checkpoint), device="cpu")
    opts = CompletionOptions(max_tokens=40)
    child = _spawn(tiny_checkpoint, tmp_path, "--max-tokens", "40")
    try:
        # left-to-right completion, streamed and then printed in full with a footer
        out = _run(child, "def add(a, b):")
        expected = engine.complete("def add(a, b):", opts).result
        assert _flat(visible(expected.text)) in _flat(out)
        assert f"stop: {expected.stop_reason}" in ANSI.sub("", out)

        # an option change applies to the next request
        out = _run(child, ":set mode line")
        assert "mode = 'line'" in ANSI.sub("", out)
        out = _run(child, "x = <CURSOR> + 1")
        infill = engine.infill("x = ", " + 1", opts, mode="line").result
        assert "mode: line" in ANSI.sub("", out) and "fim: psm" in ANSI.sub("", out)
        assert _flat(visible(infill.text)) in _flat(out)

        out = _run(child, ":stats")
        assert "prompt_reused" in out and "stop_reason" in out

        # accept into the working buffer and continue from there
        _run(child, ":accept")
        out = _run(child, ":show")
        assert _flat(visible("x = " + infill.text) + "<CURSOR>" + "+1") in _flat(out)

        # multi-line input: Esc Enter inserts a newline instead of running
        child.send("def f():\x1b\r    return")
        child.send("\r")
        child.expect(PROMPT)
        out = child.before
        again = engine.infill("x = " + infill.text + "def f():\n    return", " + 1", opts, mode="line").result
        assert _flat(visible(again.text)) in _flat(out)

        out = _run(child, ":set bogus 1")
        assert "unknown option" in out
        _run(child, ":clear")
        child.sendcontrol("d")  # Ctrl-D on an empty line quits
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, child.before
    history = (tmp_path / "data" / "santacli" / "repl_history").read_text()
    assert "def add(a, b):" in history and ":set mode line" in history


@pytest.fixture(scope="module")
def slow_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A model with a long context whose special tokens can never win, so generation runs to
    max_tokens: slow enough to interrupt (~19M parameters: the native decode step makes a
    2-layer toy generate 2,000 tokens in a fraction of a second)."""
    from checkpoints import random_state, tiny_config, write_checkpoint

    shape = {"n_positions": 2048, "n_embd": 512, "n_layer": 6, "n_head": 8}
    cfg = tiny_config(**shape, vocab_size=tokenizer.get_vocab_size(with_added_tokens=True))
    state = random_state(cfg)
    # logits are ln_f(h) @ wte.T; LayerNorm's output has zero mean, so with a uniform weight and a
    # +3 bias every special's row of -1 scores exactly -3 * n_embd, far below the others
    state["transformer.ln_f.weight"].fill_(1.0)
    state["transformer.ln_f.bias"].fill_(3.0)
    state["transformer.wte.weight"][:5] = -1.0
    return write_checkpoint(tmp_path_factory.mktemp("slow") / "model", tokenizer=tokenizer, state=state, **shape)


def test_repl_ctrl_c_cancels_generation(slow_checkpoint: Path, tmp_path: Path) -> None:
    FileHistory = pytest.importorskip("prompt_toolkit.history").FileHistory

    # an earlier session's history, where the REPL looks for it by default
    history = tmp_path / "data" / "santacli" / "repl_history"
    history.parent.mkdir(parents=True)
    FileHistory(str(history)).append_string(":set max_tokens 2000")
    child = _spawn(slow_checkpoint, tmp_path, "--max-tokens", "5")
    try:
        child.send("\x1b[A")  # Up recalls it
        out = _run(child, "")
        assert "max_tokens = 2000" in out
        _run(child, ":set mode full")
        child.send("def add(a, b):\r")
        child.expect(re.escape("\x1b[?2004l"))  # the input was submitted
        time.sleep(1.0)  # generating 2000 tokens takes several seconds; interrupt midway
        child.sendintr()
        child.expect(r"(\d+) tokens · stop: cancelled")
        assert int(child.match.group(1)) < 2000
        assert "cancelled with Ctrl-C" in child.readline()
        child.expect(PROMPT)
        # the session goes on: Ctrl-C at the prompt only clears the input
        child.send("half typed")
        child.sendintr()
        child.expect(PROMPT)
        out = _run(child, ":set max_tokens 5")
        assert "max_tokens = 5" in out
        out = _run(child, "x = 1")
        assert "5 tokens · stop: max_tokens" in ANSI.sub("", out)
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_keys_typed_while_loading_are_not_echoed(tiny_checkpoint: Path, tmp_path: Path) -> None:
    pytest.importorskip("prompt_toolkit")
    if not SANTA.exists():
        pytest.skip("the santa console script is not installed in this environment")
    env = dict(os.environ, TERM="xterm-256color", PROMPT_TOOLKIT_NO_CPR="1", XDG_DATA_HOME=str(tmp_path / "data"),
               COLUMNS="200", LINES="50")
    child = pexpect.spawn(str(SANTA), ["repl", "--model", str(tiny_checkpoint), "--device", "cpu"], env=env,
                          dimensions=(50, 200), encoding="utf-8", codec_errors="replace", timeout=20)
    try:
        child.expect("Loading")  # torch imports and the model loads (seconds on a real model)
        child.send("\x1b[Axy")  # an arrow key and two letters meanwhile
        child.expect(PROMPT)
        assert "^[[A" not in child.before and "xy" not in ANSI.sub("", child.before)
        child.expect("xy")  # the typed-ahead text lands in the prompt's input instead
    finally:
        child.sendcontrol("d")
        child.close(force=True)
