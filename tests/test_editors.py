"""Editor plugins in the real editors (headless Vim, Neovim and Emacs): open a file, ask for a
suggestion at a cursor, wait for the asynchronous job, accept, save, and compare the file with
prefix + completion + suffix. Once through the CLI (with a dead server URL, so the fallback is
exercised too) against a tiny checkpoint, once against a fake HTTP server, once against a real
`santa serve` (also with an API key), and against a server that never answers (the timeout).
The default keys are pressed in real terminal editors under tmux."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import serving_in_thread

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
    api_key: str | None = None  # the plugin's own option (g:santa_api_key, api_key, santa-api-key)
    env_api_key: str | None = None  # $SANTA_API_KEY in the editor's environment (else unset)
    timeout: float | None = None  # the plugin's timeout option (None: its default)


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
{f"let g:santa_api_key = {_q(job.api_key)}" if job.api_key is not None else ""}
{f"let g:santa_timeout = {job.timeout}" if job.timeout is not None else ""}
edit {job.file}
call cursor({job.line}, {job.col})
let start = reltime()
call santa#complete()
{"call setline(1, '# edited')" if job.edit_while_waiting else ""}
let i = 0
while santa#state() ==# 'running' && i < 500
  sleep 50m
  let i += 1
endwhile
call writefile([santa#state(), santa#last_error(), json_encode(santa#suggestion()),
      \\ string(reltimefloat(reltime(start)))], {_q(job.state)})
call santa#accept()
write
qall!
"""


def lua_script(job: Job) -> str:
    return f"""
vim.opt.rtp:prepend({_q(PLUGINS / 'nvim')})
local santa = require("santa")
santa.setup({{ command = {_q(SANTA)}, model = {_q(job.model)}, server = {_q(job.server)},
              max_tokens = {MAX_TOKENS}, args = {{ "--device", "cpu" }},
              {f"api_key = {_q(job.api_key)}," if job.api_key is not None else ""}
              {f"timeout = {job.timeout}," if job.timeout is not None else ""} }})
vim.cmd("edit " .. {_q(job.file)})
vim.api.nvim_win_set_cursor(0, {{ {job.line}, {job.col - 1} }})
local start = vim.loop.hrtime()
santa.complete()
{'vim.api.nvim_buf_set_lines(0, 0, 1, false, { "# edited" })' if job.edit_while_waiting else ""}
vim.wait(25000, function() return santa.state() ~= "running" end, 50)
vim.fn.writefile({{ santa.state(), santa.last_error or "", vim.fn.json_encode(santa.suggestion()),
                   tostring((vim.loop.hrtime() - start) / 1e9) }}, {_q(job.state)})
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
{f"(setq santa-api-key {_q(job.api_key)})" if job.api_key is not None else ""}
{f"(setq santa-timeout {job.timeout})" if job.timeout is not None else ""}
(find-file {_q(job.file)})
(goto-char (point-min))
(forward-line {job.line - 1})
(forward-char {job.col - 1})
(setq santa-test-start (float-time))
(santa-complete)
{'(save-excursion (goto-char (point-min)) (delete-region (point) (line-end-position)) (insert "# edited"))' if job.edit_while_waiting else ""}
(let ((deadline (+ (float-time) 25)))
  (while (and (eq (santa-state) 'running) (< (float-time) deadline))
    (accept-process-output nil 0.05)))
(with-temp-file {_q(job.state)}
  (insert (format "%s\\n%s\\n%s\\n%s\\n" (santa-state) (or santa-last-error "")
                  (json-encode (or (santa-suggestion) "")) (- (float-time) santa-test-start))))
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


def editor_env(job: Job, tmpdir: Path | None = None) -> dict[str, str]:
    """The environment for an editor: $SANTA_API_KEY only when the job sets it."""
    env = {k: v for k, v in os.environ.items() if k != "SANTA_API_KEY"}
    if job.env_api_key is not None:
        env["SANTA_API_KEY"] = job.env_api_key
    if tmpdir is not None:  # where the editors (and so the plugins) put temporary files
        env["TMPDIR"] = str(tmpdir)
    return env


def run_editor(editor: Editor, job: Job, tmp_path: Path, *, tmpdir: Path | None = None,
               during: Callable[[], None] | None = None) -> list[str]:
    """Run the driver script; `during` runs while the editor does (the editor is killed if it fails).
    Returns the state file's lines: state, last error, suggestion (JSON), seconds the request took."""
    exe = shutil.which(editor.binary)
    if exe is None:
        pytest.skip(f"{editor.binary} is not installed")
    script = tmp_path / f"drive{editor.suffix}"
    script.write_text(editor.script(job))
    with subprocess.Popen(editor.argv(exe, script), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, stdin=subprocess.DEVNULL, env=editor_env(job, tmpdir)) as proc:
        try:
            if during is not None:
                during()
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert job.state.exists(), f"{editor.name} did not finish the script:\n{stdout}\n{stderr}"
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
    with serving_in_thread(FakeServer()) as server:
        yield server


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


@contextmanager
def santa_serve(model: Path, api_key: str | None = None) -> Iterator[str]:
    """`santa serve` on `model`, keyed through $SANTA_API_KEY when `api_key` is given (so the key is
    not on any command line the tests look at); skips while the server cannot start."""
    import urllib.request

    port = _dead_port()
    env = {k: v for k, v in os.environ.items() if k != "SANTA_API_KEY"}
    if api_key is not None:
        env["SANTA_API_KEY"] = api_key
    proc = subprocess.Popen([str(SANTA), "serve", "--model", str(model), "--device", "cpu",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
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


@pytest.fixture(scope="module")
def real_server(santa_cli: None, tiny_checkpoint: Path) -> Iterator[str]:
    with santa_serve(tiny_checkpoint) as url:
        yield url


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


# -- the API key and the timeout ----------------------------------------------------------------

API_KEY = f"santa-test-key-{secrets.token_hex(8)}"  # unique, so finding it anywhere means it leaked
TIMEOUT_OPTION = {"vim": "g:santa_timeout", "nvim-vimscript": "g:santa_timeout", "nvim-lua": "timeout",
                  "emacs": "santa-timeout"}


def needs_curl() -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")


@pytest.fixture(scope="module")
def keyed_server(santa_cli: None, tiny_checkpoint: Path) -> Iterator[str]:
    """`santa serve` that wants `Authorization: Bearer API_KEY`."""
    with santa_serve(tiny_checkpoint, api_key=API_KEY) as url:
        yield url


@pytest.mark.parametrize("how", ["env", "option"])
@pytest.mark.parametrize("editor", list(EDITORS))
def test_sends_the_api_key(editor: str, how: str, keyed_server: str, cli_expected: str, tmp_path: Path) -> None:
    """$SANTA_API_KEY, or the plugin's option, which wins over a (here wrong) $SANTA_API_KEY."""
    needs_curl()
    line, col = CLI_CURSOR
    prefix, suffix = split_at(TEXT, line, col)
    file = tmp_path / "prog.py"
    file.write_text(TEXT)
    key_option, key_env = (None, API_KEY) if how == "env" else (API_KEY, "wrong-key")
    # a CLI fallback would fail on this model path, so a pass means the server answered
    job = Job(file, line, col, tmp_path / "no-model", keyed_server, tmp_path / "state.txt",
              api_key=key_option, env_api_key=key_env)
    state, error, suggestion = run_editor(EDITORS[editor], job, tmp_path)[:3]
    assert (state, error) == ("shown", ""), (state, error)
    assert json.loads(suggestion) == cli_expected
    assert file.read_bytes().decode() == prefix + cli_expected + suffix


@pytest.mark.parametrize("key", [None, "wrong-key"])
@pytest.mark.parametrize("editor", list(EDITORS))
def test_reports_a_missing_or_wrong_api_key(editor: str, key: str | None, keyed_server: str,
                                            tmp_path: Path) -> None:
    """The server is up and says no: that is shown (with where the key goes), never retried through the CLI."""
    needs_curl()
    file = tmp_path / "prog.py"
    file.write_text(TEXT)
    # A CLI fallback would fail on this model path with a different message.
    job = Job(file, 2, 12, tmp_path / "no-model", keyed_server, tmp_path / "state.txt", env_api_key=key)
    state, error, suggestion = run_editor(EDITORS[editor], job, tmp_path)[:3]
    assert error.startswith("santa: server: missing or wrong API key"), error
    assert "SANTA_API_KEY" in error  # the message says how to fix it
    assert (state, json.loads(suggestion)) == ("idle", "")
    assert file.read_text() == TEXT


class SilentServer:
    """Accepts connections and reads the request, then never answers: a stalled server."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[bytes] = []  # what arrived (headers and whatever body came with them)
        self.received = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.conns.append(conn)
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except OSError:
            pass
        self.requests.append(data)
        self.received.set()  # and keep the connection open, silent

    def drop(self) -> None:
        """Close the connections without a word (a server that crashed mid-request)."""
        for conn in self.conns:
            conn.close()

    def close(self) -> None:
        self.sock.close()
        self.drop()


@pytest.fixture
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


def command_lines() -> list[str]:
    """Every process's command line, as any user can read it: `ps -eww -o args` and /proc."""
    lines = []
    if shutil.which("ps"):
        lines += subprocess.run(["ps", "-eww", "-o", "args="], capture_output=True, text=True).stdout.splitlines()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            lines.append(cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:  # gone meanwhile
            pass
    return lines


def waits_for(server: SilentServer) -> None:
    assert server.received.wait(20), "the plugin sent no request"


@pytest.mark.parametrize("editor", list(EDITORS))
def test_gives_up_on_a_server_that_never_answers(editor: str, silent_server: SilentServer, tmp_path: Path) -> None:
    """The timeout option bounds the wait; it is reported like a server error, with no CLI run."""
    needs_curl()
    file = tmp_path / "prog.py"
    file.write_text(TEXT)
    # A CLI fallback would fail on this model path with a different message.
    job = Job(file, 2, 12, tmp_path / "no-model", silent_server.url, tmp_path / "state.txt", timeout=2)
    state, error, suggestion, seconds = run_editor(EDITORS[editor], job, tmp_path)[:4]
    assert error == f"santa: server: no reply within 2 s ({TIMEOUT_OPTION[editor]})"
    assert (state, json.loads(suggestion)) == ("idle", "")
    assert 1.9 <= float(seconds) < 8, seconds  # the driver waits up to 25 s: the plugin gave up
    assert len(silent_server.requests) == 1
    assert file.read_text() == TEXT


@pytest.mark.parametrize("editor", list(EDITORS))
def test_default_timeout_and_a_dropped_connection(editor: str, silent_server: SilentServer, tmp_path: Path) -> None:
    """curl gets --max-time 10 by default; a server that hangs up is reported, not retried through the CLI."""
    needs_curl()
    file = tmp_path / "prog.py"
    file.write_text(TEXT)
    job = Job(file, 2, 12, tmp_path / "no-model", silent_server.url, tmp_path / "state.txt")

    def check_curl_then_hang_up() -> None:
        waits_for(silent_server)
        [curl] = [c for c in command_lines() if silent_server.url in c and "curl" in c][:1]
        assert " --max-time 10 " in f" {curl} ", curl
        silent_server.drop()

    state, error, suggestion, seconds = run_editor(EDITORS[editor], job, tmp_path, during=check_curl_then_hang_up)[:4]
    assert error == "santa: server: Empty reply from server"
    assert (state, json.loads(suggestion)) == ("idle", "")
    assert float(seconds) < 8, seconds
    assert file.read_text() == TEXT


@pytest.mark.parametrize("editor", list(EDITORS))
def test_the_api_key_stays_off_command_lines(editor: str, silent_server: SilentServer, tmp_path: Path) -> None:
    """While a request runs, the key is in no process's arguments (ps shows those to every user); it
    travels in a mode-0600 header file that is gone afterwards, and reaches the server as a header."""
    needs_curl()
    file = tmp_path / "prog.py"
    file.write_text(TEXT)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    job = Job(file, 2, 12, tmp_path / "no-model", silent_server.url, tmp_path / "state.txt",
              env_api_key=API_KEY, timeout=3)

    def key_files() -> list[Path]:
        return [f for f in tmpdir.rglob("*") if f.is_file() and API_KEY.encode() in f.read_bytes()]

    def check_while_curl_waits() -> None:
        waits_for(silent_server)  # curl is now connected and waiting for the reply
        lines = command_lines()
        assert any(silent_server.url in line and "curl" in line for line in lines), "no curl running"
        assert not [line for line in lines if API_KEY in line]
        files = key_files()
        assert files, "the key should be in a temporary header file while curl runs"
        assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)

    state, error = run_editor(EDITORS[editor], job, tmp_path, tmpdir=tmpdir, during=check_while_curl_waits)[:2]
    assert f"\r\nAuthorization: Bearer {API_KEY}\r\n".encode() in silent_server.requests[0]
    assert error == f"santa: server: no reply within 3 s ({TIMEOUT_OPTION[editor]})"
    assert state == "idle"
    assert key_files() == []


# -- the default keys, in terminal editors -----------------------------------------------------


def test_terminal_vim_maps_only_keys_that_work_there(tmp_path: Path) -> None:
    r"""Terminal Vim gets Alt-\ as Esc \ (leaving insert mode), and a <M-\> mapping there would catch
    typing 'Ü' instead: Ctrl-G s is the key. Neovim tells Alt-\ apart, so it maps both."""
    out = tmp_path / "maps.txt"
    script = tmp_path / "maps.vim"
    script.write_text(f"""
set rtp^={PLUGINS / 'vim'}
runtime plugin/santa.vim
call writefile([maparg('<C-g>s', 'i'), maparg('<M-\\>', 'i')], {_q(out)})
qall!
""")
    for binary, argv, alt in [("vim", ["-Nu", "NONE", "-i", "NONE", "-es"], ""),
                              ("nvim", ["--headless", "-u", "NONE", "-i", "NONE"], "<Plug>(santa-complete)")]:
        exe = shutil.which(binary)
        if exe is None:
            continue
        subprocess.run([exe, *argv, "-S", str(script)], cwd=tmp_path, capture_output=True, timeout=30,
                       stdin=subprocess.DEVNULL, check=False)
        assert out.read_text().split("\n")[:2] == ["<Plug>(santa-complete)", alt], binary


class TmuxEditor:
    """One editor in a terminal: a private tmux server (its own socket, so nothing else is touched)."""

    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path) -> None:
        self.socket = f"santa-editor-test-{os.getpid()}-{secrets.token_hex(4)}"
        self._tmux("new-session", "-d", "-s", "t", "-x", "100", "-y", "30", "-c", str(cwd),
                   "env", *(f"{k}={v}" for k, v in env.items()), *argv, env=env)

    def _tmux(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], capture_output=True,
                              text=True, check=True, env=env)
        return done.stdout

    def send(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", "t", *(["-l"] if literal else []), *keys)
        time.sleep(0.3)  # let the editor take them in before the next ones (Esc vs Alt)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, text: str, what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while text not in (screen := self.screen()):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{screen}")
            time.sleep(0.1)

    def running(self) -> bool:
        return subprocess.run(["tmux", "-L", self.socket, "has-session", "-t", "t"], capture_output=True).returncode == 0

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


def terminal_setup(editor: str, url: str, file: Path, tmp_path: Path) -> tuple[list[str], list[str]]:
    """argv for `editor` in a terminal with the plugin set up and the cursor at 2,12 (before the
    first `a` of `return a + b`), and the default key that asks."""
    if editor in ("vim", "nvim-vimscript"):
        init = tmp_path / "init.vim"
        init.write_text(f"set nocompatible\nset rtp^={PLUGINS / 'vim'}\nruntime plugin/santa.vim\n"
                        f"let g:santa_server = {_q(url)}\nlet g:santa_command = 'false'\n")
        exe = "vim" if editor == "vim" else "nvim"
        return [exe, "-u", str(init), "--noplugin", "-i", "NONE", "+call cursor(2, 12)", str(file)], \
            ["i", "C-g", "s"] if editor == "vim" else ["i", "M-\\"]
    if editor == "nvim-lua":
        init = tmp_path / "init.lua"
        init.write_text(f"vim.opt.rtp:prepend({_q(PLUGINS / 'nvim')})\n"
                        f"require('santa').setup({{ server = {_q(url)}, command = 'false' }})\n")
        return ["nvim", "-u", str(init), "--noplugin", "-i", "NONE", "+call cursor(2, 12)", str(file)], ["i", "M-\\"]
    init = tmp_path / "init.el"
    init.write_text(f"(add-to-list 'load-path {_q(PLUGINS / 'emacs')})\n(require 'santa)\n"
                    f"(setq santa-server {_q(url)} santa-command \"false\")\n"
                    f"(find-file {_q(file)})\n(forward-line 1)\n(forward-char 11)\n(santa-mode 1)\n")
    return ["emacs", "-nw", "-Q", "-l", str(init)], ["M-\\"]


@pytest.mark.parametrize("editor", list(EDITORS))
def test_default_keys_in_a_terminal(editor: str, fake_server: FakeServer, tmp_path: Path) -> None:
    r"""Ask with the documented default key (terminal Vim: Ctrl-G s; Neovim, Emacs: Alt-\), see the
    suggestion, accept it with Tab, keep typing, save."""
    needs_curl()
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    if shutil.which(EDITORS[editor].binary) is None:
        pytest.skip(f"{EDITORS[editor].binary} is not installed")
    file = tmp_path / "prog.py"
    file.write_text(TEXT)
    prefix, suffix = split_at(TEXT, 2, 12)
    argv, ask = terminal_setup(editor, f"http://127.0.0.1:{fake_server.server_address[1]}", file, tmp_path)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8", "TERM": "xterm-256color"}
    term = TmuxEditor(argv, env, tmp_path)
    try:
        term.wait_for("return a + b", "the file on screen")
        term.send(*ask)
        term.wait_for("sum(a, b)", "the suggestion on screen")
        # Tab accepts; then type on: Vim still in insert mode (and 'Ü' is a plain character)
        term.send("Tab")
        term.send("Ü", literal=True)
        if editor == "emacs":
            term.send("C-x", "C-s")
            term.send("C-x", "C-c")
        else:
            term.send("Escape")
            term.send(":wq", "Enter")
        deadline = time.monotonic() + 10
        while term.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not term.running(), f"{editor} did not exit:\n{term.screen()}"
    finally:
        term.kill()
    assert len(fake_server.requests) == 1
    assert file.read_text() == prefix + FakeServer.completion + "Ü" + suffix
