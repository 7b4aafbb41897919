"""``santa infill``: fill in code read from stdin (or ``--prefix-file``/``--suffix-file``) at
the cursor marker, or continue it when there is no marker."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from santacli.cli.options import (
    DEFAULT_MARKER,
    CommonOptions,
    Json,
    with_common_options,
)
from santacli.cli.output import print_candidates, report, run_completion, to_json
from santacli.errors import InputError, UsageError
from santacli.files import decode_text, read_text_file
from santacli.settings import load_settings


@with_common_options()
def infill(
    common: CommonOptions,
    json_out: Json = False,
    marker: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Cursor marker in the input [default: <CURSOR>; when given, it must be present].")] = None,
    prefix_file: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--prefix-file", help="Read the prefix from this file instead of stdin.")] = None,
    suffix_file: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--suffix-file", help="Read the suffix from this file (with --prefix-file).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Print the whole text with the middle inserted.")] = False,
    path: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--path", help="File name of the code, passed as <filename> metadata; inside a git repository, "
                       "its other files give context.")] = None,
) -> None:
    """Fill in code read from stdin at the cursor marker (no marker: continue the text)."""
    from santacli.fim import split_at_marker

    if suffix_file and not prefix_file:
        raise UsageError("--suffix-file needs --prefix-file")
    if prefix_file:
        prefix = read_text_file(prefix_file)
        suffix = read_text_file(suffix_file) if suffix_file else ""
        if not (prefix + suffix).strip():
            raise InputError("the prefix and suffix files are empty: nothing to complete")
    else:
        text = read_stdin()
        split = split_at_marker(text, DEFAULT_MARKER if marker is None else marker)
        if split is None and marker is not None:
            raise UsageError(f"the cursor marker {marker!r} is not in the input")
        prefix, suffix = split if split is not None else (text, "")
    settings = load_settings()
    opts = common.completion_options(settings, path)
    opts = common.with_context(opts, settings, prefix, suffix, target=Path(path) if path else None)
    engine = common.engine(settings)
    streaming = not (json_out or full)
    result = run_completion(engine, prefix, suffix, opts, stream_to=sys.stdout if streaming else None)
    if json_out:
        sys.stdout.write(to_json(result.to_dict()))
    elif full:
        sys.stdout.write(prefix + result.text + suffix)
        sys.stdout.flush()
    else:
        print_candidates(result, streamed=True, null=common.null)
    report(result)


def read_stdin() -> str:
    """The code piped in on stdin.

    Raises:
        InputError: stdin is a terminal (nothing piped), binary, not UTF-8 or blank.
    """
    if sys.stdin is None or sys.stdin.isatty():
        raise InputError("santa infill reads code from stdin: pipe a file in, or use --prefix-file")
    text = decode_text(sys.stdin.buffer.read(), "stdin")
    if not text.strip():
        raise InputError("stdin is empty: nothing to complete")
    return text
