"""The non-terminal half of ``santa repl``: ``:commands`` and their parsing, option updates, the
working buffer (:class:`Session`) and the text shown for results. Tested without a terminal;
:mod:`santacli.repl.ui` is the prompt_toolkit front end on top of it. No torch import.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from santacli.errors import InputError, UsageError
from santacli.files import read_text_file
from santacli.fim import COMPLETION_MODES, FIM_MODES, parse_cursor_spec, split_at_marker, split_at_position

if TYPE_CHECKING:
    from santacli.completion import CompletionOptions, CompletionResult

DEFAULT_MARKER = "<CURSOR>"

# name -> (usage, help); the order is the order of :help
COMMANDS: dict[str, tuple[str, str]] = {
    "help": (":help", "show this help"),
    "set": (":set [NAME VALUE]", "show the options, or set one (:set temperature 0.2, :set mode line)"),
    "stats": (":stats", "tokens, timings and truncation of the last completion"),
    "accept": (":accept [K]", "append the last completion (candidate K) to the working buffer"),
    "run": (":run", "complete at the working buffer's cursor (same as Enter on an empty line)"),
    "load": (":load FILE[:LINE[:COL]]", "load a file, cursor at LINE:COL (default: its end)"),
    "show": (":show", "print the working buffer with its cursor"),
    "write": (":write FILE", "save the working buffer to FILE"),
    "clear": (":clear", "empty the working buffer and forget the last completion"),
    "quit": (":quit", "leave (Ctrl-D does too)"),
}
ALIASES = {"h": "help", "?": "help", "q": "quit", "exit": "quit", "a": "accept", "s": "set", "w": "write"}


@dataclass(frozen=True)
class Command:
    name: str  # canonical name, a key of COMMANDS
    arg: str  # the rest of the line, stripped (spaces inside are kept: stop strings, paths)


def parse_command(line: str) -> Command | None:
    """A ``:command`` line, or None when the input is code to complete.

    Only single-line input that starts with ``:`` and a letter (or ``:?``) is a command; so a
    pasted block of code is never taken for one. Unambiguous prefixes work (``:acc``).

    Raises:
        UsageError: an unknown command name.
    """
    text = line.strip()
    if "\n" in text or not text.startswith(":") or len(text) < 2:
        return None
    if not (text[1].isalpha() or text[1] == "?"):
        return None
    name, _, arg = text[1:].partition(" ")
    name = name.lower()
    name = ALIASES.get(name, name)
    if name not in COMMANDS:
        # like Vim, any unambiguous prefix will do (:acc, :st)
        matches = [c for c in COMMANDS if c.startswith(name)]
        if len(matches) != 1:
            raise UsageError(f"unknown command :{name}; :help lists the commands")
        name = matches[0]
    return Command(name, arg.strip())


# -- options ----------------------------------------------------------------------------------

OPTION_ALIASES = {"temp": "temperature", "max": "max_tokens", "tokens": "max_tokens", "fim": "fim_mode",
                  "candidates": "n", "file": "filename"}


def parse_int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"expected a whole number, got {raw!r}") from None


def _parse_float(raw: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise UsageError(f"expected a number, got {raw!r}") from None


def _parse_optional_int(raw: str) -> int | None:
    return None if raw.lower() in ("none", "off", "") else parse_int(raw)


def _parse_optional_str(raw: str) -> str | None:
    return None if raw.lower() in ("none", "off", "") else raw


def _parse_bool(raw: str) -> bool:
    value = raw.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"expected on or off, got {raw!r}")


def _parse_stops(raw: str) -> tuple[str, ...]:
    """``none``; a Python literal (``"\\n\\n"`` or ``["\\ndef", "\\nclass"]``) so newlines can be
    written; anything else is one stop string taken literally."""
    if raw.lower() in ("none", "off", ""):
        return ()
    if raw[0] in "'\"[(":
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            hint = "write e.g. '\\n\\n' or ['a', 'b']"
            raise UsageError(f"cannot read stop strings from {raw!r}; {hint}") from None
        if isinstance(value, str):
            value = (value,)
        values = tuple(value) if isinstance(value, list | tuple) else None
        if values is None or not all(isinstance(v, str) and v for v in values):
            raise UsageError("stop must be a string or a list of non-empty strings")
        return values
    return (raw,)


def _choice(choices: Iterable[str]) -> Callable[[str], str]:
    allowed = tuple(choices)

    def parse(raw: str) -> str:
        if raw.lower() not in allowed:
            raise UsageError(f"expected one of {', '.join(allowed)}, got {raw!r}")
        return raw.lower()

    return parse


OPTION_PARSERS: dict[str, Callable[[str], Any]] = {
    "max_tokens": parse_int,
    "temperature": _parse_float,
    "top_p": _parse_float,
    "top_k": parse_int,
    "seed": _parse_optional_int,
    "n": parse_int,
    "mode": _choice(COMPLETION_MODES),
    "fim_mode": _choice(FIM_MODES),
    "stop": _parse_stops,
    "filename": _parse_optional_str,
    "use_filename": _parse_bool,
}


def option_name(name: str) -> str:
    """The CompletionOptions field for ``name`` (aliases, dashes and case allowed)."""
    key = name.strip().lower().replace("-", "_")
    key = OPTION_ALIASES.get(key, key)
    if key not in OPTION_PARSERS:
        raise UsageError(f"unknown option {name!r}; options: {', '.join(OPTION_PARSERS)}")
    return key


def set_option(options: CompletionOptions, name: str, raw: str) -> CompletionOptions:
    """A copy of ``options`` with ``name`` set from its text form ``raw``.

    Raises:
        UsageError: unknown option or invalid value (CompletionOptions validates the result).
    """
    key = option_name(name)
    value = OPTION_PARSERS[key](raw.strip())
    return dataclasses.replace(options, **{key: value})


def parse_set(arg: str) -> tuple[str, str]:
    """Split ``:set`` arguments into the option name and its raw value (``NAME VALUE`` or
    ``NAME=VALUE``); the value keeps inner spaces."""
    name, sep, value = arg.partition("=") if "=" in arg.split(" ", 1)[0] else arg.partition(" ")
    if not name.strip() or not sep:
        raise UsageError("usage: :set NAME VALUE (e.g. :set temperature 0.2)")
    return name.strip(), value.strip()


def describe_options(options: CompletionOptions) -> str:
    return " ".join(f"{f.name}={getattr(options, f.name)!r}" for f in dataclasses.fields(options))


# -- working buffer ---------------------------------------------------------------------------


@dataclass
class Last:
    """The last completion and the text around it."""

    prefix: str
    suffix: str
    result: CompletionResult


@dataclass
class Session:
    """Everything the REPL remembers between inputs; no terminal code."""

    options: CompletionOptions
    marker: str = DEFAULT_MARKER
    before: str = ""  # the working buffer is before + cursor + after
    after: str = ""
    last: Last | None = None

    @property
    def buffer(self) -> str:
        return self.before + self.after

    def request(self, typed: str) -> tuple[str, str]:
        """Prefix and suffix for typed input: it goes in at the buffer's cursor, and a marker in
        it moves the cursor there."""
        split = split_at_marker(typed, self.marker)
        if split is None:
            return self.before + typed, self.after
        head, tail = split
        return self.before + head, tail + self.after

    def accept(self, index: int = 1) -> str:
        """Put the last completion's candidate ``index`` (1-based) into the working buffer and
        leave the cursor after it; returns the accepted text."""
        if self.last is None:
            raise UsageError("nothing to accept yet: type some code first")
        candidates = self.last.result.candidates
        if not 1 <= index <= len(candidates):
            raise UsageError(f"candidate {index} does not exist; there are {len(candidates)}")
        text = candidates[index - 1]
        self.before = self.last.prefix + text
        self.after = self.last.suffix
        self.last = None
        return text

    def load(self, spec: str) -> Path:
        """Load ``FILE``, ``FILE:LINE`` or ``FILE:LINE:COL`` with the cursor there (end of file when
        no line is given); the file name becomes the ``filename`` option.

        Raises:
            UsageError: no file given, or a cursor outside the file.
            InputError: the file cannot be read as UTF-8 text (see :func:`santacli.files.read_text_file`),
                or it contains the cursor marker.
        """
        if not spec:
            raise UsageError("usage: :load FILE[:LINE[:COL]]")
        spec = spec[1:-1] if len(spec) > 1 and spec[0] == spec[-1] and spec[0] in "'\"" else spec
        whole = Path(spec).expanduser()
        if whole.is_file():
            path, cursor = whole, None
        else:
            parsed = parse_cursor_spec(spec)
            path, cursor = Path(parsed.path).expanduser(), parsed
        text = read_text_file(path)
        if self.marker in text:
            raise InputError(f"{path} contains the cursor marker {self.marker!r}; use another --marker")
        if cursor is None:
            self.before, self.after = text, ""
        else:
            self.before, self.after = split_at_position(text, cursor.line, cursor.column)
        self.options = dataclasses.replace(self.options, filename=path.name)
        self.last = None
        return path

    def clear(self) -> None:
        self.before = self.after = ""
        self.last = None


def visible(text: str) -> str:
    """``text`` safe for a terminal: control characters other than newline and tab become their
    Unicode control pictures (a model can emit ``\\r`` or ESC, which would garble the screen)."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in "\n\t":
            out.append(ch)
        elif code < 0x20:
            out.append(chr(0x2400 + code))
        elif code == 0x7F:
            out.append("\u2421")
        elif 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def format_footer(result: CompletionResult) -> str:
    """The one-line summary printed after each completion."""
    parts = [f"{result.generated_tokens} tokens", f"stop: {result.stop_reason}", f"mode: {result.mode}"]
    if result.fim:
        parts.append(f"fim: {result.fim_mode}")
    parts.append(f"first token {result.time_to_first_token * 1000:.0f} ms")
    if result.tokens_per_second:
        parts.append(f"{result.tokens_per_second:.0f} tok/s")
    if result.truncation.any:
        parts.append("prompt truncated")
    return " · ".join(parts)


def help_text(marker: str) -> str:
    width = max(len(usage) for usage, _ in COMMANDS.values())
    lines = [f"  {usage.ljust(width)}  {text}" for usage, text in COMMANDS.values()]
    return "\n".join([
        "Type code and press Enter to complete it. Put " + marker + " in it to fill in the middle there.",
        "Esc Enter / Alt-Enter: newline · Tab: indent · Up/Down, Ctrl-R: history",
        "Ctrl-C: clear the input or cancel a generation · Ctrl-D: quit",
        "",
        *lines,
        "",
        "Options for :set: " + ", ".join(OPTION_PARSERS) + " (aliases: temp, max, fim, file).",
    ])


def default_history_file() -> Path:
    import platformdirs

    return platformdirs.user_data_path("santacli") / "repl_history"
