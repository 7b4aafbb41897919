"""Editor plugins in the real editors (headless Vim, Neovim and Emacs): open a file, ask for a
suggestion at a cursor, wait for the asynchronous job, accept, save, and compare the file with
prefix + completion + suffix. Once through the CLI (with a dead server URL, so the fallback is
exercised too) against a tiny checkpoint, once against a fake HTTP server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "completions"
SANTA = Path(sys.executable).with_name("santa")
TEXT = "def add(a, b):\n    return a + b\n"
MAX_TOKENS = 24


@dataclass
class Job:
    """One editor run: where to put the cursor and how the plugin reaches santa."""

    file: Path
    line: int  # 1-based
    col: int  # 1-based, bytes (the file is ASCII)
    model: Path
    server: str  # "" = CLI only
    state: Path  # the script writes state, last error and suggestion here
    edit_while_waiting: bool = False  # change line 1 right after asking: the reply must be dropped


def _q(value: object) -> str:
    """A Vim/Lua/Elisp string literal (JSON's escapes are valid in all three for these paths)."""
    return json.dumps(str(value))


def vim_script(job: Job) -> str:
    return f"""
set rtp^={PLUGINS / 'vim'}
runtime plugin/santa.vim
let g:santa_command = {_q(SANTA)}
let g:santa_model = {_q(job.model)}
let g:santa_server = {_q(job.server)}
let g:santa_max_tokens = {MAX_TOKENS}
let g:santa_args = ['--device', 'cpu']
edit {job.file}
call cursor({job.line}, {job.col})
call santa#complete()
{"call setline(1, '# edited')" if job.edit_while_waiting else ""}
let i = 0
while santa#state() ==# 'running' && i < 500
  sleep 50m
  let i += 1
endwhile
call writefile([santa#state(), santa#last_error(), json_encode(santa#suggestion())], {_q(job.state)})
call santa#accept()
write
qall!
"""


def lua_script(job: Job) -> str:
    return f"""
vim.opt.rtp:prepend({_q(PLUGINS / 'nvim')})
local santa = require("santa")
santa.setup({{ command = {_q(SANTA)}, model = {_q(job.model)}, server = {_q(job.server)},
              max_tokens = {MAX_TOKENS}, args = {{ "--device", "cpu" }} }})
vim.cmd("edit " .. {_q(job.file)})
vim.api.nvim_win_set_cursor(0, {{ {job.line}, {job.col - 1} }})
santa.complete()
{'vim.api.nvim_buf_set_lines(0, 0, 1, false, { "# edited" })' if job.edit_while_waiting else ""}
vim.wait(25000, function() return santa.state() ~= "running" end, 50)
vim.fn.writefile({{ santa.state(), santa.last_error or "", vim.fn.json_encode(santa.suggestion()) }}, {_q(job.state)})
santa.accept()
vim.cmd("write")
vim.cmd("qall!")
"""


def elisp_script(job: Job) -> str:
    server = _q(job.server) if job.server else "nil"
    return f"""
(add-to-list 'load-path {_q(PLUGINS / 'emacs')})
(require 'santa)
(setq santa-command {_q(SANTA)} santa-model {_q(job.model)} santa-server {server}
      santa-max-tokens {MAX_TOKENS} santa-args '("--device" "cpu"))
(find-file {_q(job.file)})
(goto-char (point-min))
(forward-line {job.line - 1})
(forward-char {job.col - 1})
(santa-complete)
{'(save-excursion (goto-char (point-min)) (delete-region (point) (line-end-position)) (insert "# edited"))' if job.edit_while_waiting else ""}
(let ((deadline (+ (float-time) 25)))
  (while (and (eq (santa-state) 'running) (< (float-time) deadline))
    (accept-process-output nil 0.05)))
(with-temp-file {_q(job.state)}
  (insert (format "%s\\n%s\\n%s\\n" (santa-state) (or santa-last-error "") (json-encode (or (santa-suggestion) "")))))
(santa-accept)
(save-buffer)
"""


@dataclass
class Editor:
    name: str
    binary: str
    script: Callable[[Job], str]
    suffix: str  # script file extension
    argv: Callable[[str, Path], list[str]]


EDITORS = {
    "vim": Editor("vim", "vim", vim_script, ".vim", lambda exe, s: [exe, "-Nu", "NONE", "-i", "NONE", "-es", "-S", str(s)]),
    "nvim-vimscript": Editor("nvim-vimscript", "nvim", vim_script, ".vim",
                             lambda exe, s: [exe, "--headless", "-u", "NONE", "-i", "NONE", "-S", str(s)]),
    "nvim-lua": Editor("nvim-lua", "nvim", lua_script, ".lua",
                       lambda exe, s: [exe, "--headless", "-u", "NONE", "-i", "NONE", "-c", f"luafile {s}"]),
    "emacs": Editor("emacs", "emacs", elisp_script, ".el", lambda exe, s: [exe, "--batch", "-Q", "-l", str(s)]),
}


def run_editor(editor: Editor, job: Job, tmp_path: Path) -> list[str]:
    exe = shutil.which(editor.binary)
    if exe is None:
        pytest.skip(f"{editor.binary} is not installed")
    script = tmp_path / f"drive{editor.suffix}"
    script.write_text(editor.script(job))
    done = subprocess.run(editor.argv(exe, script), cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert job.state.exists(), f"{editor.name} did not finish the script:\n{done.stdout}\n{done.stderr}"
    return job.state.read_text().split("\n")


def split_at(text: str, line: int, col: int) -> tuple[str, str]:
    offset = sum(len(x) + 1 for x in text.split("\n")[: line - 1]) + col - 1
    return text[:offset], text[offset:]


def cli_completion(model: Path, prefix: str, suffix: str) -> str:
    """What `santa infill --json` says for this input: the plugins must insert exactly this."""
    marker = "<TEST-CURSOR>"
    done = subprocess.run([str(SANTA), "infill", "--json", "--model", str(model), "--max-tokens", str(MAX_TOKENS),
                           "--device", "cpu", "--path", "prog.py", "--marker", marker],
                          input=(prefix + marker + suffix).encode(), capture_output=True, check=True, timeout=60)
    return json.loads(done.stdout)["completion"]


def _dead_port() -> int:
    with ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler) as server:
        return server.server_address[1]


@pytest.fixture(scope="module")
def santa_cli() -> None:
    if not SANTA.exists():
        pytest.skip("the santa console script is not installed in this environment")


CLI_CURSOR = (2, 12)  # mid-line, after "return "


@pytest.fixture(scope="module")
def cli_expected(santa_cli: None, tiny_checkpoint: Path) -> str:
    expected = cli_completion(tiny_checkpoint, *split_at(TEXT, *CLI_CURSOR))
    assert expected, "the tiny model should suggest something here"
    return expected


@pytest.mark.parametrize("editor", list(EDITORS))
def test_accepts_cli_completion(editor: str, cli_expected: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    line, col = CLI_CURSOR
    prefix, suffix = split_at(TEXT, line, col)
    expected = cli_expected
    file = tmp_path / "prog.py"
    file.write_text(TEXT)
    # a server URL where nothing listens: the plugin must fall back to the CLI
    job = Job(file, line, col, tiny_checkpoint, f"http://127.0.0.1:{_dead_port()}", tmp_path / "state.txt")
    state, error, suggestion = run_editor(EDITORS[editor], job, tmp_path)[:3]
    assert (state, error) == ("shown", ""), (state, error)
    assert json.loads(suggestion) == expected
    assert file.read_bytes().decode() == prefix + expected + suffix


class FakeServer(ThreadingHTTPServer):
    """Answers like `santa serve` with a fixed multi-line completion and records requests."""

    completion = "sum(a, b)\n    # and more\n    "

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.error: tuple[int, dict] | None = None  # (status, body) to answer with instead
        super().__init__(("127.0.0.1", 0), FakeHandler)


class FakeHandler(BaseHTTPRequestHandler):
    server: FakeServer

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._reply(200, {"status": "ok"}) if self.path == "/health" else self._reply(404, {"error": "not found"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"url_path": self.path, **body})
        if self.server.error is not None:
            self._reply(*self.server.error)
            return
        text = self.server.completion
        self._reply(200, {"completion": text, "candidates": [text], "stop_reason": "eos", "mode": "block",
                          "tokens": {"prompt": 10, "generated": 5}, "timings": {}, "truncated": {}, "model": "fake"})

    def log_message(self, *args: object) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("editor", list(EDITORS))
def test_accepts_server_completion(editor: str, fake_server: FakeServer, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    line, col = 2, 12
    prefix, suffix = split_at(TEXT, line, col)
    file = tmp_path / "prog.py"
    file.write_text(TEXT)
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    # the model path must not be used: the server answers
    job = Job(file, line, col, tmp_path / "no-model", url, tmp_path / "state.txt")
    state, error, suggestion = run_editor(EDITORS[editor], job, tmp_path)[:3]
    assert (state, error) == ("shown", ""), (state, error)
    assert json.loads(suggestion) == FakeServer.completion
    assert file.read_text() == prefix + FakeServer.completion + suffix
    [request] = fake_server.requests
    assert (request["url_path"], request["path"]) == ("/infill", "prog.py")
    assert (request["prefix"], request["suffix"]) == (prefix, suffix)
    assert request["max_tokens"] == MAX_TOKENS


@pytest.mark.parametrize("editor", list(EDITORS))
def test_reports_a_server_error_without_falling_back_to_the_cli(editor: str, fake_server: FakeServer,
                                                               tmp_path: Path) -> None:
    """A busy server is up: its message is shown, and no CLI run (a second model load) starts."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    fake_server.error = (503, {"error": {"message": "server is busy (17 requests in progress or queued); "
                                                    "retry later", "type": "overloaded"}})
    file = tmp_path / "prog.py"
    file.write_text(TEXT)
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    # A CLI fallback would fail on this model path with a different message.
    job = Job(file, 2, 12, tmp_path / "no-model", url, tmp_path / "state.txt")
    state, error, suggestion = run_editor(EDITORS[editor], job, tmp_path)[:3]
    assert error == "santa: server: server is busy (17 requests in progress or queued); retry later"
    assert (state, json.loads(suggestion)) == ("idle", "")
    assert len(fake_server.requests) == 1
    assert file.read_text() == TEXT


@pytest.mark.parametrize("editor", list(EDITORS))
def test_drops_a_reply_for_changed_text(editor: str, fake_server: FakeServer, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    file = tmp_path / "prog.py"
    file.write_text(TEXT)
    url = f"http://127.0.0.1:{fake_server.server_address[1]}"
    job = Job(file, 2, 12, tmp_path / "no-model", url, tmp_path / "state.txt", edit_while_waiting=True)
    state, error, suggestion = run_editor(EDITORS[editor], job, tmp_path)[:3]
    assert len(fake_server.requests) == 1  # the request went out ...
    assert (state, error, json.loads(suggestion)) == ("idle", "", "")  # ... but nothing is shown
    assert file.read_text() == "# edited\n    return a + b\n"  # and accept inserts nothing


@pytest.fixture(scope="module")
def real_server(santa_cli: None, tiny_checkpoint: Path) -> Iterator[str]:
    """`santa serve` on the tiny checkpoint; skips while the server cannot start."""
    import time
    import urllib.request

    port = _dead_port()
    proc = subprocess.Popen([str(SANTA), "serve", "--model", str(tiny_checkpoint), "--device", "cpu",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 25
        while True:
            if proc.poll() is not None:
                pytest.skip(f"santa serve did not start: {proc.stderr.read().decode()[-300:] if proc.stderr else ''}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as reply:
                    if json.load(reply).get("status") == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.skip("santa serve did not answer /health in time")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("editor", ["vim", "nvim-lua", "emacs"])
def test_accepts_real_server_completion(editor: str, real_server: str, cli_expected: str, tmp_path: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    line, col = CLI_CURSOR
    prefix, suffix = split_at(TEXT, line, col)
    file = tmp_path / "prog.py"
    file.write_text(TEXT)
    # a CLI fallback would fail on this model path, so a pass means the server answered
    job = Job(file, line, col, tmp_path / "no-model", real_server, tmp_path / "state.txt")
    state, error, suggestion = run_editor(EDITORS[editor], job, tmp_path)[:3]
    assert (state, error) == ("shown", ""), (state, error)
    assert json.loads(suggestion) == cli_expected  # greedy: the server and the CLI agree
    assert file.read_bytes().decode() == prefix + cli_expected + suffix
