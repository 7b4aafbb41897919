"""The options the CLI's commands share: their Typer declarations (one ``Annotated`` type per
option, so every command spells a flag the same way) and :class:`CommonOptions`, the one object
a command builds from its flags. It turns them into :class:`~santacli.completion.CompletionOptions`
and an engine, applying the user's settings where a flag was not given (flag > settings).

Engines are imported lazily inside functions: ``santa --help`` never imports torch.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer

from santacli.cli.output import err, state
from santacli.errors import UsageError
from santacli.settings import Settings

if TYPE_CHECKING:
    from santacli.completion import CompletionEngine, CompletionOptions, LoadedEngine
    from santacli.daemon import ModelSpec

DEFAULT_MARKER = "<CURSOR>"
APIS = ("santa", "tgi", "openai")

# -- option declarations ----------------------------------------------------------------------
# (typer needs Optional on Python 3.10, hence the UP045 exceptions)

def _choices(*values: str) -> Callable[[str], list[str]]:
    """Shell completion for an option with fixed values (the shells offer files otherwise)."""
    return lambda incomplete: [v for v in values if v.startswith(incomplete)]


def complete_model(incomplete: str) -> list[tuple[str, str]]:
    """Shell completion for --model: the aliases of `santa models`, with their descriptions."""
    from santacli.catalog import ALIASES

    return [(a.name, a.description) for a in ALIASES.values() if a.name.startswith(incomplete)]


Model = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--model", "-m", envvar="SANTA_MODEL", show_envvar=True, autocompletion=complete_model,
    help="Alias (see `santa models`), hub id or local folder. Default: config file, else the bundled tiny model.")]
Device = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="cpu, cuda or cuda:N (default: cuda if available).",
    autocompletion=_choices("cpu", "cuda", "auto"))]
Dtype = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="auto, float32, bfloat16 or float16.",
    autocompletion=_choices("auto", "float32", "bfloat16", "float16"))]
Attention = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="Attention backend: auto, flash, sdpa or eager.",
    autocompletion=_choices("auto", "flash", "sdpa", "eager"))]
Quantize = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="none or int8 (CPU: int8 weights, per-channel scales; ~4x faster decode than fp32).",
    autocompletion=_choices("none", "int8"))]
Decode = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="CPU decode steps: auto (the native kernel of santa where it builds, else PyTorch), native or pytorch.",
    autocompletion=_choices("auto", "native", "pytorch"))]
Speculate = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="Speculative decoding from the prompt: auto (where it measures faster), off, or N (most drafted tokens "
         "per step). Greedy output is unchanged.", autocompletion=_choices("auto", "off", "4", "8"))]
TimeBudget = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--time-budget", metavar="MS",
    help="Once this many ms have passed since the first token, stop at the next line end.")]
MaxTokens = Annotated[Optional[int], typer.Option("--max-tokens", help="Most tokens to generate.")]  # noqa: UP045
Temperature = Annotated[Optional[float], typer.Option(help="0 is greedy (default).")]  # noqa: UP045
TopP = Annotated[Optional[float], typer.Option("--top-p", help="Nucleus sampling mass (0, 1].")]  # noqa: UP045
TopK = Annotated[Optional[int], typer.Option("--top-k", help="Sample from the k most likely tokens (0: all).")]  # noqa: UP045
Seed = Annotated[Optional[int], typer.Option(help="Random seed for sampling.")]  # noqa: UP045
Candidates = Annotated[int, typer.Option("--candidates", "-n", help="Number of candidates (share one prefill).")]
Mode = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="Where to stop: auto, line, block or full (auto: line mid-line, else block).",
    autocompletion=_choices("auto", "line", "block", "full"))]
FimMode = Annotated[Optional[str], typer.Option(  # noqa: UP045
    "--fim-mode", help="psm (default) or spm (the SPM v2 of StarCoder).",
    autocompletion=_choices("psm", "spm"))]
Stop = Annotated[Optional[list[str]], typer.Option(help="Stop at this string (repeatable).")]  # noqa: UP045
NoFilename = Annotated[bool, typer.Option("--no-filename", help="Do not pass the file name as <filename> metadata.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the text.")]
Null = Annotated[bool, typer.Option(
    "--null", "-z", help="End every candidate with a NUL byte (for -n > 1 in scripts).")]
Endpoint = Annotated[Optional[str], typer.Option(  # noqa: UP045
    help="Send the request to a running server (santa serve, TGI, vLLM, llama.cpp) at this URL.")]
Api = Annotated[str, typer.Option(help="Protocol of --endpoint: santa, tgi or openai.",
    autocompletion=_choices("santa", "tgi", "openai"))]
# Cross-file context (complete, infill): see santacli.context.
ContextFiles = Annotated[Optional[list[Path]], typer.Option(  # noqa: UP045
    "--context", metavar="PATH",
    help="Show the model snippets of this file, or of the files in this folder (repeatable).")]
NoContext = Annotated[bool, typer.Option(
    "--no-context", help="No snippets from the git repository of the file (files given with --context still count).")]
ContextTokens = Annotated[Optional[int], typer.Option(  # noqa: UP045
    "--context-tokens", metavar="N",
    help="Most prompt tokens for snippets of other files; the text of the file itself comes first "
         "[default: 512; 0: none].")]

# Flag parameter name -> (declaration, default), in --help order; "candidates" is CommonOptions.n.
_MODEL_FLAGS: dict[str, tuple[Any, Any]] = {
    "model": (Model, None), "max_tokens": (MaxTokens, None), "temperature": (Temperature, None),
    "top_p": (TopP, None), "top_k": (TopK, None), "seed": (Seed, None), "candidates": (Candidates, 1),
    "mode": (Mode, None), "fim_mode": (FimMode, None), "stop": (Stop, None), "device": (Device, None),
    "dtype": (Dtype, None), "attention": (Attention, None), "quantize": (Quantize, None),
    "decode": (Decode, None), "speculate": (Speculate, None), "time_budget": (TimeBudget, None),
    "no_filename": (NoFilename, False), "null": (Null, False), "context": (ContextFiles, None),
    "no_context": (NoContext, False), "context_tokens": (ContextTokens, None),
}
# Only for commands that complete text from files or stdin:
_FILE_FLAGS = ("stop", "no_filename", "null", "context", "no_context", "context_tokens")
_REMOTE_FLAGS: dict[str, tuple[Any, Any]] = {"endpoint": (Endpoint, None), "api": (Api, APIS[0])}


def with_common_options(*, files: bool = True, remote: bool = True
                        ) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Give a command the shared completion flags, declared once here: its Typer signature gains
    them (before its own flags; ``--endpoint``/``--api`` after them, with ``remote``), and it
    receives them as one :class:`CommonOptions` in its first parameter."""

    def wrap(command: Callable[..., None]) -> Callable[..., None]:
        shared = {k: v for k, v in _MODEL_FLAGS.items() if files or k not in _FILE_FLAGS}
        tail = _REMOTE_FLAGS if remote else {}
        own = list(inspect.signature(command, eval_str=True).parameters.values())[1:]
        kw = inspect.Parameter.KEYWORD_ONLY
        params = [*(inspect.Parameter(k, kw, annotation=a, default=d) for k, (a, d) in shared.items()),
                  *(p.replace(kind=kw) for p in own),
                  *(inspect.Parameter(k, kw, annotation=a, default=d) for k, (a, d) in tail.items())]

        @functools.wraps(command)
        def run(**flags: Any) -> None:
            common = {("n" if k == "candidates" else k): flags.pop(k) for k in (*shared, *tail)}
            command(CommonOptions(**common), **flags)

        run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        return run

    return wrap


# -- the shared options as one object ---------------------------------------------------------

T = TypeVar("T")


def _pick(flag: T | None, setting: T) -> T:
    """A flag wins over the settings when it was given."""
    return setting if flag is None else flag


@dataclass(frozen=True, kw_only=True)
class CommonOptions:
    """What a completion command's shared flags say, before settings are applied; None means
    "not given". A command builds it once, with keyword arguments, from its parameters."""

    # which model, and how to run it
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    attention: str | None = None
    quantize: str | None = None
    decode: str | None = None
    speculate: str | None = None
    time_budget: int | None = None  # ms
    # what to generate
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = 1
    mode: str | None = None
    fim_mode: str | None = None
    stop: list[str] | None = None
    no_filename: bool = False
    null: bool = False  # -z: NUL after each candidate on stdout
    context: list[Path] | None = None  # --context files and folders
    no_context: bool = False
    context_tokens: int | None = None
    # where it runs: this process, or a server
    endpoint: str | None = None
    api: str = APIS[0]

    def completion_options(self, settings: Settings, filename: str | None) -> CompletionOptions:
        """The request options: each flag if given, else its setting.

        Raises:
            UsageError: an invalid value (CompletionOptions validates them).
        """
        from santacli.completion import CompletionOptions

        opts = CompletionOptions(
            max_tokens=_pick(self.max_tokens, settings.max_tokens),
            temperature=_pick(self.temperature, settings.temperature),
            top_p=_pick(self.top_p, settings.top_p),
            top_k=_pick(self.top_k, settings.top_k),
            seed=self.seed,
            n=self.n,
            mode=_pick(self.mode, settings.mode),
            fim_mode=_pick(self.fim_mode, settings.fim_mode),
            stop=tuple(self.stop or ()),
            filename=filename,
            use_filename=settings.use_filename and not self.no_filename,
            speculate=_pick(self.speculate, settings.speculate),
            time_budget_ms=self.time_budget,
        )
        if opts.n > 1 and opts.sampling.greedy and not state.quiet:
            err.print(f"santa: warning: greedy decoding (temperature 0) gives {opts.n} identical candidates; "
                      "pass --temperature (e.g. 0.8) for different ones", style="yellow", soft_wrap=True)
        return opts

    def with_context(self, opts: CompletionOptions, settings: Settings, prefix: str, suffix: str, *,
                     target: Path | None) -> CompletionOptions:
        """``opts`` with the snippets of other files for this cursor: from ``target``'s git
        repository unless ``--no-context``, and from ``--context`` files (flag > settings for the
        budget).

        Raises:
            UsageError, InputError: a --context path is missing or unreadable; a negative budget.
        """
        from dataclasses import replace

        from santacli.context import for_cursor

        budget = _pick(self.context_tokens, settings.context_tokens)
        if budget < 0:
            raise UsageError(f"--context-tokens must be >= 0, got {budget}")
        if budget == 0:
            return replace(opts, context_tokens=0)
        snippets = for_cursor(prefix, suffix, target=target, repository=not self.no_context, files=self.context or ())
        return replace(opts, context=snippets, context_tokens=budget)

    def engine(self, settings: Settings) -> CompletionEngine:
        """A server's engine with ``--endpoint``; else the per-user daemon when one runs (or is
        started on first use, ``daemon = "auto"``); else the model loaded here."""
        if not self.endpoint:
            return self._daemon_engine(settings) or self.load_engine(settings)
        from santacli.remote import RemoteEngine

        if self.api not in APIS:
            raise UsageError(f"--api must be santa, tgi or openai, got {self.api!r}")
        if self.api != "santa":  # only then does the local model (its tokenizer) matter
            hint_if_bundled(settings, self.model)
        return RemoteEngine(self.endpoint, api=self.api, model=self.model or settings.resolved_model,
                            api_key=os.environ.get("SANTA_API_KEY"))

    def model_spec(self, settings: Settings) -> ModelSpec:
        """Which model to run and how: flags, else settings."""
        from santacli.daemon import ModelSpec

        return ModelSpec(model=self.model or settings.resolved_model, device=self.device or settings.device,
                         dtype=self.dtype or settings.dtype, attention=self.attention or settings.attention,
                         quantize=self.quantize or settings.quantize, decode=self.decode or settings.decode)

    def _daemon_engine(self, settings: Settings) -> CompletionEngine | None:
        if settings.daemon == "off":
            return None
        from santacli import daemon
        from santacli.remote import RemoteEngine

        spec = self.model_spec(settings)
        if daemon.status() is None:
            if settings.daemon != "auto":
                return None
            hint_if_bundled(settings, self.model)
            with err.status("Starting the santa daemon…", spinner="dots") if err.is_terminal and not state.quiet \
                    else contextlib.nullcontext():
                daemon.start(spec, idle_minutes=settings.daemon_idle_minutes)
        # A model switch in the daemon can take as long as a load.
        return RemoteEngine(f"unix:{daemon.socket_path()}", api="santa", model=spec.model, model_spec=spec,
                            timeout=daemon.START_TIMEOUT)

    def load_engine(self, settings: Settings) -> LoadedEngine:
        """Load the model in this process, with a spinner on stderr (only on a terminal)."""
        hint_if_bundled(settings, self.model)
        spec = self.model_spec(settings)
        if err.is_terminal and not state.quiet:
            with err.status(f"Loading {spec.model}…", spinner="dots"):
                return load_model(spec)
        return load_model(spec)


def load_model(spec: ModelSpec) -> LoadedEngine:
    """The model ``spec`` names, loaded in this process (imports torch)."""
    from santacli.engine import Engine

    return Engine.load(spec.model, device=spec.device, dtype=spec.dtype, attention=spec.attention,
                       quantize=spec.quantize, decode=spec.decode)


def hint_if_bundled(settings: Settings, model: str | None) -> None:
    """One dim line on stderr when the bundled demo model is used without being asked for."""
    if model is None and settings.model is None and settings.hint and not state.quiet:
        err.print("santa: using the bundled tiny demo model; for real completions try --model santacoder "
                  "(SANTA_NO_HINT=1 hides this)", style="dim", soft_wrap=True)
