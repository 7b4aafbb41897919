"""``santa repl``: an interactive completion session on top of :class:`santacli.engine.Engine`.

Typed code is completed (or, when it holds the cursor marker, infilled) and the completion is
streamed to the terminal, then shown syntax-highlighted. A working buffer collects accepted
completions so a session can grow a file piece by piece.

Keys: Enter runs the input; Esc Enter (Alt-Enter) inserts a newline, and pasted text keeps its
newlines; Tab indents (or completes a ``:command``); Up/Down and Ctrl-R walk the
history, which is saved across sessions; Ctrl-C clears the input or cancels a running
generation; Ctrl-D on an empty line quits.

Everything that is not terminal UI (command parsing, option updates, the working buffer) lives in
small functions and :class:`Session` so it can be tested without a terminal. Importing this
module does not import torch: the engine arrives already loaded.
"""

from __future__ import annotations

import ast
import dataclasses
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from santacli import fim
from santacli.errors import InputError, SantaError, UsageError

try:
    import termios
except ImportError:  # Windows
    termios = None  # type: ignore[assignment]

if TYPE_CHECKING:  # the engine module imports torch; only its types are needed here
    from prompt_toolkit.document import Document
    from prompt_toolkit.key_binding import KeyPressEvent
    from rich.console import Console, RenderableType

    from santacli.engine import CompletionOptions, CompletionResult, Engine

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


def _parse_int(raw: str) -> int:
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
    return None if raw.lower() in ("none", "off", "") else _parse_int(raw)


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
    "max_tokens": _parse_int,
    "temperature": _parse_float,
    "top_p": _parse_float,
    "top_k": _parse_int,
    "seed": _parse_optional_int,
    "n": _parse_int,
    "mode": _choice(fim.COMPLETION_MODES),
    "fim_mode": _choice(fim.FIM_MODES),
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
        split = fim.split_at_marker(typed, self.marker)
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
        no line is given); the file name becomes the ``filename`` option."""
        if not spec:
            raise UsageError("usage: :load FILE[:LINE[:COL]]")
        spec = spec[1:-1] if len(spec) > 1 and spec[0] == spec[-1] and spec[0] in "'\"" else spec
        whole = Path(spec).expanduser()
        if whole.is_file():
            path, cursor = whole, None
        else:
            parsed = fim.parse_cursor_spec(spec)
            path, cursor = Path(parsed.path).expanduser(), parsed
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
        if self.marker in text:
            raise InputError(f"{path} contains the cursor marker {self.marker!r}; use another --marker")
        if cursor is None:
            self.before, self.after = text, ""
        else:
            self.before, self.after = fim.split_at_position(text, cursor.line, cursor.column)
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


# -- terminal UI ------------------------------------------------------------------------------


class _Generating:
    """While a completion streams: Ctrl-C cancels it instead of raising KeyboardInterrupt (so the
    engine stops cleanly at the next token and its prompt cache stays consistent), and keys typed
    ahead are not echoed into the output; they wait for the next prompt instead."""

    def __init__(self, cancel: Callable[[], None]) -> None:
        self._cancel = cancel
        self._previous: Any = None
        self._tty: list[Any] | None = None
        self.requested = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self._cancel()

    def __enter__(self) -> _Generating:
        self._previous = signal.signal(signal.SIGINT, self._handler)
        if termios is not None:
            try:
                fd = sys.stdin.fileno()
                self._tty = termios.tcgetattr(fd)
                quiet = termios.tcgetattr(fd)
                quiet[3] &= ~termios.ECHO  # lflag; ISIG stays on for Ctrl-C
                termios.tcsetattr(fd, termios.TCSANOW, quiet)
            except (termios.error, OSError, ValueError):  # stdin is not a terminal
                self._tty = None
        return self

    def __exit__(self, *exc: object) -> None:
        if termios is not None and self._tty is not None:
            try:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, self._tty)
            except (termios.error, OSError, ValueError):
                pass
        signal.signal(signal.SIGINT, self._previous)


class Repl:
    """The prompt_toolkit + rich front end around a :class:`Session`."""

    def __init__(self, engine: Engine, session: Session, *, history_file: Path | None,
                 console: Console | None = None) -> None:
        from rich.console import Console

        self.engine = engine
        self.session = session
        self.console = console or Console(highlight=False)
        self.history_file = history_file
        self._prompt: Any = None

    # the prompt ---------------------------------------------------------------------------

    def _build_prompt(self) -> Any:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
        from prompt_toolkit.completion import Completer, Completion
        from prompt_toolkit.history import FileHistory, InMemoryHistory
        from prompt_toolkit.key_binding import KeyBindings
        from prompt_toolkit.lexers import DynamicLexer, PygmentsLexer

        history: Any = InMemoryHistory()
        if self.history_file is not None:
            try:
                self.history_file.parent.mkdir(parents=True, exist_ok=True)
                history = FileHistory(str(self.history_file))
            except OSError as exc:  # a read-only home must not stop the session
                self.console.print(f"[yellow]history is not saved: {exc}[/]")

        session = self.session

        class CommandCompleter(Completer):
            def get_completions(self, document: Document, complete_event: object) -> Iterator[Completion]:
                text = document.text_before_cursor
                if not text.startswith(":") or "\n" in text:
                    return
                words = text.split(" ")
                if len(words) == 1:
                    for name in COMMANDS:
                        if name.startswith(text[1:]):
                            yield Completion(name, start_position=-(len(text) - 1))
                elif len(words) == 2 and words[0] in (":set", ":s"):
                    for name in OPTION_PARSERS:
                        if name.startswith(words[1]):
                            yield Completion(name + " ", start_position=-len(words[1]))

        keys = KeyBindings()

        # c-j too: lines typed ahead while the model loads arrive with Enter already turned into \n
        @keys.add("enter")
        @keys.add("c-j")
        def _submit(event: KeyPressEvent) -> None:
            event.current_buffer.validate_and_handle()

        @keys.add("escape", "enter")
        def _newline(event: KeyPressEvent) -> None:
            event.current_buffer.newline(copy_margin=True)  # keep the indentation

        @keys.add("tab")
        def _tab(event: KeyPressEvent) -> None:
            buffer = event.current_buffer
            if buffer.text.startswith(":"):
                buffer.start_completion(select_first=False, insert_common_part=True)
            else:
                buffer.insert_text("    ")

        def lexer() -> Any:
            from pygments.lexers import PythonLexer, get_lexer_for_filename
            from pygments.util import ClassNotFound

            try:
                cls = type(get_lexer_for_filename(session.options.filename or "x.py"))
            except ClassNotFound:
                cls = PythonLexer
            return PygmentsLexer(cls)

        def toolbar() -> str:
            o = session.options
            cursor = f" · buffer {len(session.buffer)} chars" if session.buffer else ""
            return (f" max_tokens={o.max_tokens} temperature={o.temperature} mode={o.mode}"
                    f" fim_mode={o.fim_mode} n={o.n}{cursor} · Enter runs · Esc Enter newline · :help")

        return PromptSession(
            history=history, multiline=True, key_bindings=keys, lexer=DynamicLexer(lexer),
            auto_suggest=AutoSuggestFromHistory(), completer=CommandCompleter(), complete_while_typing=False,
            bottom_toolbar=toolbar, prompt_continuation=lambda width, line, soft: "." * (width - 1) + " ",
            enable_history_search=False, mouse_support=False,
        )

    def read(self) -> str:
        if self._prompt is None:
            self._prompt = self._build_prompt()
        return str(self._prompt.prompt("santa> "))

    # output --------------------------------------------------------------------------------

    def _syntax(self, code: str) -> RenderableType:
        from rich.syntax import Syntax

        lexer = Syntax.guess_lexer(self.session.options.filename or "x.py", code)
        return Syntax(visible(code), lexer, background_color="default", word_wrap=True)

    def info(self, text: str) -> None:
        self.console.print(text, style="dim", markup=False)

    def error(self, text: str) -> None:
        self.console.print(f"error: {text}", style="bold red", markup=False)

    def banner(self) -> None:
        info = self.engine.info
        self.console.print(f"santa repl · {info.name} on {info.device} ({info.dtype}, {info.attention})",
                           style="bold", markup=False)
        self.info(f"Enter runs · Esc Enter newline · {self.session.marker} marks an infill point · "
                  ":help · Ctrl-D quits")

    # actions -------------------------------------------------------------------------------

    def complete(self, typed: str) -> None:
        from rich.live import Live
        from rich.text import Text

        prefix, suffix = self.session.request(typed)
        if not prefix and not suffix:
            return
        stream = self.engine.infill(prefix, suffix, self.session.options)
        shown = ""
        with _Generating(stream.cancel) as cancel, \
                Live(Text(""), console=self.console, auto_refresh=False, transient=True,
                     vertical_overflow="crop") as live:
            last_refresh = 0.0
            for chunk in stream:
                shown += chunk
                now = time.monotonic()
                if now - last_refresh > 0.05:  # redrawing per token costs more than generating
                    # only the tail fits; the full text is printed highlighted at the end
                    tail = "\n".join(visible(shown).split("\n")[-max(self.console.height - 3, 1):])
                    live.update(Text(tail, style="dim"), refresh=True)
                    last_refresh = now
            result = stream.result
        self.session.last = Last(prefix, suffix, result)
        candidates = result.candidates
        for index, text in enumerate(candidates, 1):
            if len(candidates) > 1:
                self.console.rule(f"candidate {index} ({result.stop_reasons[index - 1]})", style="dim")
            if text:
                self.console.print(self._syntax(text))
            else:
                self.info("(empty completion)")
        self.info(f"[{format_footer(result)}]" + (" (cancelled with Ctrl-C)" if cancel.requested else ""))

    def stats(self) -> None:
        from rich.table import Table

        if self.session.last is None:
            self.info("no completion yet")
            return
        table = Table(show_header=False, box=None)
        for key, value in self.session.last.result.to_dict().items():
            if key in ("completion", "candidates"):
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            table.add_row(key, str(value))
        self.console.print(table)

    def show(self) -> None:
        from rich.text import Text

        s = self.session
        if not s.buffer:
            self.info("the working buffer is empty")
            return
        text = Text(visible(s.before))
        text.append(s.marker, style="reverse")
        text.append(visible(s.after))
        self.console.print(text)

    def command(self, cmd: Command) -> bool:
        """Run one command; False when the session should end."""
        s = self.session
        if cmd.name == "quit":
            return False
        if cmd.name == "help":
            self.console.print(help_text(s.marker), markup=False)
        elif cmd.name == "set":
            if not cmd.arg:
                self.info(describe_options(s.options))
            else:
                name, raw = parse_set(cmd.arg)
                s.options = set_option(s.options, name, raw)
                key = option_name(name)
                self.info(f"{key} = {getattr(s.options, key)!r}")
        elif cmd.name == "stats":
            self.stats()
        elif cmd.name == "accept":
            text = s.accept(_parse_int(cmd.arg) if cmd.arg else 1)
            self.info(f"accepted {len(text)} characters; the working buffer has {len(s.buffer)} (:show)")
        elif cmd.name == "run":
            self.complete("")
        elif cmd.name == "load":
            path = s.load(" ".join(shlex.split(cmd.arg)) if cmd.arg[:1] in "'\"" else cmd.arg)
            self.info(f"loaded {path} ({len(s.buffer)} characters); Enter completes at the cursor (:show)")
        elif cmd.name == "show":
            self.show()
        elif cmd.name == "write":
            if not cmd.arg:
                raise UsageError("usage: :write FILE")
            target = Path(cmd.arg).expanduser()
            try:
                target.write_text(s.buffer, encoding="utf-8")
            except OSError as exc:
                raise InputError(f"{target}: cannot write it ({exc})") from None
            self.info(f"wrote {len(s.buffer)} characters to {target}")
        elif cmd.name == "clear":
            s.clear()
            self.info("working buffer cleared")
        return True

    def handle(self, text: str) -> bool:
        """Process one submitted input; False when the session should end."""
        try:
            cmd = parse_command(text)
            if cmd is not None:
                return self.command(cmd)
            if text.strip() or self.session.buffer:  # an empty Enter continues the buffer
                self.complete(text)
        except SantaError as exc:
            self.error(str(exc))
        return True

    def loop(self) -> None:
        self.banner()
        while True:
            try:
                text = self.read()
            except KeyboardInterrupt:  # Ctrl-C at the prompt clears the input
                continue
            except EOFError:  # Ctrl-D
                break
            try:
                if not self.handle(text):
                    break
            except KeyboardInterrupt:  # Ctrl-C just before or after a generation
                self.info("cancelled")


def run(engine: Engine, options: CompletionOptions, *, history_file: Path | None = None,
        marker: str = DEFAULT_MARKER, console: Console | None = None) -> None:
    """Run an interactive session until :quit or Ctrl-D.

    Args:
        engine: a loaded engine; its prompt cache keeps repeated prefixes cheap.
        options: the starting completion options (``:set`` changes them for this session).
        history_file: where input history is kept; None uses the platform data directory
            (e.g. ``~/.local/share/santacli/repl_history``).
        marker: the cursor marker that turns an input into an infill request.
    """
    if not marker:
        raise UsageError("the cursor marker must not be empty")
    try:
        import prompt_toolkit  # noqa: F401  (an optional extra: say so before the session starts)
    except ImportError:
        raise SantaError("santa repl needs prompt_toolkit: pip install 'santacli[repl]'") from None
    session = Session(options=options, marker=marker)
    Repl(engine, session, history_file=history_file or default_history_file(), console=console).loop()
