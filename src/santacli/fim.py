"""Fill-in-the-middle as plain text: cursors, prompt layout, token budgets, stop rules and
post-processing. No torch; the tokenizer is only used through its ``encode``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from santacli.errors import ContextLengthError, UsageError
from santacli.tokenizer import FimTokens

FIM_MODES = ("psm", "spm")
COMPLETION_MODES = ("auto", "line", "block", "full")
PREFIX_SHARE = 0.75  # when both sides must be cut, the prefix keeps 3/4 of the room
_BLOCK_OPENERS = (":", "{", "(", "[")

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


def _keep_tail(encode: Encode, text: str, budget: int) -> str:
    """The longest end of ``text`` that encodes to at most ``budget`` tokens, cut at a line
    start when any whole line fits, else at a character."""
    if budget <= 0 or not text:
        return ""
    if len(encode(text)) <= budget:
        return text
    starts = [0] + [m.end() for m in re.finditer("\n", text)]
    starts = [s for s in starts if s < len(text)]
    # Binary search the earliest line start that fits (later starts keep fewer tokens).
    lo, hi = 0, len(starts)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(encode(text[starts[mid]:])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    if lo < len(starts):
        return text[starts[lo]:]
    lo, hi = starts[-1] if starts else 0, len(text)
    while lo < hi:
        mid = (lo + hi) // 2
        if len(encode(text[mid:])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return text[lo:]


def _keep_head(encode: Encode, text: str, budget: int) -> str:
    """The longest start of ``text`` within ``budget`` tokens, cut after a newline if possible."""
    if budget <= 0 or not text:
        return ""
    if len(encode(text)) <= budget:
        return text
    ends = [m.end() for m in re.finditer("\n", text)]
    lo, hi = 0, len(ends)  # number of whole lines kept
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(text[: ends[mid - 1]])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    if lo > 0:
        return text[: ends[lo - 1]]
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(text[:mid])) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def fit_to_budget(encode: Encode, prefix: str, suffix: str, budget: int) -> tuple[str, str, Truncation]:
    """Cut ``prefix`` (from its start) and ``suffix`` (from its end) so that their separately
    encoded tokens total at most ``budget``, keeping the text nearest the cursor."""
    p_len, s_len = len(encode(prefix)), len(encode(suffix))
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


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    prefix: str  # the text actually used, after truncation
    suffix: str
    fim: bool  # False: left-to-right completion of the prefix
    truncation: Truncation


def build_prompt(encode: Encode, *, prefix: str, suffix: str, fim: FimTokens | None,
                 fim_mode: str = "psm", n_positions: int, max_tokens: int,
                 filename_id: int | None = None, filename: str | None = None) -> Prompt:
    """Lay out a prompt with the sentinels the model was trained on, fitted to the context.

    PSM: ``<prefix>P<suffix>S<middle>``; SPM (the "v2" variant the BigCode models saw):
    ``<prefix><suffix>S<middle>P``. Without a suffix or without FIM sentinels the prompt is the
    prefix alone. StarCoder-style metadata (``<filename>path\\n``) starts the document, so it
    leads the prefix part.

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
    if not use_fim:
        kept = _keep_tail(encode, prefix, budget)
        if not kept and not meta:
            raise UsageError("nothing to complete: the prompt is empty")
        cut = prefix[: len(prefix) - len(kept)]
        trunc = Truncation(prefix_chars=len(cut), prefix_lines=cut.count("\n"))
        return Prompt(meta + encode(kept), kept, "", False, trunc)
    assert fim is not None
    kept_p, kept_s, trunc = fit_to_budget(encode, prefix, suffix, budget)
    p_ids, s_ids = meta + encode(kept_p), encode(kept_s)
    if fim_mode == "psm":
        ids = [fim.prefix, *p_ids, fim.suffix, *s_ids, fim.middle]
    else:
        ids = [fim.prefix, fim.suffix, *s_ids, fim.middle, *p_ids]
    return Prompt(ids, kept_p, kept_s, True, trunc)


# ---------------------------------------------------------------------------------------------
# Indentation style


def indent_style(text: str) -> str | None:
    """'\\t' or ' ' by majority of indented lines, or None when the text has no indentation."""
    tabs = spaces = 0
    for line in text.split("\n"):
        if line.startswith("\t"):
            tabs += 1
        elif line.startswith(" ") and line.strip():
            spaces += 1
    if not tabs and not spaces:
        return None
    return "\t" if tabs > spaces else " "


def _indent_width(text: str) -> int:
    widths = {len(line) - len(line.lstrip(" ")) for line in text.split("\n") if line.startswith(" ") and line.strip()}
    widths.discard(0)
    return min(widths) if widths else 4


def match_indentation(completion: str, style: str | None, width: int) -> str:
    """Rewrite the leading indentation of the completion's later lines to the file's style."""
    if style is None or "\n" not in completion:
        return completion
    first, *rest = completion.split("\n")
    out = [first]
    for line in rest:
        body = line.lstrip(" \t")
        lead = line[: len(line) - len(body)]
        columns = sum(width if ch == "\t" else 1 for ch in lead)
        out.append(("\t" * (columns // width) + " " * (columns % width) if style == "\t" else " " * columns) + body)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Stop rules, post-processing and streaming


def _indent_of(line: str) -> int:
    return len(line.expandtabs(4)) - len(line.expandtabs(4).lstrip())


def _bracket_balance(text: str) -> int:
    return sum(text.count(c) for c in "([{") - sum(text.count(c) for c in ")]}")


def partial_match_length(text: str, candidates: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins one of ``candidates``: streamed text
    that must be held back because it may still turn into that candidate."""
    longest = 0
    for cand in candidates:
        for n in range(min(len(cand), len(text)), longest, -1):
            if text.endswith(cand[:n]):
                longest = n
                break
    return longest


@dataclass
class CompletionFilter:
    """Applies the stop rules of a mode to text as it is generated, and releases only text that
    no later rule can take back, so a stream of chunks always adds up to the final text.

    Modes: ``line`` ends at the end of the line; ``block`` ends when a line returns to the
    indentation of the cursor's block (or left of it), at a run of two blank lines, or when the
    model starts repeating the suffix; ``full`` runs until the model stops. User ``stops``
    strings end the text in every mode. The final text drops a tail that repeats the start of
    the suffix and follows the file's indentation style.
    """

    mode: str
    prefix: str = ""
    suffix: str = ""
    stops: Sequence[str] = ()
    raw: str = ""
    stopped: str | None = None  # the rule that ended the text, if any
    released: str = ""
    _cursor_line: str = field(init=False, default="")
    _suffix_lines: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("line", "block", "full"):
            raise UsageError(f"mode must be line, block or full, got {self.mode!r}")
        self.stops = [s for s in self.stops if s]
        self._cursor_line = self.prefix.rsplit("\n", 1)[-1]
        self._suffix_lines = [ln.strip() for ln in self.suffix.split("\n") if ln.strip()]
        context = self.prefix + self.suffix
        self._style = indent_style(context)
        self._width = _indent_width(context)

    # -- rules ------------------------------------------------------------------------------

    def _rule_cut(self, text: str) -> tuple[int, str] | None:
        """Where a stop rule ends ``text`` (index, rule name), or None."""
        cuts: list[tuple[int, str]] = []
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                cuts.append((at, "stop_sequence"))
        if self.mode == "line":
            at = text.find("\n")
            if at >= 0:
                cuts.append((at, "end_of_line"))
        elif self.mode == "block":
            block = self._block_cut(text)
            if block is not None:
                cuts.append(block)
        return min(cuts) if cuts else None

    def _block_cut(self, text: str) -> tuple[int, str] | None:
        lines = text.split("\n")
        if len(lines) < 2:
            return None
        head = self._cursor_line + lines[0]  # the cursor's whole line, once it is complete
        base = _indent_of(head)
        opens = head.rstrip().endswith(_BLOCK_OPENERS)
        starts = [0]
        for line in lines[:-1]:
            starts.append(starts[-1] + len(line) + 1)
        run_start, run_len = 0, 0
        for i in range(1, len(lines)):
            line, complete = lines[i], i < len(lines) - 1
            if not line.strip():
                if complete:
                    run_start, run_len = (run_start, run_len + 1) if run_len else (i, 1)
                    if run_len >= 2:
                        return starts[run_start] - 1, "blank_lines"
                continue
            run_len = 0
            indent = _indent_of(line)
            if indent < base or (opens and indent <= base):
                return starts[i] - 1, "end_of_block"
            if complete and self._suffix_lines and line.strip() == self._suffix_lines[0]:
                return starts[i] - 1, "suffix_repeat"
        return None

    # -- post-processing --------------------------------------------------------------------

    def _drop_suffix_repeat(self, text: str) -> str:
        """Drop trailing lines, or a same-line tail, that repeat the start of the suffix."""
        if not self._suffix_lines:
            return text
        body = text.rstrip()
        lines = body.split("\n")
        for k in range(min(len(lines) - 1, len(self._suffix_lines)), 0, -1):
            if [ln.strip() for ln in lines[-k:]] == self._suffix_lines[:k]:
                return body[: len(body) - len("\n".join(lines[-k:]))]
        first = self.suffix.split("\n", 1)[0].strip()
        if first and body.endswith(first) and len(body) > len(first):
            kept = body[: -len(first)]
            line = self._cursor_line + kept.rsplit("\n", 1)[-1]
            # Only a surplus tail: with it, the line plus the suffix's line closes more than it opens.
            with_tail, without = _bracket_balance(line + first + first), _bracket_balance(line + first)
            if with_tail < 0 and abs(without) < abs(with_tail):
                return kept
        return text

    def _finish_text(self, text: str, *, ended_by_rule: bool) -> str:
        text = self._drop_suffix_repeat(text)
        if ended_by_rule:
            text = text.rstrip()
        return match_indentation(text, self._style, self._width)

    def _stable(self, text: str) -> str:
        """The part of unfinished ``text`` that no rule can take back later."""
        candidates = [*self.stops]
        first = self.suffix.split("\n", 1)[0].strip()
        if first:
            candidates.append(first)
        text = text[: len(text) - partial_match_length(text, candidates)]
        if self.mode == "line":
            return text.rstrip()
        # Hold back the current (incomplete) line and any trailing lines that may be a repeat
        # of the suffix; completed lines before them passed the block rules already.
        cut = text.rfind("\n")
        if cut < 0:
            return text.rstrip()
        lines = text[:cut].split("\n")
        k = 0
        while k < min(len(lines) - 1, len(self._suffix_lines)):
            if [ln.strip() for ln in lines[len(lines) - k - 1:]] == self._suffix_lines[: k + 1]:
                k += 1
            else:
                break
        kept = "\n".join(lines[: len(lines) - k]) if k else text[:cut]
        return kept.rstrip()

    # -- streaming interface ----------------------------------------------------------------

    def feed(self, piece: str) -> str:
        """Add generated text; return the newly releasable part. Check :attr:`stopped` after."""
        if self.stopped:
            return ""
        self.raw += piece
        cut = self._rule_cut(self.raw)
        if cut is not None:
            self.raw, self.stopped = self.raw[: cut[0]], cut[1]
            return ""
        stable = match_indentation(self._stable(self.raw), self._style, self._width)
        if stable.startswith(self.released) and len(stable) > len(self.released):
            new, self.released = stable[len(self.released):], stable
            return new
        return ""

    def finish(self, *, ended_by_rule: bool | None = None) -> str:
        """The final text's unreleased rest. ``ended_by_rule`` defaults to whether a rule (not the
        model's own end of text) stopped generation; a token limit counts as a rule."""
        by_rule = self.stopped is not None if ended_by_rule is None else ended_by_rule
        final = self._finish_text(self.raw, ended_by_rule=by_rule)
        if not final.startswith(self.released):
            # Cannot happen by construction; never lose text already shown.
            final = self.released
        rest, self.released = final[len(self.released):], final
        return rest

    @property
    def text(self) -> str:
        return self.released
