"""The per-user daemon: a private Unix socket, the same completions as a local run without
importing torch, the model a request names, idle exit, start/stop/status."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

from checkpoints import write_checkpoint

SANTA = [sys.executable, "-m", "santacli"]
SOURCE = b"def add(a, b):\n    return <CURSOR>\n\nprint(add(1, 2))\n"


def santa(env: dict[str, str], *args: str, stdin: bytes | None = None, check: bool = True
          ) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run([*SANTA, *args], input=stdin, capture_output=True, env=env, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(done.stderr.decode())
    return done


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    runtime = tmp_path / "run"
    environ = {**os.environ, "SANTA_RUNTIME_DIR": str(runtime), "SANTA_NO_HINT": "1",
               "SANTA_CONFIG": "/nonexistent/santa.toml"}
    yield environ
    santa(environ, "daemon", "stop", check=False)


def test_daemon_answers_like_a_local_run_without_torch(env: dict[str, str], tiny_checkpoint: Path,
                                                      tmp_path: Path) -> None:
    model = str(tiny_checkpoint)
    args = ["infill", "--model", model, "--max-tokens", "8", "--mode", "full", "--json"]
    local = json.loads(santa(env | {"SANTA_DAEMON": "off"}, *args, stdin=SOURCE).stdout)
    assert santa(env, "daemon", "status", check=False).returncode == 1

    santa(env, "daemon", "start", "--model", model, "--idle-minutes", "5")
    folder = Path(env["SANTA_RUNTIME_DIR"])
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((folder / "daemon.sock").stat().st_mode) == 0o600
    status = json.loads(santa(env, "daemon", "status", "--json").stdout)
    assert status["spec"]["model"] == model

    # Through the daemon: the same completion, and this process never imports torch.
    code = ("import sys; from santacli.cli.app import main\n"
            f"code = main({args!r})\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], input=SOURCE, capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    remote = json.loads(done.stdout)
    assert remote["completion"] == local["completion"] and remote["stop_reason"] == local["stop_reason"]

    # A request for another model: the daemon loads it, and its answer is that model's.
    other = write_checkpoint(tmp_path / "other", seed=7, tokenizer=None)
    other_args = ["infill", "--model", str(other), "--max-tokens", "8", "--mode", "full", "--json"]
    want = json.loads(santa(env | {"SANTA_DAEMON": "off"}, *other_args, stdin=SOURCE).stdout)
    got = json.loads(santa(env, *other_args, stdin=SOURCE).stdout)
    assert got["completion"] == want["completion"]
    assert json.loads(santa(env, "daemon", "status", "--json").stdout)["spec"]["model"] == str(other)

    santa(env, "daemon", "stop")
    assert santa(env, "daemon", "status", check=False).returncode == 1
    assert not (folder / "daemon.sock").exists()


def test_auto_start_and_idle_exit(env: dict[str, str], tiny_checkpoint: Path) -> None:
    auto = env | {"SANTA_DAEMON": "auto"}
    santa(auto, "infill", "--model", str(tiny_checkpoint), "--max-tokens", "2", stdin=SOURCE)
    assert json.loads(santa(env, "daemon", "status", "--json").stdout)["status"] == "ok"
    santa(env, "daemon", "stop")
    santa(env, "daemon", "start", "--model", str(tiny_checkpoint), "--idle-minutes", "0.02")
    deadline = time.monotonic() + 30
    while santa(env, "daemon", "status", check=False).returncode == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert santa(env, "daemon", "status", check=False).returncode == 1  # it left after ~1 s unused


def test_a_runtime_folder_others_can_use_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    done = santa(env | {"SANTA_RUNTIME_DIR": str(shared)}, "daemon", "status", check=False)
    assert done.returncode == 2 and b"only you can use" in done.stderr and b"Traceback" not in done.stderr


def test_a_stale_socket_is_replaced(env: dict[str, str], tiny_checkpoint: Path) -> None:
    folder = Path(env["SANTA_RUNTIME_DIR"])
    folder.mkdir(mode=0o700)
    import socket

    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(folder / "daemon.sock"))  # bound, never listening: what a killed daemon leaves
    dead.close()
    santa(env, "daemon", "start", "--model", str(tiny_checkpoint))
    assert json.loads(santa(env, "daemon", "status", "--json").stdout)["status"] == "ok"
