"""One completion pipeline: what a request asks for and returns, the text loop that turns a
model's tokens into completions, and the :class:`CompletionEngine` interface of front ends.

The text loop (:class:`CompletionRun`) is written once, here. It takes the prompt layout from
:mod:`santacli.fim` and a :class:`TokenSource` from whichever engine runs the model (the model
in this process, or a server), and owns streaming detokenization, stop rules and
post-processing (:mod:`santacli.stoprules`), cancellation and the :class:`CompletionResult`.

Stop reasons inside santa are one vocabulary (:data:`STOP_REASONS`); each API maps them to its
own words at its edge. No torch here: ``santa complete --endpoint`` and the server's clients
use this module too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

from santacli import fim
from santacli.errors import SantaError, UsageError
from santacli.fim import Snippet, Truncation, UsedSnippet
from santacli.sampling import SamplingParams
from santacli.settings import Settings
from santacli.speculate import parse_speculate
from santacli.stoprules import CompletionFilter

if TYPE_CHECKING:
    from santacli.tokenizer import Tokenizer

_DEFAULTS = Settings()

# Why a candidate ended: the model's end of text, the token limit, a user stop string, a mode's
# rule (see stoprules.CompletionFilter), a cancelled request, or the line end after the time
# budget ran out (CompletionOptions.time_budget_ms).
STOP_REASONS = ("eos", "max_tokens", "stop_sequence", "end_of_line", "end_of_block", "blank_lines",
                "suffix_repeat", "repetition", "cancelled", "time_budget")


@dataclass(frozen=True)
class CompletionOptions:
    """Options shared by every front end; see ``santa complete --help`` for their meaning.

    Defaults come from :class:`~santacli.settings.Settings`, the one place they are written.
    """

    max_tokens: int = _DEFAULTS.max_tokens
    temperature: float = _DEFAULTS.temperature
    top_p: float = _DEFAULTS.top_p
    top_k: int = _DEFAULTS.top_k
    seed: int | None = None
    n: int = 1
    mode: str = _DEFAULTS.mode
    fim_mode: str = _DEFAULTS.fim_mode
    stop: tuple[str, ...] = ()
    filename: str | None = None  # StarCoder <filename> metadata when the model has it
    use_filename: bool = _DEFAULTS.use_filename
    # Speculative decoding from the prompt: auto | off | N, the most drafted tokens per step.
    # Greedy output is unchanged (see santacli.generate.draft_cap for where it runs).
    speculate: str = _DEFAULTS.speculate
    # Once this many ms have passed since the first token, each candidate ends at its next line
    # end (stop reason "time_budget"), like llama.cpp's t_max_predict_ms. None: no budget.
    time_budget_ms: int | None = None
    # Snippets of other files, ranked (see santacli.context), laid out before the file's text in
    # the room its text leaves, at most context_tokens of it (see fim.build_prompt).
    context: tuple[Snippet, ...] = ()
    context_tokens: int = _DEFAULTS.context_tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UsageError(f"max tokens must be >= 1, got {self.max_tokens}")
        if not 1 <= self.n <= 16:
            raise UsageError(f"candidates must be between 1 and 16, got {self.n}")
        if self.fim_mode not in fim.FIM_MODES:
            raise UsageError(f"fim mode must be psm or spm, got {self.fim_mode!r}")
        if self.mode not in fim.COMPLETION_MODES:
            raise UsageError(f"mode must be one of {', '.join(fim.COMPLETION_MODES)}, got {self.mode!r}")
        self.sampling  # noqa: B018 (validates)
        parse_speculate(self.speculate)
        if self.time_budget_ms is not None and self.time_budget_ms < 1:
            raise UsageError(f"time budget must be >= 1 ms, got {self.time_budget_ms}")
        if self.context_tokens < 0:
            raise UsageError(f"context tokens must be >= 0, got {self.context_tokens}")

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)

    @property
    def metadata_filename(self) -> str | None:
        """The file name to pass as ``<filename>`` metadata, if any."""
        return self.filename if self.use_filename and self.filename else None


@dataclass(frozen=True)
class CompletionResult:
    """The outcome of one completion request, with what the front ends report."""

    text: str  # the first candidate
    candidates: list[str]
    stop_reasons: list[str]
    mode: str  # line, block, full, or raw (a raw prompt: stop strings only)
    fim: bool  # False: left-to-right completion
    fim_mode: str
    prompt_tokens: int
    reused_prompt_tokens: int
    generated_tokens: int  # steps taken: the longest candidate's tokens
    time_to_first_token: float
    tokens_per_second: float
    elapsed: float
    truncation: Truncation
    model: str
    candidate_tokens: tuple[int, ...] = ()  # tokens each candidate took (when known)
    drafted_tokens: int = 0  # speculative decoding: tokens drafted from the prompt
    accepted_tokens: int = 0  # ... and those the model confirmed (output unchanged either way)
    context: tuple[UsedSnippet, ...] = ()  # the snippets of other files the prompt held

    @property
    def stop_reason(self) -> str:
        return self.stop_reasons[0]

    def to_dict(self) -> dict[str, object]:
        return {
            "completion": self.text,
            "candidates": self.candidates,
            "stop_reason": self.stop_reason,
            "stop_reasons": self.stop_reasons,
            "mode": self.mode,
            "fim": self.fim,
            "fim_mode": self.fim_mode if self.fim else None,
            "model": self.model,
            "tokens": {"prompt": self.prompt_tokens, "prompt_reused": self.reused_prompt_tokens,
                       "generated": self.generated_tokens, "drafted": self.drafted_tokens,
                       "accepted": self.accepted_tokens},
            "timings": {"time_to_first_token_s": round(self.time_to_first_token, 4),
                        "tokens_per_s": round(self.tokens_per_second, 2),
                        "total_s": round(self.elapsed, 4)},
            "truncated": {"prefix_chars": self.truncation.prefix_chars,
                          "prefix_lines": self.truncation.prefix_lines,
                          "suffix_chars": self.truncation.suffix_chars,
                          "suffix_lines": self.truncation.suffix_lines},
            "context": [{"path": s.path, "start_line": s.start_line, "end_line": s.end_line, "tokens": s.tokens}
                        for s in self.context],
        }


class Piece(NamedTuple):
    """One step of one candidate, as the text loop saw it."""

    row: int  # the candidate
    token: int | None  # the model's token id (None: text from a server, or the final tail)
    text: str  # what this step added to the candidate's released text (may be "")
    special: bool = False  # a control token (EOS, a FIM sentinel): it ends the row, adds no text


class ResultStream:
    """What every completion stream offers front ends: iterate for the first candidate's text
    as it arrives (or :meth:`pieces` for every candidate's), then read ``result``. ``cancel()``
    (from any thread, e.g. for a disconnected client) ends it at the next token, and the result
    then says ``cancelled``; so does a reader that stops iterating early."""

    def __init__(self) -> None:
        self._result: CompletionResult | None = None
        self._pieces: Iterator[Piece] | None = None
        self.cancelled = False

    def _run(self) -> Iterator[Piece]:
        """The completion itself; sets ``_result`` when it ends."""
        raise NotImplementedError

    def pieces(self) -> Iterator[Piece]:
        """Every candidate's pieces as they come (one run: a second call continues it)."""
        if self._pieces is None:
            self._pieces = self._run()
        return self._pieces

    def __iter__(self) -> Iterator[str]:
        pieces = self.pieces()
        try:
            for piece in pieces:
                if piece.row == 0 and piece.text:
                    yield piece.text
        finally:
            if self._result is None:  # the reader went away: end the run as cancelled
                self.cancel()
                for _ in pieces:
                    pass

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def result(self) -> CompletionResult:
        for _ in self.pieces():
            pass
        if self._result is None:
            raise SantaError("the completion ended without a result")
        return self._result

    def text(self) -> str:
        return self.result.text


# ---------------------------------------------------------------------------------------------
# The text loop


# (row, a token id to detokenize or text a server already detokenized, the source's own end of
# that row: "eos" | "max_tokens" | None)
TokenEvent = tuple[int, int | str, str | None]


class TokenSource(Protocol):
    """Where the text loop's tokens come from: the model in this process, or a server."""

    def __iter__(self) -> Iterator[TokenEvent]: ...

    def stop_row(self, row: int) -> None:
        """The text ended this row (a stop rule): generate no more for it."""

    def close(self) -> None:
        """Generation is over (finished, stopped, cancelled or failed): release what it holds."""

    @property
    def reused_prompt_tokens(self) -> int: ...


class CompletionRun(ResultStream):
    """The text loop: tokens from a :class:`TokenSource` in, candidates' text and a
    :class:`CompletionResult` out.

    Args:
        start: opens the token source; called when iteration begins (not before), so that a
            stream nobody reads never touches the model.
        prompt: the laid-out prompt (its text feeds the stop rules).
        mode: ``line``, ``block``, ``full`` (see :class:`~santacli.stoprules.CompletionFilter`) or
            ``raw`` (stop strings only).
        tokenizer: decodes token ids and says which are control tokens; None for sources
            that only send text.
        include_stop: in ``raw`` mode, keep the text that completed a stop string (TGI).
    """

    def __init__(self, start: Callable[[], TokenSource], *, prompt: fim.Prompt, mode: str,
                 options: CompletionOptions, model: str, tokenizer: Tokenizer | None = None,
                 include_stop: bool = False) -> None:
        super().__init__()
        self._start, self._prompt, self._mode, self._opts = start, prompt, mode, options
        self._model, self._tokenizer, self._include_stop = model, tokenizer, include_stop

    @property
    def prompt_tokens(self) -> int:
        return len(self._prompt.ids)

    def _run(self) -> Iterator[Piece]:
        opts, prompt, tok = self._opts, self._prompt, self._tokenizer
        started = time.perf_counter()
        n = opts.n
        filters = [CompletionFilter(self._mode, prefix=prompt.prefix, suffix=prompt.suffix if prompt.fim else "",
                                    stops=opts.stop, include_stop=self._include_stop) for _ in range(n)]
        decoders = [tok.stream() for _ in range(n)] if tok is not None else []
        specials = tok.sentinel_ids if tok is not None else frozenset()
        reasons: list[str | None] = [None] * n
        counts = [0] * n
        first_token_at: float | None = None
        deadline: float | None = None  # when the time budget runs out
        reused = drafted = accepted = 0
        if self.cancelled:  # cancelled before it started: never touch the model
            reasons = ["cancelled"] * n
        else:
            source = self._start()
            try:
                for row, token, finish in source:
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                        if opts.time_budget_ms is not None:
                            deadline = first_token_at + opts.time_budget_ms / 1000
                    if not 0 <= row < n:
                        continue
                    if reasons[row] is None:
                        counts[row] += 1
                        special = False
                        if isinstance(token, str):
                            raw = token
                        elif token in specials:
                            special, reasons[row] = True, "eos"
                            raw = decoders[row].flush()
                        else:
                            raw = decoders[row].push(token)
                        # Budget spent: the text ends at this line end (the newline is dropped;
                        # line mode ends there anyway, as end_of_line).
                        over = (deadline is not None and not special and "\n" in raw and self._mode != "line"
                                and time.perf_counter() >= deadline)
                        if over:
                            raw = raw[:raw.index("\n")]
                        text = filters[row].feed(raw)
                        if filters[row].stopped or over:
                            reasons[row] = filters[row].stopped or "time_budget"
                            source.stop_row(row)
                        yield Piece(row, None if isinstance(token, str) else token, text, special)
                    if reasons[row] is None and finish is not None:
                        reasons[row] = finish
                    if self.cancelled:
                        reasons = [r or "cancelled" for r in reasons]
                    if all(reasons):
                        break
            finally:
                reused = source.reused_prompt_tokens
                # Optional on a TokenSource: only the local engine drafts.
                drafted = getattr(source, "drafted_tokens", 0)
                accepted = getattr(source, "accepted_tokens", 0)
                source.close()
        texts = []
        for row in range(n):
            tail = ""
            if reasons[row] is None:
                reasons[row] = "max_tokens"
                if decoders:
                    tail = filters[row].feed(decoders[row].flush())
                    reasons[row] = filters[row].stopped or "max_tokens"
            tail += filters[row].finish(ended_by_rule=reasons[row] != "eos")
            if tail:
                yield Piece(row, None, tail)
            texts.append(filters[row].text)
        done = time.perf_counter()
        first = first_token_at or done
        generated = max(counts)
        self._result = CompletionResult(
            text=texts[0], candidates=texts, stop_reasons=[r or "max_tokens" for r in reasons], mode=self._mode,
            fim=prompt.fim, fim_mode=opts.fim_mode, prompt_tokens=len(prompt.ids), reused_prompt_tokens=reused,
            generated_tokens=generated, time_to_first_token=first - started,
            tokens_per_second=(generated - 1) / (done - first) if generated > 1 and done > first else 0.0,
            elapsed=done - started, truncation=prompt.truncation, model=self._model, candidate_tokens=tuple(counts),
            drafted_tokens=drafted, accepted_tokens=accepted, context=prompt.context,
        )


def layout_prompt(tokenizer: Tokenizer, n_positions: int, prefix: str, suffix: str,
                  options: CompletionOptions) -> fim.Prompt:
    """The token-exact, budgeted prompt for ``prefix``/``suffix`` with ``tokenizer``'s sentinels
    (see :func:`santacli.fim.build_prompt`), as local and remote engines both lay it out."""
    name = options.metadata_filename if tokenizer.filename_id is not None else None
    return fim.build_prompt(
        tokenizer.encode, prefix=prefix, suffix=suffix, fim=tokenizer.fim, fim_mode=options.fim_mode,
        n_positions=n_positions, max_tokens=options.max_tokens,
        filename_id=tokenizer.filename_id if name else None, filename=name,
        context=options.context, context_tokens=options.context_tokens,
    )


def raw_prompt(ids: list[int], text: str) -> fim.Prompt:
    """A raw prompt (the client laid it out) as the text loop takes prompts."""
    return fim.Prompt(ids, text, "", False, Truncation())


# ---------------------------------------------------------------------------------------------
# The interface front ends talk to


@dataclass(frozen=True)
class LoadInfo:
    """What was loaded and how."""

    name: str
    folder: Path
    device: str
    dtype: str
    attention: str
    quantize: str
    decode: str  # "native (avx512 ...)" or "pytorch (...why)"
    load_seconds: float
    context_length: int = 0
    prompt: str = ""  # how prompt passes multiply, e.g. "native avx2 (measured at ...)"


class CompletionEngine(Protocol):
    """Completions from a model: :class:`~santacli.engine.Engine` runs it in this process,
    :class:`~santacli.remote.RemoteEngine` asks a server. Every front end talks to this."""

    @property
    def name(self) -> str:
        """The model's name as reported to users."""

    def infill(self, prefix: str, suffix: str, options: CompletionOptions | None = None,
               **overrides: object) -> ResultStream:
        """Fill in the middle between ``prefix`` and ``suffix`` (options validated here)."""

    def complete(self, prefix: str, options: CompletionOptions | None = None,
                 **overrides: object) -> ResultStream:
        """Continue ``prefix`` left to right."""


class LoadedEngine(CompletionEngine, Protocol):
    """A :class:`CompletionEngine` whose model is loaded in this process: what ``santa serve``
    and the REPL need beyond completions."""

    info: LoadInfo

    def prompt_scope(self, scope: str) -> AbstractContextManager[None]:
        """Within the block, completions reuse only warm prompts of ``scope``."""

    def generate_text(self, text: str, options: CompletionOptions, *, include_stop: bool = False,
                      truncate: int | None = None) -> ResultStream:
        """Continue a raw prompt whose spelled-out control tokens count as such; only stop
        strings apply (see :class:`CompletionRun`)."""
