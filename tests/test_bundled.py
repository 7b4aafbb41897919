"""The bundled santa-tiny model: present, small, offline, and it completes obvious code."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from santacli.catalog import BUNDLED_DIR

pytestmark = pytest.mark.skipif(not (BUNDLED_DIR / "model.safetensors").is_file(),
                                reason="the bundled model has not been built (python -m training.pipeline)")


@pytest.fixture(scope="module")
def engine():
    from santacli import Engine

    return Engine.load("tiny")


def test_bundle_is_complete_and_small():
    names = {p.name for p in BUNDLED_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in BUNDLED_DIR.iterdir()) <= 30 * 2**20
    config = json.loads((BUNDLED_DIR / "config.json").read_text())
    assert config["model_type"] == "gpt_bigcode" and config["multi_query"] is True


def test_loads_offline_with_santacoder_sentinels(engine, monkeypatch):
    assert engine.tokenizer.fim is not None and engine.tokenizer.fim.family == "santacoder"
    assert engine.tokenizer.eos_id == 0


# santa-tiny v0 (8.8 M tokens, see its model card) does not pass these yet: issue #5 stays open.
# strict: the day a retrained model passes, these fail until the marks are removed.
UNDERTRAINED = pytest.mark.xfail(strict=True, reason="santa-tiny is undertrained (model card, issue #5)")


@UNDERTRAINED
def test_completes_add(engine):
    text = engine.infill("def add(a, b):\n    return ", "\n\n\ndef sub(a, b):\n    return a - b\n",
                         mode="line", max_tokens=16).text()
    assert text.strip() == "a + b"


def test_completes_range_loop_header(engine):
    text = engine.complete("def show(items):\n    for i in range(", mode="line", max_tokens=16).text()
    # The completed header must be valid Python that opens the loop.
    compile("def show(items):\n    for i in range(" + text + "\n        pass\n", "<completion>", "exec")
    assert text.rstrip().endswith(":"), text


def _quickstart() -> subprocess.CompletedProcess[bytes]:
    """The README's quickstart with no network, no config and no model named."""
    return subprocess.run([sys.executable, "-m", "santacli", "infill", "--mode", "line"],
                          input=b"def add(a, b):\n    return <CURSOR>\n", capture_output=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "SANTA_CONFIG": "/nonexistent"})


def test_quickstart_runs_offline_with_the_hint():
    proc = _quickstart()
    assert proc.returncode == 0, proc.stderr
    assert b"--model santacoder" in proc.stderr  # the one-line hint, on stderr only
    assert b"santacoder" not in proc.stdout


@UNDERTRAINED
def test_quickstart_completes_add():
    assert _quickstart().stdout.decode().strip() == "a + b"


@pytest.mark.slow
def test_wheel_carries_the_model_under_40_mb(tmp_path):
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(root)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1:]}")
    (wheel,) = tmp_path.glob("santacli-*.whl")
    assert wheel.stat().st_size < 40 * 2**20
    names = zipfile.ZipFile(wheel).namelist()
    assert "santacli/bundled/santa-tiny/model.safetensors" in names
    assert "santacli/kernels/decode.c" in names  # the native decode step is built from it at first use
    assert not any(n.startswith("training/") for n in names)
