"""The santa command line: stdout holds only the completion, --json, --in-place, bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from santacli.cli import app as cli

SANTA = [sys.executable, "-m", "santacli"]


class FakeStdin(io.TextIOWrapper):
    def __init__(self, data: bytes, tty: bool = False) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def run(argv, capsys, monkeypatch, stdin: bytes | None = None, tty: bool = False):
    monkeypatch.setenv("SANTA_NO_HINT", "1")
    monkeypatch.setenv("SANTA_CONFIG", "/nonexistent/santa.toml")
    monkeypatch.setattr(sys, "stdin", FakeStdin(stdin or b"", tty=stdin is None and tty))
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def source(tmp_path) -> Path:
    path = tmp_path / "app.py"
    path.write_text("import os\n\ndef add(a, b):\n    return a + b\n\nprint(add(1, 2))\n")
    path.chmod(0o640)
    return path


def test_infill_json_schema(tiny_checkpoint, capsys, monkeypatch):
    code, out, err = run(["infill", "--model", str(tiny_checkpoint), "--json", "--max-tokens", "6",
                          "--mode", "full"], capsys, monkeypatch, stdin=b"def f(x):\n    return <CURSOR>\n\nf(1)\n")
    assert code == 0, err
    payload = json.loads(out)
    assert set(payload) >= {"completion", "candidates", "stop_reason", "mode", "fim", "fim_mode", "model",
                            "tokens", "timings", "truncated"}
    assert payload["fim"] is True and payload["mode"] == "full"
    assert payload["tokens"]["generated"] <= 6
    assert out.count("\n") == 1  # exactly one JSON line


def test_infill_stdout_is_only_the_completion(tiny_checkpoint, capsys, monkeypatch):
    args = ["infill", "--model", str(tiny_checkpoint), "--max-tokens", "8", "--mode", "full"]
    stdin = b"x = <CURSOR>\n"
    code, out, _ = run([*args, "--json"], capsys, monkeypatch, stdin=stdin)
    expected = json.loads(out)["completion"]
    code, out, _ = run(args, capsys, monkeypatch, stdin=stdin)
    assert code == 0 and out == expected
    code, out, _ = run([*args, "--full"], capsys, monkeypatch, stdin=stdin)
    assert out == "x = " + expected + "\n"


def test_infill_prefix_and_suffix_files_match_marker(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "p.py").write_text("def f(x):\n    return ")
    (tmp_path / "s.py").write_text("\n\nf(1)\n")
    base = ["infill", "--model", str(tiny_checkpoint), "--max-tokens", "8", "--json"]
    _, a, _ = run([*base, "--prefix-file", str(tmp_path / "p.py"), "--suffix-file", str(tmp_path / "s.py")],
                  capsys, monkeypatch)
    _, b, _ = run(base, capsys, monkeypatch, stdin=b"def f(x):\n    return <CURSOR>\n\nf(1)\n")
    assert json.loads(a)["completion"] == json.loads(b)["completion"]


def test_complete_in_place_and_diff(tiny_checkpoint, source, capsys, monkeypatch):
    original = source.read_text()
    args = ["complete", f"{source}:4:12", "--model", str(tiny_checkpoint), "--max-tokens", "5", "--mode", "full"]
    _, out, _ = run([*args, "--json"], capsys, monkeypatch)
    payload = json.loads(out)
    assert payload["path"] == str(source) and payload["line"] == 4 and payload["column"] == 12
    completion = payload["completion"]
    _, diff, _ = run([*args, "--diff"], capsys, monkeypatch)
    if completion:
        assert diff.startswith("--- a/") and "+++ b/" in diff
    assert source.read_text() == original  # --diff and --json never touch the file
    code, out, _ = run([*args, "--in-place"], capsys, monkeypatch)
    assert code == 0 and out == ""
    assert source.read_bytes().decode() == original[:original.index("a + b")] + completion + original[original.index("a + b"):]
    assert source.stat().st_mode & 0o777 == 0o640


def test_in_place_failure_leaves_the_original(tiny_checkpoint, source, capsys, monkeypatch):
    original = source.read_bytes()

    def boom(*_args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    code, _, err = run(["complete", f"{source}:3", "--model", str(tiny_checkpoint), "--max-tokens", "3",
                        "--mode", "full", "--in-place"], capsys, monkeypatch)
    assert code != 0 and "Traceback" not in err
    assert source.read_bytes() == original
    assert [p.name for p in source.parent.iterdir()] == ["app.py"]  # no temp file left behind


def test_in_place_never_overwrites_an_edit_made_while_generating(tiny_checkpoint, source, capsys, monkeypatch):
    from santacli.cli import complete

    real = complete.run_completion

    def editor_saves_meanwhile(*args, **kwargs):
        result = real(*args, **kwargs)
        source.write_text(source.read_text() + "# saved by the editor\n")
        return result

    monkeypatch.setattr(complete, "run_completion", editor_saves_meanwhile)
    code, _, err = run(["complete", f"{source}:4", "--model", str(tiny_checkpoint), "--max-tokens", "4",
                        "--mode", "full", "--in-place"], capsys, monkeypatch)
    assert code == 3 and "changed on disk" in err and err.count("\n") == 1
    assert source.read_text().endswith("# saved by the editor\n")


def test_in_place_refuses_read_only_before_loading(source, capsys, monkeypatch):
    source.chmod(0o444)
    code, _, err = run(["complete", f"{source}:4", "--model", "/nonexistent/model", "--in-place"],
                       capsys, monkeypatch)
    assert code == 3 and "write-protected" in err  # the missing model was never looked at


def test_in_place_keeps_crlf_and_bom(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    path = tmp_path / "win.py"
    path.write_bytes("\ufeffdef add(a, b):\r\n    return a + b\r\n\r\nprint(add(1, 2))\r\n".encode())
    code, _, _ = run(["complete", f"{path}:2", "--model", str(tiny_checkpoint), "--max-tokens", "12",
                      "--mode", "full", "--in-place"], capsys, monkeypatch)
    data = path.read_bytes()
    assert code == 0 and data.startswith("\ufeff".encode())
    assert data.count(b"\n") == data.count(b"\r\n")  # every line end is CRLF, the inserted ones too


def test_a_large_file_costs_little_more_than_a_small_one(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    big = tmp_path / "big.py"
    big.write_text("def f(x):\n    return x\n" * 200_000 + "y = f(1)\n")  # ~4.8 MB
    code, out, _ = run(["complete", f"{big}:400001", "--model", str(tiny_checkpoint), "--max-tokens", "4",
                        "--json"], capsys, monkeypatch)
    result = json.loads(out)
    assert code == 0 and result["truncated"]["prefix_lines"] > 390_000


@pytest.mark.parametrize(("argv", "stdin", "message"), [
    (["complete", "{missing}:1"], None, "no such file"),
    (["complete", "{dir}:1"], None, "is a directory"),
    (["complete", "{binary}:1"], None, "binary"),
    (["complete", "{latin1}:1"], None, "not valid UTF-8"),
    (["complete", "{src}:99"], None, "out of range"),
    (["complete", "{src}:2:50"], None, "out of range"),
    (["complete", "{src}"], None, "PATH:LINE"),
    (["complete", "{src}:x"], None, "line must be a number"),
    (["infill"], b"", "empty"),
    (["infill"], b"   \n", "empty"),
    (["infill", "--marker", "@@"], b"no marker here", "not in the input"),
    (["infill"], b"a<CURSOR>b<CURSOR>", "appears 2 times"),
    (["infill", "--model", "no-such-alias"], b"x", "unknown model"),
    (["infill", "--model", "./nowhere"], b"x", "unknown model"),
    (["infill", "--max-tokens", "100000"], b"x = <CURSOR>", "max-tokens"),
    (["infill", "--max-tokens", "0"], b"x", "max tokens"),
    (["infill", "--temperature", "-1"], b"x", "temperature"),
    (["infill", "--top-p", "2"], b"x", "top_p"),
    (["infill", "--mode", "sometimes"], b"x", "mode"),
    (["infill", "--fim-mode", "smp"], b"x", "fim mode"),
    (["infill", "--attention", "flash"], b"x", "flash"),
    (["infill", "--dtype", "float8"], b"x", "dtype"),
    (["infill", "--decode", "fast"], b"x", "unknown decode mode"),
    (["infill", "--decode", "native", "--device", "cuda"], b"x", "cuda"),
    (["infill", "-n", "0"], b"x", "candidates"),
    (["infill", "--max-tokens", "many"], b"x", "--max-tokens"),
    (["infill", "--no-such-flag"], b"x", "no such option"),
    (["infill"], None, "stdin"),
])
def test_bad_input_one_line_error(tiny_checkpoint, tmp_path, source, capsys, monkeypatch, argv, stdin, message):
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\x02")
    (tmp_path / "latin.py").write_bytes("x = 'café'\n".encode("latin-1"))
    paths = {"missing": tmp_path / "missing.py", "dir": tmp_path, "binary": tmp_path / "bin.dat",
             "latin1": tmp_path / "latin.py", "src": source}
    argv = [a.format(**paths) for a in argv]
    if "--model" not in argv:
        argv += ["--model", str(tiny_checkpoint)]
    before = source.read_bytes()
    code, out, err = run(argv, capsys, monkeypatch, stdin=stdin, tty=stdin is None)
    assert code != 0
    assert out == ""
    assert message.lower() in err.lower()
    assert err.count("\n") == 1 and err.startswith("santa: error:"), err
    assert source.read_bytes() == before


def test_decode_path_is_chosen_from_the_cli(tiny_checkpoint, capsys, monkeypatch):
    """--decode pytorch and the native step give the same greedy completion."""
    outs = []
    for decode in ("pytorch", "auto"):
        code, out, _ = run(["infill", "--model", str(tiny_checkpoint), "--decode", decode, "--max-tokens", "12",
                            "--mode", "full"], capsys, monkeypatch, stdin=b"def f(x):\n    <CURSOR>")
        assert code == 0
        outs.append(out)
    assert outs[0] == outs[1]


def test_unsupported_architecture(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    import shutil

    bad = tmp_path / "llama"
    shutil.copytree(tiny_checkpoint, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"] = "llama"
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(["infill", "--model", str(bad)], capsys, monkeypatch, stdin=b"x")
    assert code == 4 and "model_type 'llama' is not supported" in err


def test_info_and_models(tiny_checkpoint, capsys, monkeypatch):
    code, out, _ = run(["info", str(tiny_checkpoint)], capsys, monkeypatch)
    assert code == 0 and "multi-query" in out and "santacoder" in out and "sdpa" in out
    from santacli import native

    state = native.status()
    # How one-token steps run here: the native kernel's instruction set, or why PyTorch does it.
    assert "decode" in out and (("native " + state.detail.split(",")[0]) in out if state.available else "pytorch" in out)
    prompt_row = next(line for line in out.splitlines() if line.startswith("prompt "))
    assert prompt_row.split(None, 1)[1] == "pytorch fp32 GEMM"
    # int8: the prompt GEMM measured (or cached) for this CPU, with what it was measured against.
    code, out, _ = run(["info", str(tiny_checkpoint), "--quantize", "int8"], capsys, monkeypatch)
    prompt_row = next(line for line in out.splitlines() if line.startswith("prompt "))
    assert code == 0 and "measured at 128x64x256" in prompt_row
    assert prompt_row.split(None, 1)[1].startswith(("native ", "torch._int_mm", "blas"))
    code, out, _ = run(["models"], capsys, monkeypatch)
    assert code == 0 and "bigcode/gpt_bigcode-santacoder" in out


def test_offline_uncached_model_says_what_to_run(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    code, _, err = run(["infill", "--model", "santacoder"], capsys, monkeypatch, stdin=b"x")
    assert code == 4 and "santa pull bigcode/gpt_bigcode-santacoder" in err


def test_config_file_sets_defaults(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'model = "{tiny_checkpoint}"\nmax_tokens = 3\nmode = "full"\n')
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"x = <CURSOR>"))
    monkeypatch.setenv("SANTA_CONFIG", str(cfg))
    monkeypatch.delenv("SANTA_MODEL", raising=False)
    assert cli.main(["infill", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["model"] == str(tiny_checkpoint) and payload["tokens"]["generated"] <= 3
    cfg.write_text("colour = 'red'\n")
    monkeypatch.setattr(sys, "stdin", FakeStdin(b"x"))
    assert cli.main(["infill"]) == 2
    assert "unknown setting 'colour'" in capsys.readouterr().err


# -- the real entry point, as a subprocess -------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, SANTA_CONFIG="/nonexistent/santa.toml", **extra)
    env.pop("SANTA_MODEL", None)
    return env


def test_help_does_not_import_torch():
    code = ("import sys; from santacli.cli import app as cli; "
            "sys.argv=['santa','--help']\ntry: cli.main(['--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    assert "complete" in proc.stdout


def test_subprocess_streams_only_completion(tiny_checkpoint, tmp_path):
    proc = subprocess.run([*SANTA, "infill", "--model", str(tiny_checkpoint), "--max-tokens", "5", "--mode", "full",
                           "--json"], input=b"a = <CURSOR>\n", capture_output=True, env=_env())
    assert proc.returncode == 0, proc.stderr
    completion = json.loads(proc.stdout)["completion"]
    proc = subprocess.run([*SANTA, "infill", "--model", str(tiny_checkpoint), "--max-tokens", "5", "--mode", "full"],
                          input=b"a = <CURSOR>\n", capture_output=True, env=_env())
    assert proc.stdout.decode() == completion
    assert b"bundled" not in proc.stdout


def test_bundled_model_hint_goes_to_stderr(tmp_path):
    proc = subprocess.run([*SANTA, "infill", "--max-tokens", "2"], input=b"x = ", capture_output=True,
                          env=_env())
    if b"missing from this installation" in proc.stderr:
        pytest.skip("the bundled model is not built yet")
    assert proc.returncode == 0, proc.stderr
    assert b"--model santacoder" in proc.stderr and b"--model" not in proc.stdout
    quiet = subprocess.run([*SANTA, "infill", "--max-tokens", "2"], input=b"x = ", capture_output=True,
                           env=_env(SANTA_NO_HINT="1"))
    assert b"--model santacoder" not in quiet.stderr


def test_ctrl_c_exits_130_and_leaves_file(tiny_checkpoint, tmp_path):
    import signal
    import time

    from checkpoints import write_endless_checkpoint

    # ~50M parameters: 4,000 tokens (14 s) must outlast the 5 s wait with the native decode step.
    big = write_endless_checkpoint(tmp_path / "m", n_positions=4096, n_embd=512, n_layer=16, n_head=8)
    target = tmp_path / "code.py"
    target.write_text("def f():\n    pass\n")
    before = target.read_bytes()
    # A suite started in the background without job control (nohup, some CI runners) passes
    # SIGINT down ignored, as the shell does for background jobs; santa would rightly keep
    # running. Start it as a terminal would: SIGINT at its default, so Python handles it.
    proc = subprocess.Popen([*SANTA, "complete", f"{target}:1", "--model", str(big), "--max-tokens", "4000",
                             "--mode", "full", "--in-place"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err and err.strip().endswith(b"interrupted")
    assert target.read_bytes() == before


def test_non_finite_weights_are_a_broken_checkpoint(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file, save_file

    from checkpoints import write_checkpoint

    bad = write_checkpoint(tmp_path / "nan")
    state = load_file(bad / "model.safetensors")
    state["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(state, bad / "model.safetensors")
    for extra in ([], ["--temperature", "0.7"]):  # greedy used to return nothing, silently
        code, out, err = run(["infill", "--model", str(bad), "--max-tokens", "4", *extra], capsys, monkeypatch,
                             stdin=b"def f(x):\n    return <CURSOR>\n")
        assert code == 4 and out == "" and "NaN or infinite" in err and "Traceback" not in err


def test_null_separated_candidates(tiny_checkpoint, capsys, monkeypatch):
    args = ["infill", "--model", str(tiny_checkpoint), "-n", "3", "--temperature", "0.9", "--seed", "5",
            "--max-tokens", "6", "--mode", "full"]
    stdin = b"def f(x):\n    return <CURSOR>\n"
    code, out, _ = run([*args, "--json"], capsys, monkeypatch, stdin=stdin)
    want = json.loads(out)["candidates"]
    code, out, _ = run([*args, "-z"], capsys, monkeypatch, stdin=stdin)
    assert code == 0 and out.split("\0") == [*want, ""]
    _, _, err = run(["infill", "--model", str(tiny_checkpoint), "-n", "2", "--max-tokens", "2"], capsys, monkeypatch,
                    stdin=stdin)
    assert "identical candidates" in err  # greedy -n 2 says what it gives
