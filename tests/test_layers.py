"""Import direction (DESIGN.md §4): lower layers never import upward, front ends reach the core
only through the completion interface, names come from the module that defines them, and heavy
dependencies stay where they belong. Checked by parsing every module's imports with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "santacli"
FRONT_ENDS = ("cli", "repl", "server", "lsp")  # packages

# Which santacli modules each core module may import.
ALLOWED = {
    "errors": set(),
    "catalog": set(),
    "config": {"errors"},
    "settings": {"errors", "catalog"},
    "files": {"errors"},
    "daemon": {"errors"},
    "cores": set(),
    "bm25": set(),
    "repoindex": {"bm25", "errors", "files"},
    "context": {"bm25", "errors", "files", "fim", "repoindex"},
    "tokenizer": {"errors"},
    "fim": {"errors", "tokenizer"},
    "stoprules": {"errors"},
    "sampling": {"errors"},
    "speculate": {"errors"},
    "completion": {"errors", "fim", "sampling", "settings", "stoprules", "tokenizer", "speculate"},
    "hub": {"errors", "catalog"},
    "tensorfile": {"errors"},
    "model": {"errors", "config"},
    "weights": {"errors", "config", "model", "hub", "tensorfile"},
    "generate": {"errors", "model", "sampling", "speculate"},
    "promptcache": {"model"},
    "engine": {"errors", "config", "model", "weights", "hub", "tokenizer", "fim", "generate", "promptcache",
               "quantize", "completion", "native", "prompt_gemm", "sampling", "speculate", "cores"},
    "native": {"errors", "model", "quantize"},
    "prompt_gemm": {"errors", "native", "quantize"},
    "remote": {"errors", "config", "hub", "tokenizer", "fim", "completion", "daemon"},
    "quantize": {"errors"},
}
# What front ends may use of the core: the completion interface (engines are reached through
# it; cli constructs them), settings and the ground floor. Never model, generate or fim internals.
FRONT_END_CORE = {"completion", "settings", "catalog", "errors", "files", "engine", "remote", "hub", "fim", "daemon",
                  "context"}
ENGINE_BUILDERS = {"cli", "lsp"}  # only these construct engines; the others get one handed in
FIM_FOR_FRONT_ENDS = {"parse_cursor_spec", "split_at_position", "split_at_marker", "COMPLETION_MODES", "FIM_MODES"}
# Which front ends may import which other front ends (cli starts the others).
FRONT_END_CALLS = {"cli": {"repl", "server", "lsp"}, "repl": set(), "server": set(), "lsp": set()}
# Third-party packages that only certain places may import (a module or a front-end package).
OWNERS = {"huggingface_hub": {"hub"}, "safetensors": {"tensorfile"}, "tokenizers": {"tokenizer"},
          "flash_attn": {"model"}, "typer": {"cli"}, "rich": {"cli", "repl"}, "fastapi": set(),
          "starlette": {"server"}, "uvicorn": {"server"}, "prompt_toolkit": {"repl"},
          "pygls": {"lsp"}, "lsprotocol": {"lsp"}, "transformers": set()}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(p for p in SRC.rglob("*.py") if p.stem != "__main__" and module_name(p))


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) for each import; names are empty for ``import x``."""
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "santacli":  # from santacli import fim -> santacli.fim
                found += [(f"santacli.{a.name}", []) for a in node.names if a.name != "__version__"]
            else:
                found.append((node.module, [a.name for a in node.names]))
    return found


def place(name: str) -> str:
    """The layer a santacli module belongs to: a core module's name or a front-end package."""
    return name.split(".")[0]


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_layering(path):
    name = module_name(path)
    here = place(name)
    for module, names in imports(path):
        if not module.startswith("santacli."):
            owner = next((p for p in OWNERS if module == p or module.startswith(p + ".")), None)
            if owner is not None:
                assert here in OWNERS[owner], f"{name} must not import {owner}"
            continue
        target = place(module.removeprefix("santacli."))
        if target == here:
            continue
        if here in FRONT_ENDS:
            if target in FRONT_ENDS:
                assert target in FRONT_END_CALLS[here], f"{name} must not import the {target} front end"
                continue
            assert target in FRONT_END_CORE, f"front end {name} must not import santacli.{target}"
            if target in ("engine", "remote"):
                assert here in ENGINE_BUILDERS, f"{name}: front ends get an engine handed in"
            if target == "fim":
                assert set(names) <= FIM_FOR_FRONT_ENDS, f"{name} uses fim internals {set(names) - FIM_FOR_FRONT_ENDS}"
        else:
            assert here in ALLOWED, f"new module {name}: add it to ALLOWED with its place in the layering"
            assert target in ALLOWED[here], f"{name} imports santacli.{target}"


def test_nothing_imports_cli():
    for path in MODULES:
        if place(module_name(path)) != "cli":
            assert not any(place(m.removeprefix("santacli.")) == "cli" for m, _ in imports(path)
                           if m.startswith("santacli.")), module_name(path)


def defined_names(path: Path) -> set[str]:
    """Names a module defines at its top level (a package also offers its submodules)."""
    names: set[str] = set()
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.If):  # TYPE_CHECKING / version branches
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.ClassDef)):
                    names.add(sub.name)
                elif isinstance(sub, ast.Assign):
                    names.update(t.id for t in sub.targets if isinstance(t, ast.Name))
    if path.name == "__init__.py":
        names.update(p.stem for p in path.parent.glob("*.py"))
        names.update(p.name for p in path.parent.iterdir() if (p / "__init__.py").is_file())
    return names


def source_of(module: str) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for candidate in (SRC / rel.with_suffix(".py"), SRC / rel / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_names_come_from_where_they_are_defined(path):
    """No re-export chains: ``from santacli.x import Name`` finds Name defined in x itself."""
    for module, names in imports(path):
        source = source_of(module) if module.startswith("santacli.") else None
        if source is None or not names:
            continue
        missing = set(names) - defined_names(source)
        assert not missing, f"{module_name(path)} imports {missing} from {module}, which does not define them"


# Modules a client of a server needs: they must not pull in torch (seconds of start-up).
TORCH_FREE = ["santacli.remote", "santacli.completion", "santacli.hub", "santacli.fim", "santacli.settings",
              "santacli.stoprules", "santacli.files", "santacli.daemon", "santacli.cli.app",
              "santacli.context"]


def test_server_clients_start_without_torch():
    import subprocess
    import sys

    code = ("import sys\n"
            f"import {', '.join(TORCH_FREE)}\n"
            "heavy = sorted(m for m in ('torch', 'santacli.engine', 'santacli.model') if m in sys.modules)\n"
            "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code], check=True)
