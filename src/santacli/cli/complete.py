"""``santa complete PATH:LINE[:COL]``: complete the code in a file at a cursor, the rest of the
file being the suffix, with snippets of the other files of its git repository as context; print
it, or write it into the file, or print a diff or JSON."""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Annotated

import typer

from santacli.cli.options import (
    CommonOptions,
    Json,
    with_common_options,
)
from santacli.cli.output import err, print_candidates, report, run_completion, state, to_json
from santacli.errors import UsageError
from santacli.files import check_replaceable, read_for_completion, replace_text
from santacli.settings import load_settings


@with_common_options()
def complete(
    common: CommonOptions,
    cursor: Annotated[str, typer.Argument(metavar="PATH:LINE[:COL]",
                                          help="File and cursor: 1-based line, optional 1-based column.")],
    json_out: Json = False,
    in_place: Annotated[bool, typer.Option("--in-place", "-i", help="Write the completion into the file.")] = False,
    diff: Annotated[bool, typer.Option("--diff", help="Print a unified diff instead of the text.")] = False,
) -> None:
    """Complete the code in a file at a cursor; the rest of the file is the suffix."""
    from santacli.fim import parse_cursor_spec, split_at_position

    if sum((in_place, diff, json_out)) > 1:
        raise UsageError("choose one of --in-place, --diff and --json")
    spec = parse_cursor_spec(cursor)
    path = Path(spec.path)
    file = read_for_completion(path)
    if in_place:
        check_replaceable(path)  # before the model loads, not after it has worked
    text = file.text
    prefix, suffix = split_at_position(text, spec.line, spec.column)
    settings = load_settings()
    opts = common.completion_options(settings, display_name(path))
    # Snippets of the repository's other files (and of --context files), before the model loads.
    opts = common.with_context(opts, settings, prefix, suffix, target=path)
    engine = common.engine(settings)
    streaming = not (json_out or in_place or diff)
    result = run_completion(engine, prefix, suffix, opts, stream_to=sys.stdout if streaming else None)
    new_text = prefix + result.text + suffix
    if json_out:
        payload = result.to_dict() | {"path": str(path), "line": spec.line, "column": spec.column}
        sys.stdout.write(to_json(payload))
    elif diff:
        old, new = (file.encode(t).decode("utf-8") for t in (text, new_text))
        sys.stdout.writelines(difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True),
            fromfile=f"a/{spec.path}", tofile=f"b/{spec.path}"))
    elif in_place:
        if result.text:
            replace_text(file, new_text)
        if not state.quiet:
            err.print(f"santa: inserted {len(result.text)} characters into {path}" if result.text
                      else f"santa: empty completion; {path} left unchanged", style="dim", soft_wrap=True)
    else:
        print_candidates(result, streamed=True, null=common.null)
    report(result)


def display_name(path: Path) -> str:
    """The file name as metadata: relative to the working directory when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name
