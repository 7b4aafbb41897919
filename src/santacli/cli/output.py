"""What the CLI prints and where: the stderr console, the global ``--quiet``/``--debug`` state,
and the output that ``complete`` and ``infill`` share (streamed candidates, the stats line,
JSON).

stdout carries only completions (or JSON, or a command's own table); everything else goes to
stderr through :data:`err`.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from rich.console import Console

if TYPE_CHECKING:
    from santacli.completion import CompletionEngine, CompletionOptions, CompletionResult

err = Console(stderr=True, highlight=False)


@dataclass
class RunState:
    """The root options, set once per run by the root callback."""

    debug: bool = False
    quiet: bool = False


state = RunState()


def run_completion(engine: CompletionEngine, prefix: str, suffix: str, opts: CompletionOptions, *,
                   stream_to: TextIO | None) -> CompletionResult:
    """Run one completion; stream the first candidate's text to ``stream_to`` if given."""
    stream = engine.infill(prefix, suffix, opts)
    for chunk in stream:
        if stream_to is not None:
            stream_to.write(chunk)
            stream_to.flush()
    return stream.result


def print_candidates(result: CompletionResult, streamed: bool, *, null: bool = False) -> None:
    """The first candidate (unless already streamed), then the others behind a stderr rule; with
    ``null``, every candidate ends with a NUL byte instead (``-z``: for ``xargs -0`` and scripts)."""
    out = sys.stdout
    if not streamed:
        out.write(result.text)
    if null:
        out.write("\0" + "".join(text + "\0" for text in result.candidates[1:]))
        out.flush()
        return
    for i, text in enumerate(result.candidates[1:], start=2):
        out.write("\n")
        out.flush()
        err.print(f"── candidate {i} ──", style="dim")
        out.write(text)
    if out.isatty():
        out.write("\n")
    out.flush()


def report(result: CompletionResult) -> None:
    """The one-line stats on stderr (only on a terminal, and not with --quiet)."""
    if state.quiet or not err.is_terminal:
        return
    t = result.truncation
    cut = f", cut {t.prefix_lines} prefix / {t.suffix_lines} suffix lines" if t.any else ""
    err.print(f"{result.generated_tokens} tokens, {result.tokens_per_second:.1f} tok/s, "
              f"first token {result.time_to_first_token * 1000:.0f} ms, stop: {result.stop_reason}{cut}",
              style="dim", soft_wrap=True)


def to_json(payload: dict[str, object]) -> str:
    """One JSON line (``--json``)."""
    return json.dumps(payload, ensure_ascii=False) + "\n"
