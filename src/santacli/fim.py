"""Fill-in-the-middle as plain text: cursors, completion modes, prompt layout and token
budgets, including the cross-file context block (snippets of other files as comments before the
file's own text, in the room the cursor's text leaves). No torch; the tokenizer is only used
through its ``encode``. Where a completion ends and how its text is cleaned up is
:mod:`santacli.stoprules`; which snippets are worth showing is :mod:`santacli.context`.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from santacli.errors import ContextLengthError, UsageError
from santacli.tokenizer import FimTokens

FIM_MODES = ("psm", "spm")
COMPLETION_MODES = ("auto", "line", "block", "full")
PREFIX_SHARE = 0.75  # when both sides must be cut, the prefix keeps 3/4 of the room
# Only this many characters per token of budget around the cursor are ever tokenized: no
# tokenizer averages more on real text, and it bounds the work a 5 MB file (or a hostile
# request) can cause.
MAX_CHARS_PER_TOKEN = 32

Encode = Callable[[str], list[int]]


# ---------------------------------------------------------------------------------------------
# Cursors


class CursorSpec(NamedTuple):
    path: str
    line: int  # 1-based
    column: int | None  # 1-based, in characters; None = end of the line's text


def parse_cursor_spec(spec: str) -> CursorSpec:
    """Parse ``PATH:LINE`` or ``PATH:LINE:COL`` (the path itself may contain colons)."""
    parts = spec.rsplit(":", 2)
    if len(parts) == 3 and parts[0] and parts[1].isdigit():
        path, line, col = parts[0], parts[1], parts[2]
    elif len(parts) >= 2 and parts[-1].isdigit():
        path, line, col = spec.rsplit(":", 1)[0], parts[-1], None
    else:
        path, line, col = ":".join(parts[:-1]), parts[-1], None
    if not path or len(parts) < 2:
        raise UsageError(f"cursor {spec!r} is not PATH:LINE or PATH:LINE:COL")
    for name, value in (("line", line), ("column", col)):
        if value is not None and (not value.isdigit() or int(value) < 1):
            raise UsageError(f"cursor {spec!r}: {name} must be a number >= 1, got {value!r}")
    return CursorSpec(path, int(line), int(col) if col is not None else None)


def split_at_position(text: str, line: int, column: int | None) -> tuple[str, str]:
    """Split ``text`` at a 1-based line and column (None: the end of that line's text)."""
    lines = text.split("\n")
    if not 1 <= line <= len(lines):
        raise UsageError(f"line {line} is out of range: the file has {len(lines)} line(s)")
    current = lines[line - 1].removesuffix("\r")
    if column is None:
        column = len(current) + 1
    elif not 1 <= column <= len(current) + 1:
        raise UsageError(f"column {column} is out of range: line {line} has {len(current)} character(s)")
    offset = sum(len(part) + 1 for part in lines[: line - 1]) + column - 1
    return text[:offset], text[offset:]


def split_at_marker(text: str, marker: str) -> tuple[str, str] | None:
    """Split at the one cursor marker; None when there is none (left-to-right completion)."""
    if not marker:
        raise UsageError("the cursor marker must not be empty")
    count = text.count(marker)
    if count == 0:
        return None
    if count > 1:
        raise UsageError(f"the cursor marker {marker!r} appears {count} times; it must appear once")
    before, after = text.split(marker)
    return before, after


def choose_mode(mode: str, prefix: str, suffix: str) -> str:
    """``auto``: line when the cursor is mid-line with code after it, else block."""
    if mode not in COMPLETION_MODES:
        raise UsageError(f"mode must be one of {', '.join(COMPLETION_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode
    rest_of_line = suffix.split("\n", 1)[0]
    return "line" if rest_of_line.strip() else "block"


# ---------------------------------------------------------------------------------------------
# Budgets and prompt layout


@dataclass(frozen=True)
class Truncation:
    """What was cut to fit the context (all zero when nothing was)."""

    prefix_chars: int = 0
    prefix_lines: int = 0
    suffix_chars: int = 0
    suffix_lines: int = 0

    @property
    def any(self) -> bool:
        return bool(self.prefix_chars or self.suffix_chars)


def _first(lo: int, hi: int, ok: Callable[[int], bool]) -> int:
    """The least ``i`` in ``[lo, hi)`` with ``ok(i)``, for ``ok`` false then true; ``hi`` if none."""
    return lo + bisect.bisect_left(range(lo, hi), True, key=ok)


def _keep(encode: Encode, text: str, budget: int, *, end: bool) -> str:
    """The longest end (or start) of ``text`` that encodes to at most ``budget`` tokens, cut at
    a line boundary when any whole line fits, else at a character."""
    if budget <= 0 or not text:
        return ""
    window = budget * MAX_CHARS_PER_TOKEN
    if len(text) > window:  # what lies beyond cannot fit; cut it before tokenizing anything
        offset = len(text) - window if end else 0
        return _keep(encode, text[offset:offset + window], budget, end=end)
    fits: Callable[[int], bool] = ((lambda cut: len(encode(text[cut:])) <= budget) if end
                                   else (lambda cut: len(encode(text[:cut])) <= budget))
    if fits(0 if end else len(text)):
        return text
    if end:
        # Later line starts keep fewer tokens: the earliest one that fits keeps the most.
        starts = [s for s in [0] + [m.end() for m in re.finditer("\n", text)] if s < len(text)]
        line = _first(0, len(starts), lambda i: fits(starts[i]))
        return text[starts[line]:] if line < len(starts) else text[_first(starts[-1], len(text), fits):]
    # The first line count that no longer fits, less one, is how many whole lines do.
    ends = [m.end() for m in re.finditer("\n", text)]
    lines = _first(1, len(ends) + 1, lambda k: not fits(ends[k - 1])) - 1
    return text[: ends[lines - 1]] if lines > 0 else text[: _first(1, len(text) + 1, lambda c: not fits(c)) - 1]


def _keep_tail(encode: Encode, text: str, budget: int) -> str:
    return _keep(encode, text, budget, end=True)


def _keep_head(encode: Encode, text: str, budget: int) -> str:
    return _keep(encode, text, budget, end=False)


def fit_to_budget(encode: Encode, prefix: str, suffix: str, budget: int) -> tuple[str, str, Truncation]:
    """Cut ``prefix`` (from its start) and ``suffix`` (from its end) so that their separately
    encoded tokens total at most ``budget``, keeping the text nearest the cursor."""
    window = budget * MAX_CHARS_PER_TOKEN  # see MAX_CHARS_PER_TOKEN: beyond it nothing can fit
    p_len = len(encode(prefix)) if len(prefix) <= window else budget + 1
    s_len = len(encode(suffix)) if len(suffix) <= window else budget + 1
    if p_len + s_len <= budget:
        return prefix, suffix, Truncation()
    p_room = math.floor(budget * PREFIX_SHARE)
    if s_len < budget - p_room:
        p_room = budget - s_len
    elif p_len < p_room:
        p_room = p_len
    kept_prefix = _keep_tail(encode, prefix, p_room)
    kept_suffix = _keep_head(encode, suffix, budget - len(encode(kept_prefix)))
    cut_p, cut_s = prefix[: len(prefix) - len(kept_prefix)], suffix[len(kept_suffix):]
    return kept_prefix, kept_suffix, Truncation(
        prefix_chars=len(cut_p), prefix_lines=cut_p.count("\n"),
        suffix_chars=len(cut_s), suffix_lines=cut_s.count("\n"),
    )


# ---------------------------------------------------------------------------------------------
# Cross-file context (DESIGN.md §3): snippets of other files, as comments in the target file's
# language, each headed by its path, before the file's own text.


@dataclass(frozen=True)
class Snippet:
    """A piece of another file offered to the prompt.

    ``rank`` orders the offers (0 first) when not all fit; the chosen ones are laid out in the
    order they were given, which the caller keeps stable (so that across keystrokes the block
    stays a cacheable start of the prompt). ``comment`` is the target file's comment syntax:
    a line marker (``("#", "")``) or a pair that wraps each line (``("<!--", "-->")``).
    """

    path: str
    start_line: int  # 1-based, inclusive
    end_line: int
    text: str  # the code as it is in the file
    comment: tuple[str, str] = ("#", "")
    rank: int = 0


@dataclass(frozen=True)
class UsedSnippet:
    """A snippet that made it into the prompt, as ``--json`` reports it."""

    path: str
    start_line: int
    end_line: int
    tokens: int


def render_snippet(snippet: Snippet) -> str:
    """``snippet`` as comment lines headed by its path (the layout Tabby uses for these models);
    ends with a newline."""
    opener, closer = snippet.comment
    lines = [f"Path: {snippet.path}", *snippet.text.rstrip("\n").split("\n")]
    out = []
    for line in lines:
        body = f"{opener} {line.rstrip()}".rstrip() if line.strip() else opener
        out.append(f"{body} {closer}\n" if closer else body + "\n")
    return "".join(out)


def fit_context(encode: Encode, snippets: Sequence[Snippet], budget: int
                ) -> tuple[list[int], tuple[UsedSnippet, ...]]:
    """The context block's token ids within ``budget``, and what it holds.

    Snippets are taken by rank while they fit (one that does not fit is skipped, a smaller one
    may still come in) and laid out in their given order. Each is encoded on its own, so a
    snippet's tokens never depend on its neighbours or on the cursor's text: the same snippets
    give the same ids, and the warm prompt cache reuses them.
    """
    chosen: dict[int, list[int]] = {}
    room = budget
    for index in sorted(range(len(snippets)), key=lambda i: snippets[i].rank):
        if room <= 0:
            break
        text = render_snippet(snippets[index])
        if len(text) > room * MAX_CHARS_PER_TOKEN:  # cannot fit: skip without tokenizing it
            continue
        ids = encode(text)
        if len(ids) <= room:
            chosen[index] = ids
            room -= len(ids)
    block: list[int] = []
    used = []
    for index in sorted(chosen):
        s = snippets[index]
        block += chosen[index]
        used.append(UsedSnippet(s.path, s.start_line, s.end_line, len(chosen[index])))
    return block, tuple(used)


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    prefix: str  # the text actually used, after truncation
    suffix: str
    fim: bool  # False: left-to-right completion of the prefix
    truncation: Truncation
    context: tuple[UsedSnippet, ...] = ()  # the snippets laid out before the file's text


def build_prompt(encode: Encode, *, prefix: str, suffix: str, fim: FimTokens | None,
                 fim_mode: str = "psm", n_positions: int, max_tokens: int,
                 filename_id: int | None = None, filename: str | None = None,
                 context: Sequence[Snippet] = (), context_tokens: int | None = None) -> Prompt:
    """Lay out a prompt with the sentinels the model was trained on, fitted to the context.

    PSM: ``<prefix>P<suffix>S<middle>``; SPM (the "v2" variant the BigCode models saw):
    ``<prefix><suffix>S<middle>P``. Without a suffix or without FIM sentinels the prompt is the
    prefix alone. StarCoder-style metadata (``<filename>path\\n``) starts the document, so it
    leads the prefix part; the ``context`` block (see :func:`fit_context`) follows it, before
    the file's own text. One budget: the output's room and the sentinels are reserved, the
    cursor's text is fitted first, and the context block gets what is left, at most
    ``context_tokens`` (None: no cap).

    Raises:
        UsageError: unknown fim_mode.
        ContextLengthError: ``max_tokens`` leaves no room for any prompt.
    """
    if fim_mode not in FIM_MODES:
        raise UsageError(f"fim mode must be psm or spm, got {fim_mode!r}")
    use_fim = fim is not None and suffix != ""
    meta: list[int] = []
    if filename_id is not None and filename:
        meta = [filename_id, *encode(filename + "\n")]
    sentinels = 3 if use_fim else 0
    budget = n_positions - max_tokens - sentinels - len(meta)
    if budget < 1:
        raise ContextLengthError(
            f"--max-tokens {max_tokens} leaves no room for the prompt in this model's "
            f"{n_positions}-token context; use at most {n_positions - sentinels - len(meta) - 1}"
        )
    cap = budget if context_tokens is None else min(budget, max(context_tokens, 0))
    if not use_fim:
        kept = _keep_tail(encode, prefix, budget)
        if not kept and not meta:
            raise UsageError("nothing to complete: the prompt is empty")
        cut = prefix[: len(prefix) - len(kept)]
        trunc = Truncation(prefix_chars=len(cut), prefix_lines=cut.count("\n"))
        kept_ids = encode(kept)
        block, used = fit_context(encode, context, min(cap, budget - len(kept_ids))) if context else ([], ())
        return Prompt(meta + block + kept_ids, kept, "", False, trunc, used)
    assert fim is not None
    kept_p, kept_s, trunc = fit_to_budget(encode, prefix, suffix, budget)
    p_ids, s_ids = encode(kept_p), encode(kept_s)
    block, used = fit_context(encode, context, min(cap, budget - len(p_ids) - len(s_ids))) if context else ([], ())
    p_ids = meta + block + p_ids
    if fim_mode == "psm":
        ids = [fim.prefix, *p_ids, fim.suffix, *s_ids, fim.middle]
    else:
        ids = [fim.prefix, fim.suffix, *s_ids, fim.middle, *p_ids]
    return Prompt(ids, kept_p, kept_s, True, trunc, used)
