"""Shell completion scripts: in sync with the Typer app, and working in real bash, zsh and fish
(driven through tmux, so TAB goes through each shell's own completion machinery)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPLETIONS = ROOT / "completions"
BIN = Path(sys.executable).parent


def _generator():
    spec = importlib.util.spec_from_file_location("santa_completions_generate", COMPLETIONS / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_committed_scripts_match_the_app(shell: str) -> None:
    gen = _generator()
    committed = (COMPLETIONS / gen.FILES[shell]).read_text()
    assert committed == gen.render(shell), "run: python completions/generate.py"


def test_generate_check_mode() -> None:
    done = subprocess.run([sys.executable, str(COMPLETIONS / "generate.py"), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- real shells ------------------------------------------------------------------------------


class Tmux:
    """One shell in a private tmux server (its own socket, so nothing else is touched)."""

    def __init__(self, argv: list[str], env: dict[str, str], socket: str) -> None:
        self.socket = socket
        env_args = [f"{k}={v}" for k, v in env.items()]
        self._tmux("new-session", "-d", "-s", "t", "-x", "160", "-y", "40", "env", "-i", *env_args, *argv)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args],
                              capture_output=True, text=True, check=True)
        return done.stdout

    def send(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", "t", *(["-l"] if literal else []), *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def wait_for(self, check: Callable[[str], bool], what: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; screen:\n{screen}")
            time.sleep(0.1)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True)


SETUP = {
    # shell argv, then the line that loads the committed script the way README.md ("Shell, REPL and editors") says
    "bash": (["bash", "--norc", "--noprofile", "-i"],
             f"PS1='READY$ '; source {COMPLETIONS}/santa.bash"),
    "zsh": (["zsh", "-f", "-i"],
            f"PS1='READY$ '; fpath=({COMPLETIONS} $fpath); autoload -Uz compinit; compinit -u -D"),
    "fish": (["fish", "--no-config", "-i"],
             f"function fish_prompt; echo -n 'READY$ '; end; source {COMPLETIONS}/santa.fish"),
}


@pytest.fixture
def shell_session(request, tmp_path: Path) -> Iterator[Tmux]:
    shell = request.param
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    if not (BIN / "santa").exists():
        pytest.skip("the santa console script is not installed in this environment")
    argv, setup = SETUP[shell]
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}", "HOME": str(home), "TERM": "xterm-256color",
           "LANG": "C.UTF-8", "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local/share"),
           "fish_greeting": ""}
    tmux = Tmux([shutil.which(shell) or shell, *argv[1:]], env, f"santa-test-{os.getpid()}-{shell}")
    try:
        tmux.send(setup, literal=True)
        tmux.send("Enter")
        tmux.wait_for(lambda s: s.rstrip().endswith("READY$"), "the prompt after setup")
        yield tmux
    finally:
        tmux.kill()


def _last_line(screen: str) -> str:
    lines = [line for line in screen.splitlines() if line.strip()]
    return lines[-1] if lines else ""


@pytest.mark.parametrize("shell_session", ["bash", "zsh", "fish"], indirect=True)
def test_tab_completes_commands_and_options(shell_session: Tmux) -> None:
    tmux = shell_session
    tmux.send("santa com", literal=True)
    tmux.send("Tab")
    tmux.wait_for(lambda s: "READY$ santa complete" in _last_line(s), "`santa com<TAB>` -> complete")

    tmux.send("C-u")  # clear the line (all three shells)
    tmux.send("santa complete --max", literal=True)
    tmux.send("Tab")
    tmux.wait_for(lambda s: "santa complete --max-tokens" in _last_line(s), "`--max<TAB>` -> --max-tokens")


@pytest.mark.parametrize("shell_session", ["bash", "zsh", "fish"], indirect=True)
def test_tab_completes_option_values_and_models(shell_session: Tmux) -> None:
    tmux = shell_session
    tmux.send("santa complete --mode bl", literal=True)
    tmux.send("Tab")
    tmux.wait_for(lambda s: "santa complete --mode block" in _last_line(s), "`--mode bl<TAB>` -> block")
    tmux.send("C-u")
    tmux.send("santa info santacoder-o", literal=True)
    tmux.send("Tab")
    tmux.wait_for(lambda s: "santa info santacoder-original" in _last_line(s), "a model alias")


def test_descriptions_have_no_apostrophes():
    """zsh completion shows command and option help inside single quotes, where an apostrophe is
    lost (Typer writes it as '', which zsh only reads as one with RC_QUOTES)."""
    import typer.main

    from santacli.cli.app import app

    def walk(command, path):
        yield path, command.help or ""
        for param in command.params:
            yield f"{path} {param.name}", getattr(param, "help", None) or ""
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    found = [(where, text) for where, text in walk(typer.main.get_command(app), "santa")
             if "'" in text.split("\n")[0] and where != "santa"]
    assert not found


@pytest.mark.parametrize("target", ["bash", "zsh", "fish", "vim", "neovim", "emacs"])
def test_setup_points_at_the_installed_scripts_and_plugins(target, capsys, monkeypatch):
    from santacli.cli import app

    assert app.main(["setup", target, "--path"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert path.exists()
    wanted = {"bash": "santa.bash", "zsh": "_santa", "fish": "santa.fish", "vim": "plugin/santa.vim",
              "neovim": "lua/santa/init.lua", "emacs": "santa.el"}[target]
    assert (path / wanted).is_file() if path.is_dir() else path.name == wanted
    assert app.main(["setup", target]) == 0
    assert str(path) in capsys.readouterr().out  # the line to add names the same place


def test_setup_bash_line_turns_completion_on(capsys):
    if shutil.which("bash") is None:
        pytest.skip("bash is not installed")
    from santacli.cli import app

    assert app.main(["setup", "bash"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    done = subprocess.run(["bash", "-c", f"{line} && complete -p santa"], capture_output=True, text=True)
    assert done.returncode == 0 and "_santa_completion" in done.stdout
