from __future__ import annotations

import os
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

# Tiny models gain nothing from threads, and a busy 2-core machine makes OpenMP barriers spin:
# one thread keeps the suite fast and steady (subprocesses inherit the variable).
os.environ["OMP_NUM_THREADS"] = "1"
# Never use (or leave behind) the user's own per-user daemon: every run gets a private folder.
os.environ["SANTA_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="santa-tests-")

import pytest
import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import build_tokenizer, write_checkpoint  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer MQA model with a SantaCoder-style tokenizer, shared by the whole session."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "model", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path):
    """The tiny checkpoint loaded for exact comparisons (fp32, eager attention); one per module."""
    from santacli.engine import Engine

    return Engine.load(str(tiny_checkpoint), device="cpu", dtype="float32", attention="eager")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path, engine):
    """A second, independent engine on the same checkpoint: the oracle a served one is checked against."""
    from santacli.engine import Engine

    return Engine.load(str(tiny_checkpoint), device="cpu", dtype=engine.info.dtype, attention=engine.info.attention)


@contextmanager
def serving_in_thread(server):
    """Run a ``socketserver``/``http.server`` server in a daemon thread for the block."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
