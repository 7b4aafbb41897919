"""The `santa` command line: parse, call the engine, print. Thin by design.

stdout carries only completions (or JSON with --json, or a command's own table); everything
else goes to stderr. Errors are mapped to one-line messages and exit codes in :func:`main`.
No torch at import time: `santa --help` and shell completion stay fast.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.console import Console

from santacli import __version__, catalog
from santacli.errors import InputError, SantaError, UsageError
from santacli.settings import Settings, load_settings

if TYPE_CHECKING:
    from santacli.engine import CompletionOptions, CompletionResult, Engine

err = Console(stderr=True, highlight=False)
app = typer.Typer(
    name="santa",
    help="Code completion and fill-in-the-middle with BigCode's GPTBigCode models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state: dict[str, Any] = {"debug": False, "quiet": False}
DEFAULT_MARKER = "<CURSOR>"


# ---------------------------------------------------------------------------------------------
# Shared options

Model = Annotated[Optional[str], typer.Option(  # noqa: UP045 (typer needs Optional on 3.10)
    "--model", "-m", envvar="SANTA_MODEL", show_envvar=True,
    help="Alias (see `santa models`), hub id or local folder. Default: config file, else the bundled tiny model.")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N (default: cuda if available).")]  # noqa: UP045
Dtype = Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16 or float16.")]  # noqa: UP045
Attention = Annotated[Optional[str], typer.Option(help="Attention backend: auto, flash, sdpa or eager.")]  # noqa: UP045
Quantize = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="none or int8 (CPU: int8 weights, per-channel scales; ~4x faster decode than fp32).")]
Decode = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="CPU decode steps: auto (santa's native kernel where it builds, else PyTorch), native or pytorch.")]
MaxTokens = Annotated[Optional[int], typer.Option("--max-tokens", help="Most tokens to generate.")]  # noqa: UP045
Temperature = Annotated[Optional[float], typer.Option(help="0 is greedy (default).")]  # noqa: UP045
TopP = Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling mass (0, 1].")]  # noqa: UP045
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k most likely tokens (0: all).")]  # noqa: UP045
Seed = Annotated[Optional[int], typer.Option(help="Random seed for sampling.")]  # noqa: UP045
Candidates = Annotated[int, typer.Option("--candidates", "-n", help="Number of candidates (share one prefill).")]
Mode = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="Where to stop: auto, line, block or full (auto: line mid-line, else block).")]
FimMode = Annotated[Optional[str], typer.Option("--fim-mode", help="psm (default) or spm (StarCoder's SPM v2).")]  # noqa: UP045
Stop = Annotated[Optional[list[str]], typer.Option(help="Stop at this string (repeatable).")]  # noqa: UP045
NoFilename = Annotated[bool, typer.Option("--no-filename", help="Don't pass the file name as <filename> metadata.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the text.")]
Endpoint = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="Send the request to a running server (santa serve, TGI, vLLM, llama.cpp) at this URL.")]
Api = Annotated[str, typer.Option(help="Protocol of --endpoint: santa, tgi or openai.")]


@dataclasses.dataclass
class Common:
    """The options every completion command shares, before settings are applied."""

    model: str | None
    device: str | None
    dtype: str | None
    attention: str | None
    quantize: str | None
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    top_k: int | None
    seed: int | None
    n: int
    mode: str | None
    fim_mode: str | None
    stop: list[str] | None
    no_filename: bool
    endpoint: str | None
    api: str
    decode: str | None = None

    def options(self, settings: Settings, filename: str | None) -> CompletionOptions:
        from santacli.completion import CompletionOptions

        def pick(value: Any, default: Any) -> Any:
            return default if value is None else value

        return CompletionOptions(
            max_tokens=pick(self.max_tokens, settings.max_tokens),
            temperature=pick(self.temperature, settings.temperature),
            top_p=pick(self.top_p, settings.top_p),
            top_k=pick(self.top_k, settings.top_k),
            seed=self.seed,
            n=self.n,
            mode=pick(self.mode, settings.mode),
            fim_mode=pick(self.fim_mode, settings.fim_mode),
            stop=tuple(self.stop or ()),
            filename=filename,
            use_filename=settings.use_filename and not self.no_filename,
        )


def _settings() -> Settings:
    return load_settings()


def _hint_if_bundled(settings: Settings, model: str | None) -> None:
    if model is None and settings.model is None and settings.hint and not _state["quiet"]:
        err.print("santa: using the bundled tiny demo model; for real completions try --model santacoder "
                  "(SANTA_NO_HINT=1 hides this)", style="dim", soft_wrap=True)


def load_engine(model: str | None, device: str | None, dtype: str | None, attention: str | None,
                settings: Settings, quantize: str | None = None, decode: str | None = None) -> Engine:
    """Load the model with a spinner on stderr (only when stderr is a terminal)."""
    from santacli.engine import Engine

    _hint_if_bundled(settings, model)
    name = model or settings.resolved_model

    def load() -> Engine:
        return Engine.load(name, device=device or settings.device, dtype=dtype or settings.dtype,
                           attention=attention or settings.attention, quantize=quantize or settings.quantize,
                           decode=decode or settings.decode)

    if err.is_terminal and not _state["quiet"]:
        with err.status(f"Loading {name}…", spinner="dots"):
            return load()
    return load()


def _engine_for(common: Common, settings: Settings) -> Any:
    if common.endpoint:
        from santacli.remote import RemoteEngine

        if common.api not in ("santa", "tgi", "openai"):
            raise UsageError(f"--api must be santa, tgi or openai, got {common.api!r}")
        if common.api != "santa":  # only then does the local model (its tokenizer) matter
            _hint_if_bundled(settings, common.model)
        return RemoteEngine(common.endpoint, api=common.api, model=common.model or settings.resolved_model,
                            api_key=os.environ.get("SANTA_API_KEY"))
    return load_engine(common.model, common.device, common.dtype, common.attention, settings, common.quantize,
                       common.decode)


def _run(engine: Any, prefix: str, suffix: str, opts: CompletionOptions, *, stream_to: Any) -> CompletionResult:
    """Run one completion; stream the first candidate's text to ``stream_to`` if given."""
    stream = engine.infill(prefix, suffix, opts)
    for chunk in stream:
        if stream_to is not None:
            stream_to.write(chunk)
            stream_to.flush()
    return stream.result


def _print_candidates(result: CompletionResult, streamed: bool) -> None:
    out = sys.stdout
    if not streamed:
        out.write(result.text)
    for i, text in enumerate(result.candidates[1:], start=2):
        out.write("\n")
        out.flush()
        err.print(f"── candidate {i} ──", style="dim")
        out.write(text)
    if out.isatty():
        out.write("\n")
    out.flush()


def _report(result: CompletionResult) -> None:
    if _state["quiet"] or not err.is_terminal:
        return
    t = result.truncation
    cut = f", cut {t.prefix_lines} prefix / {t.suffix_lines} suffix lines" if t.any else ""
    err.print(f"{result.generated_tokens} tokens, {result.tokens_per_second:.1f} tok/s, "
              f"first token {result.time_to_first_token * 1000:.0f} ms, stop: {result.stop_reason}{cut}",
              style="dim", soft_wrap=True)


# ---------------------------------------------------------------------------------------------
# Reading input


def read_text_file(path: Path) -> str:
    """A UTF-8 text file, exactly as stored (newlines untouched)."""
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    return _decode(data, str(path))


def _decode(data: bytes, name: str) -> str:
    if b"\x00" in data:
        raise InputError(f"{name}: looks like a binary file (contains NUL bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{name}: not valid UTF-8 (byte {exc.start})") from None


def read_stdin() -> str:
    if sys.stdin is None or sys.stdin.isatty():
        raise InputError("santa infill reads code from stdin: pipe a file in, or use --prefix-file")
    text = _decode(sys.stdin.buffer.read(), "stdin")
    if not text.strip():
        raise InputError("stdin is empty: nothing to complete")
    return text


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path``'s content: write a temp file beside it, keep the mode, then rename."""
    import tempfile

    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".santa-tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _display_name(path: Path) -> str:
    """The file name as metadata: relative to the working directory when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.name


# ---------------------------------------------------------------------------------------------
# Commands


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    debug: Annotated[bool, typer.Option("--debug", envvar="SANTA_DEBUG",
                                        help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No spinner, stats or hints on stderr.")] = False,
) -> None:
    _state["debug"], _state["quiet"] = debug, quiet
    if version:
        sys.stdout.write(f"santa {__version__}\n")
        raise typer.Exit()


@app.command()
def complete(
    cursor: Annotated[str, typer.Argument(metavar="PATH:LINE[:COL]",
                                          help="File and cursor: 1-based line, optional 1-based column.")],
    model: Model = None, max_tokens: MaxTokens = None, temperature: Temperature = None, top_p: TopP = None,
    top_k: TopK = None, seed: Seed = None, candidates: Candidates = 1, mode: Mode = None,
    fim_mode: FimMode = None, stop: Stop = None, device: Device = None, dtype: Dtype = None,
    attention: Attention = None, quantize: Quantize = None, decode: Decode = None, no_filename: NoFilename = False,
    json_out: Json = False,
    in_place: Annotated[bool, typer.Option("--in-place", "-i", help="Write the completion into the file.")] = False,
    diff: Annotated[bool, typer.Option("--diff", help="Print a unified diff instead of the text.")] = False,
    endpoint: Endpoint = None, api: Api = "santa",
) -> None:
    """Complete the code in a file at a cursor; the rest of the file is the suffix."""
    from santacli.fim import parse_cursor_spec, split_at_position

    if sum((in_place, diff, json_out)) > 1:
        raise UsageError("choose one of --in-place, --diff and --json")
    spec = parse_cursor_spec(cursor)
    path = Path(spec.path)
    text = read_text_file(path)
    prefix, suffix = split_at_position(text, spec.line, spec.column)
    settings = _settings()
    common = Common(model, device, dtype, attention, quantize, max_tokens, temperature, top_p, top_k, seed, candidates,
                    mode, fim_mode, stop, no_filename, endpoint, api, decode)
    opts = common.options(settings, _display_name(path))
    engine = _engine_for(common, settings)
    streaming = not (json_out or in_place or diff)
    result = _run(engine, prefix, suffix, opts, stream_to=sys.stdout if streaming else None)
    new_text = prefix + result.text + suffix
    if json_out:
        payload = result.to_dict() | {"path": str(path), "line": spec.line, "column": spec.column}
        sys.stdout.write(_json(payload))
    elif diff:
        sys.stdout.writelines(difflib.unified_diff(
            text.splitlines(keepends=True), new_text.splitlines(keepends=True),
            fromfile=f"a/{spec.path}", tofile=f"b/{spec.path}"))
    elif in_place:
        if result.text:
            write_atomically(path, new_text)
        if not _state["quiet"]:
            err.print(f"santa: inserted {len(result.text)} characters into {path}" if result.text
                      else f"santa: empty completion; {path} left unchanged", style="dim", soft_wrap=True)
    else:
        _print_candidates(result, streamed=True)
    _report(result)


@app.command()
def infill(
    model: Model = None, max_tokens: MaxTokens = None, temperature: Temperature = None, top_p: TopP = None,
    top_k: TopK = None, seed: Seed = None, candidates: Candidates = 1, mode: Mode = None,
    fim_mode: FimMode = None, stop: Stop = None, device: Device = None, dtype: Dtype = None,
    attention: Attention = None, quantize: Quantize = None, decode: Decode = None, no_filename: NoFilename = False,
    json_out: Json = False,
    marker: Annotated[Optional[str], typer.Option(  # noqa: UP045
        help="Cursor marker in the input [default: <CURSOR>; when given, it must be present].")] = None,
    prefix_file: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--prefix-file", help="Read the prefix from this file instead of stdin.")] = None,
    suffix_file: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        "--suffix-file", help="Read the suffix from this file (with --prefix-file).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Print the whole text with the middle inserted.")] = False,
    path: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--path", help="File name of the code, passed as <filename> metadata.")] = None,
    endpoint: Endpoint = None, api: Api = "santa",
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
        split = split_at_marker(text, marker or DEFAULT_MARKER)
        if split is None and marker is not None:
            raise UsageError(f"the cursor marker {marker!r} is not in the input")
        prefix, suffix = split if split is not None else (text, "")
    settings = _settings()
    common = Common(model, device, dtype, attention, quantize, max_tokens, temperature, top_p, top_k, seed, candidates,
                    mode, fim_mode, stop, no_filename, endpoint, api, decode)
    opts = common.options(settings, path)
    engine = _engine_for(common, settings)
    streaming = not (json_out or full)
    result = _run(engine, prefix, suffix, opts, stream_to=sys.stdout if streaming else None)
    if json_out:
        sys.stdout.write(_json(result.to_dict()))
    elif full:
        sys.stdout.write(prefix + result.text + suffix)
        sys.stdout.flush()
    else:
        _print_candidates(result, streamed=True)
    _report(result)


def _json(payload: dict[str, Any]) -> str:
    import json

    return json.dumps(payload, ensure_ascii=False) + "\n"


@app.command()
def models() -> None:
    """List model aliases, what is cached locally and its size."""
    from rich.table import Table

    from santacli.hub import cached_models

    cached = dict(cached_models())
    rows: list[tuple[str, str, str, str]] = []
    for alias in catalog.ALIASES.values():
        if alias.repo_id:
            size = cached.pop(alias.repo_id, None)
            rows.append((alias.name, alias.repo_id, _size(size) if size is not None else "-", alias.description))
        else:
            present = (catalog.BUNDLED_DIR / "config.json").is_file()
            rows.append((alias.name, "(bundled)", "bundled" if present else "missing", alias.description))
    rows += [("", repo_id, _size(size), "in the hub cache") for repo_id, size in cached.items()]
    out = Console()
    if not out.is_terminal:
        # Pipes get plain tab-separated lines, easy to grep and never wrapped.
        sys.stdout.writelines("\t".join(row) + "\n" for row in rows)
        return
    table = Table(title="santa models", title_justify="left")
    for column in ("alias", "model", "cached", "about"):
        table.add_column(column, no_wrap=column != "about")
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


@app.command()
def pull(model: Annotated[str, typer.Argument(help="Alias or hub id to download.")]) -> None:
    """Download a model's config, tokenizer and safetensors into the local hub cache."""
    from santacli.hub import download_model

    folder = download_model(model)
    err.print(f"santa: {model} is ready in {folder}", soft_wrap=True)


@app.command()
def info(
    model: Annotated[Optional[str], typer.Argument(help="Alias, hub id or folder (default: configured).")] = None,  # noqa: UP045
    device: Device = None, dtype: Dtype = None, attention: Attention = None,
) -> None:
    """Show a model's architecture, size, context, FIM sentinels and the backend santa would use."""
    from santacli.engine import describe_model

    settings = _settings()
    facts = describe_model(model or settings.resolved_model, device=device or settings.device,
                           dtype=dtype or settings.dtype, attention=attention or settings.attention)
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        sys.stdout.write(f"{key:<{width}}  {value}\n")


@app.command()
def serve(
    model: Model = None, device: Device = None, dtype: Dtype = None, attention: Attention = None,
    quantize: Quantize = None, decode: Decode = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    api_key: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--api-key", envvar="SANTA_API_KEY", help="Require 'Authorization: Bearer KEY'.")] = None,
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="Allow binding a non-loopback address.")] = False,
    max_queue: Annotated[int, typer.Option("--max-queue", help="Queued requests before 503.")] = 16,
) -> None:
    """Serve completions over HTTP (OpenAI, TGI and native APIs) with the model kept loaded."""
    from santacli import server

    server.check_bind(host, allow_remote=allow_remote)
    settings = _settings()
    engine = load_engine(model, device, dtype, attention, settings, quantize, decode)
    server.serve(engine, host=host, port=port, api_key=api_key, allow_remote=allow_remote, max_queue=max_queue)


@app.command()
def repl(
    model: Model = None, max_tokens: MaxTokens = None, temperature: Temperature = None, top_p: TopP = None,
    top_k: TopK = None, seed: Seed = None, candidates: Candidates = 1, mode: Mode = None,
    fim_mode: FimMode = None, device: Device = None, dtype: Dtype = None, attention: Attention = None,
    quantize: Quantize = None, decode: Decode = None,
    marker: Annotated[str, typer.Option(help="Cursor marker for infill.")] = "<CURSOR>",
    history: Annotated[Optional[Path], typer.Option(  # noqa: UP045
        help="History file [default: santa/history in the platform data dir].")] = None,
) -> None:
    """An interactive session that keeps the model loaded: type code, get completions."""
    from santacli import repl as repl_mod

    settings = _settings()
    common = Common(model, device, dtype, attention, quantize, max_tokens, temperature, top_p, top_k, seed, candidates,
                    mode, fim_mode, None, False, None, "santa")
    opts = common.options(settings, None)
    engine = load_engine(model, device, dtype, attention, settings, quantize, decode)
    repl_mod.run(engine, opts, marker=marker, history_file=history)


# ---------------------------------------------------------------------------------------------
# Entry point: the one place where errors become messages and exit codes


def _click_exceptions() -> tuple[tuple[type[BaseException], ...], ...]:
    """(exit, abort, usage/click errors) from typer's bundled click and plain click, if present."""
    exits: list[type[BaseException]] = [typer.Exit]
    aborts: list[type[BaseException]] = [typer.Abort]
    errors: list[type[BaseException]] = [
        next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")]
    try:
        import click

        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
        errors.append(click.ClickException)
    except ImportError:  # pragma: no cover - newer typer bundles click
        pass
    return tuple(exits), tuple(aborts), tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Run santa; return the exit code (the console script exits with it)."""
    debug = os.environ.get("SANTA_DEBUG", "").lower() in ("1", "true", "yes") or "--debug" in (argv or sys.argv)
    exits, aborts, click_errors = _click_exceptions()
    try:
        # Without standalone mode typer returns an Exit's code (130 for Ctrl-C) instead of exiting.
        code = app(args=argv, prog_name="santa", standalone_mode=False)
        if code == 130:
            raise KeyboardInterrupt
        return code if isinstance(code, int) else 0
    except SantaError as exc:
        if debug:
            raise
        err.print(f"santa: error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except exits as exc:
        return int(getattr(exc, "exit_code", 0))
    except click_errors as exc:
        message = exc.format_message()  # type: ignore[attr-defined]
        err.print(f"santa: error: {message}", markup=False, highlight=False, soft_wrap=True)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        err.print("santa: interrupted", markup=False)
        return 130
    except aborts:
        err.print("santa: interrupted", markup=False)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not an error worth a message.
        try:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
        except OSError:
            pass
        return 141
    except Exception as exc:
        if debug:
            raise
        err.print(f"santa: internal error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)",
                  markup=False, highlight=False, soft_wrap=True)
        return 70


def entry() -> None:  # pragma: no cover - the console script
    sys.exit(main())
