"""``santa lsp`` in real editors, driven through tmux as a user would: Neovim's built-in client
(``vim.lsp.start``, or ``start_client`` before 0.8, with omnifunc completion, ``<C-x><C-o>``)
and Emacs's eglot (``M-x completion-at-point``). Each must insert exactly what
``Engine.infill`` gives at the cursor, after a word (the client filters by it) and after a
bracket (no word), then save the file. Skipped where tmux, the editor or eglot is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("pygls")

from test_completions import Tmux

MAX_TOKENS = 24
# (document, 0-based line, column at the end of that line); the tiny model says something
# printable at both (asserted below, so a changed model fails loudly instead of testing nothing)
CASES = {
    "after-a-word": ("for i in range(10):\n    prin\n", 1),
    "after-a-bracket": ("def add(a, b)\n    return a + b\n", 0),
}
DEBIAN_ELPA = "/usr/share/emacs/site-lisp/elpa"


def _q(value: object) -> str:
    """A Lua/Elisp string literal (JSON's escapes are valid in both for these values)."""
    return json.dumps(str(value))


def server_argv(checkpoint: Path) -> list[str]:
    return [sys.executable, "-m", "santacli", "lsp", "--model", str(checkpoint), "--device", "cpu",
            "--max-tokens", str(MAX_TOKENS)]


@dataclass
class Session:
    """One editor in tmux on ``file``; ``ready`` appears once its LSP client is attached."""

    folder: Path
    file: Path
    ready: Path
    checkpoint: Path
    line: int  # 0-based
    column: int  # 0-based, at the end of the line


def nvim_setup(s: Session) -> tuple[str, list[str]]:
    args = ", ".join(_q(a) for a in server_argv(s.checkpoint))
    lua = f"""
local config = {{
  name = "santa",
  cmd = {{ {args} }},
  root_dir = {_q(s.folder)},
  init_options = {{ santa = {{ budgetMs = 60000, mode = "line" }} }},
  on_init = function() vim.fn.writefile({{ "ready" }}, {_q(s.ready)}) end,
}}
if vim.lsp.start then
  vim.lsp.start(config)
else  -- Neovim 0.7
  vim.lsp.buf_attach_client(0, vim.lsp.start_client(config))
end
vim.bo.omnifunc = "v:lua.vim.lsp.omnifunc"
vim.api.nvim_win_set_cursor(0, {{ {s.line + 1}, 0 }})
"""
    script = s.folder / "setup.lua"
    script.write_text(lua)
    return "nvim", ["nvim", "-u", "NONE", "-i", "NONE", "-n", "-c", f"luafile {script}", str(s.file)]


def nvim_keys(tmux: Tmux) -> None:
    tmux.send("A", "C-x", "C-o")  # append at the end of the line, then omni completion


def nvim_save(tmux: Tmux) -> None:
    # A single match is inserted without a menu (no 'menuone'): leave insert mode and save.
    tmux.send("Escape")
    tmux.send(":wq", literal=True)
    tmux.send("Enter")


def emacs_setup(s: Session) -> tuple[str, list[str]]:
    program = " ".join(_q(a) for a in server_argv(s.checkpoint))
    elisp = f"""
(setq package-directory-list '({_q(DEBIAN_ELPA)}))
(package-initialize)
(require 'eglot)
(setq confirm-kill-processes nil make-backup-files nil
      jsonrpc-default-request-timeout 60)  ; the first request waits for the model to load
(setq eglot-server-programs
      '((python-mode {program} :initializationOptions (:santa (:budgetMs 60000 :mode "line")))))
(add-hook 'eglot-managed-mode-hook (lambda () (write-region "ready" nil {_q(s.ready)})))
(add-hook 'python-mode-hook #'eglot-ensure)
"""
    script = s.folder / "setup.el"
    script.write_text(elisp)
    return "emacs", ["emacs", "-nw", "-Q", "-l", str(script), f"+{s.line + 1}:{s.column + 1}", str(s.file)]


def emacs_keys(tmux: Tmux) -> None:
    tmux.send("M-x")
    tmux.send("completion-at-point", literal=True)
    tmux.send("Enter")


def emacs_save(tmux: Tmux) -> None:
    tmux.send("C-x", "C-s")
    tmux.send("C-x", "C-c")


EDITORS: dict[str, tuple[Callable[[Session], tuple[str, list[str]]], Callable[[Tmux], None], Callable[[Tmux], None]]] = {
    "neovim": (nvim_setup, nvim_keys, nvim_save),
    "emacs-eglot": (emacs_setup, emacs_keys, emacs_save),
}


def _has_eglot() -> bool:
    code = f"(progn (setq package-directory-list '({_q(DEBIAN_ELPA)})) (package-initialize) (require 'eglot))"
    done = subprocess.run(["emacs", "--batch", "-Q", "--eval", code], capture_output=True, timeout=60)
    return done.returncode == 0


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path):
    """The checkpoint loaded with `santa lsp`'s defaults: what the editors must insert."""
    from santacli.engine import Engine

    return Engine.load(str(tiny_checkpoint), device="cpu")


@pytest.fixture
def tmux_session(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[list[str]], Tmux]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TERM": "xterm-256color",
           "LANG": "C.UTF-8", "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local/share"),
           "XDG_STATE_HOME": str(home / ".local/state"), "XDG_CACHE_HOME": str(home / ".cache"),
           "SANTA_CONFIG": "/nonexistent/santa.toml", "SANTA_NO_HINT": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    sessions: list[Tmux] = []

    def start(argv: list[str]) -> Tmux:
        tmux = Tmux(argv, env, f"santa-lsp-test-{os.getpid()}-{len(sessions)}")
        sessions.append(tmux)
        return tmux

    try:
        yield start
    finally:
        for tmux in sessions:
            tmux.kill()


def _wait(check: Callable[[], bool], what: str, tmux: Tmux, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; screen:\n{tmux.screen()}")
        time.sleep(0.1)


# Both editors after a word, where clients filter by it; Neovim also with no word (an empty
# filterText), the case its omnifunc handles differently. (Each run loads a model: seconds.)
@pytest.mark.parametrize(("editor", "case"), [("neovim", "after-a-word"), ("emacs-eglot", "after-a-word"),
                                              ("neovim", "after-a-bracket")])
def test_editor_inserts_santas_completion(editor: str, case: str, tiny_checkpoint: Path, reference,
                                         tmux_session: Callable[[list[str]], Tmux], tmp_path: Path) -> None:
    setup, keys, save = EDITORS[editor]
    binary = "nvim" if editor == "neovim" else "emacs"
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed")
    if editor == "emacs-eglot" and not _has_eglot():
        pytest.skip("eglot is not installed (Debian: elpa-eglot)")

    text, line = CASES[case]
    lines = text.split("\n")
    column = len(lines[line])
    prefix = "\n".join(lines[:line + 1])
    suffix = text[len(prefix):]
    expected = reference.infill(prefix, suffix, max_tokens=MAX_TOKENS, mode="line").result.text
    assert expected and expected.isprintable(), f"the tiny model should suggest printable text here: {expected!r}"

    folder = tmp_path / "project"
    folder.mkdir()
    file = folder / "prog.py"
    file.write_text(text)
    session = Session(folder, file, tmp_path / "ready", tiny_checkpoint, line, column)
    _, argv = setup(session)
    tmux = tmux_session(argv)
    _wait(session.ready.exists, f"{editor}'s LSP client to attach", tmux)

    keys(tmux)
    completed = lines[line] + expected
    _wait(lambda: completed in [row.rstrip() for row in tmux.screen().splitlines()], "the completion", tmux)
    save(tmux)
    want = prefix + expected + suffix
    _wait(lambda: file.read_text() == want, "the saved file", tmux, timeout=20)
