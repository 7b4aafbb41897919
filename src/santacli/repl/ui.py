"""``santa repl``'s terminal UI: an interactive completion session over a loaded engine
(:class:`santacli.completion.LoadedEngine`).

Typed code is completed (or, when it holds the cursor marker, infilled) and the completion is
streamed to the terminal, then shown syntax-highlighted. A working buffer collects accepted
completions so a session can grow a file piece by piece.

Keys: Enter runs the input; Esc Enter (Alt-Enter) inserts a newline, and pasted text keeps its
newlines; Tab indents (or completes a ``:command``); Up/Down and Ctrl-R walk the
history, which is saved across sessions; Ctrl-C clears the input or cancels a running
generation; Ctrl-D on an empty line quits.

Everything that is not terminal UI (command parsing, option updates, the working buffer) lives in
:mod:`santacli.repl.session` so it can be tested without a terminal. prompt_toolkit is imported
only here, and lazily. Importing this module does not import torch: the engine arrives already
loaded.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from santacli.errors import InputError, SantaError, UsageError
from santacli.files import write_atomically
from santacli.repl.session import (
    COMMANDS,
    DEFAULT_MARKER,
    OPTION_PARSERS,
    Command,
    Last,
    Session,
    default_history_file,
    describe_options,
    format_footer,
    help_text,
    option_name,
    parse_command,
    parse_int,
    parse_set,
    set_option,
    visible,
)

try:
    import termios
except ImportError:  # Windows
    termios = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from prompt_toolkit.document import Document
    from prompt_toolkit.key_binding import KeyPressEvent
    from rich.console import Console, RenderableType

    from santacli.completion import CompletionOptions, LoadedEngine

# -- terminal UI ------------------------------------------------------------------------------


@contextlib.contextmanager
def no_echo() -> Iterator[None]:
    """Keys typed meanwhile (while the model loads or a completion streams) are not echoed
    raw into the output (``^[[A``); they wait in the input for the next prompt. Ctrl-C still
    works. Does nothing when stdin is not a terminal."""
    saved: list[Any] | None = None
    if termios is not None:
        try:
            fd = sys.stdin.fileno()
            saved = termios.tcgetattr(fd)
            quiet = termios.tcgetattr(fd)
            quiet[3] &= ~termios.ECHO  # lflag; ISIG stays on for Ctrl-C
            termios.tcsetattr(fd, termios.TCSANOW, quiet)
        except (termios.error, OSError, ValueError):  # stdin is not a terminal
            saved = None
    try:
        yield
    finally:
        if termios is not None and saved is not None:
            try:
                termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, saved)
            except (termios.error, OSError, ValueError):
                pass


class _Generating:
    """While a completion streams: Ctrl-C cancels it instead of raising KeyboardInterrupt (so the
    engine stops cleanly at the next token and its prompt cache stays consistent), and keys typed
    ahead are not echoed into the output (:func:`no_echo`)."""

    def __init__(self, cancel: Callable[[], None]) -> None:
        self._cancel = cancel
        self._previous: Any = None
        self._quiet = no_echo()
        self.requested = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self._cancel()

    def __enter__(self) -> _Generating:
        self._previous = signal.signal(signal.SIGINT, self._handler)
        self._quiet.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._quiet.__exit__(None, None, None)
        signal.signal(signal.SIGINT, self._previous)


class Repl:
    """The prompt_toolkit + rich front end around a :class:`Session`."""

    def __init__(self, engine: LoadedEngine, session: Session, *, history_file: Path | None,
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
            text = s.accept(parse_int(cmd.arg) if cmd.arg else 1)
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
                write_atomically(target, s.buffer)
            except OSError as exc:
                raise InputError(f"{target}: cannot write it ({exc.strerror or exc})") from None
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


def run(engine: LoadedEngine, options: CompletionOptions, *, history_file: Path | None = None,
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
