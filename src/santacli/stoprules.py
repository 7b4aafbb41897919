"""Where a completion ends and how its text is cleaned up: the stop rules of each mode, user
stop strings, suffix-repeat removal and indentation matching, applied to text as it streams.
Pure text, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from santacli.errors import UsageError

MODES = ("line", "block", "full", "raw")
# A model stuck in a loop within a line ("self._is_is_is_is..."): a piece of 2 to 24 characters
# with a letter in it, repeated 6 times or more at the end of the text. Code does not do that.
_LOOP = re.compile(r"([^\n]{2,24}?)\1{5,}$")  # what fim.choose_mode picks, and raw prompts
_BLOCK_OPENERS = (":", "{", "(", "[")


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


def _repetition_cut(text: str) -> int | None:
    """Where to end ``text`` that ends in a loop: after the repeated piece's first occurrence."""
    match = _LOOP.search(text, max(0, text.rfind("\n") + 1))
    if match is None or not any(c.isalpha() for c in match.group(1)) or len(match.group(0)) < 16:
        return None
    return match.start() + len(match.group(1))


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
    model starts repeating the suffix; both also end at a loop within a line (a short piece
    repeated six times or more: ``repetition``); ``full`` runs until the model stops. User
    ``stops`` strings end the text in every mode. The final text drops a tail that repeats the start of
    the suffix and follows the file's indentation style.

    ``raw`` (raw prompts from TGI/OpenAI clients) applies the stop strings alone and changes
    nothing else; with ``include_stop`` (TGI) the text keeps the whole piece that completed a
    stop string, otherwise (OpenAI, and every other mode) the stop string and what follows go.
    """

    mode: str
    prefix: str = ""
    suffix: str = ""
    stops: Sequence[str] = ()
    include_stop: bool = False
    raw: str = ""
    stopped: str | None = None  # the rule that ended the text, if any
    released: str = ""
    _cursor_line: str = field(init=False, default="")
    _suffix_lines: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
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
                cuts.append((len(text) if self.include_stop else at, "stop_sequence"))
        if self.mode == "line":
            at = text.find("\n")
            if at >= 0:
                cuts.append((at, "end_of_line"))
        elif self.mode == "block":
            block = self._block_cut(text)
            if block is not None:
                cuts.append(block)
        if self.mode in ("line", "block"):  # full and raw run until the model (or a stop string) stops
            loop = _repetition_cut(text)
            if loop is not None:
                cuts.append((loop, "repetition"))
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
        if self.mode == "raw":
            return text
        text = self._drop_suffix_repeat(text)
        if ended_by_rule:
            text = text.rstrip()
        return match_indentation(text, self._style, self._width)

    def _stable(self, text: str) -> str:
        """The part of unfinished ``text`` that no rule can take back later."""
        if self.mode == "raw":
            return text if self.include_stop else text[: len(text) - partial_match_length(text, self.stops)]
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
            # Nothing more comes: the text up to the cut is final, so release it now.
            self.raw, self.stopped = self.raw[: cut[0]], cut[1]
            return self.finish(ended_by_rule=True)
        stable = self._stable(self.raw)
        if self.mode != "raw":
            stable = match_indentation(stable, self._style, self._width)
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
