"""Import direction (DESIGN.md §4): lower layers never import upward; heavy deps stay in place."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "santacli"
FRONT_ENDS = {"cli", "repl", "repl_session", "server", "server_base", "server_openai", "server_tgi", "serving"}
# Which santacli modules each module may import.
ALLOWED = {
    "errors": set(),
    "catalog": set(),
    "config": {"errors"},
    "settings": {"errors", "catalog"},
    "tokenizer": {"errors"},
    "fim": {"errors", "tokenizer"},
    "sampling": {"errors"},
    "completion": {"errors", "fim", "sampling"},
    "hub": {"errors", "catalog"},
    "tensorfile": {"errors"},
    "model": {"errors", "config"},
    "weights": {"errors", "config", "model", "hub", "tensorfile"},
    "generate": {"errors", "model", "sampling"},
    "promptcache": {"model"},
    "engine": {"errors", "config", "model", "weights", "hub", "tokenizer", "fim", "generate", "promptcache",
               "quantize", "completion", "native"},
    "native": {"errors", "model"},
    "remote": {"errors", "config", "hub", "tokenizer", "fim", "completion"},
    "quantize": {"errors"},
}
# Third-party packages that only certain modules may import.
OWNERS = {"huggingface_hub": {"hub"}, "safetensors": {"tensorfile"}, "tokenizers": {"tokenizer"},
          "flash_attn": {"model"}, "typer": FRONT_ENDS, "rich": FRONT_ENDS, "fastapi": set(),
          "starlette": {"server", "server_base", "server_openai", "server_tgi"},
          "uvicorn": {"server"}, "prompt_toolkit": {"repl"}, "transformers": set()}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "santacli":
                names.update(f"santacli.{a.name}" for a in node.names)
    return names


MODULES = sorted(p for p in SRC.glob("*.py") if p.stem not in ("__init__", "__main__"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_layering(path):
    name = path.stem
    found = imports(path)
    internal = {m.split(".")[1] for m in found if m.startswith("santacli.") and m.count(".") >= 1} - {name}
    internal.discard("__version__")
    if name in FRONT_ENDS:
        assert "cli" not in internal or name == "cli", "nothing imports cli"
    else:
        assert name in ALLOWED, f"new module {name}: add it to ALLOWED with its place in the layering"
        assert internal <= ALLOWED[name], f"{name} imports {internal - ALLOWED[name]}"
    for package, owners in OWNERS.items():
        if any(m == package or m.startswith(package + ".") for m in found):
            assert name in owners, f"{name} must not import {package}"


def test_nothing_imports_cli():
    for path in MODULES:
        if path.stem != "cli":
            assert not any(m in ("santacli.cli",) for m in imports(path)), path.stem


# Modules a client of a server needs: they must not pull in torch (seconds of start-up).
TORCH_FREE = ["santacli.remote", "santacli.completion", "santacli.hub", "santacli.fim", "santacli.settings"]


def test_server_clients_start_without_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            f"import {', '.join(TORCH_FREE)}\n"
            "heavy = sorted(m for m in ('torch', 'santacli.engine', 'santacli.model') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)
