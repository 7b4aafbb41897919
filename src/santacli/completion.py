"""What a completion request asks for and what it returns, shared by local and remote engines.

No torch here: ``santa complete --endpoint`` and the server's client side use these too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from santacli import fim
from santacli.errors import SantaError, UsageError
from santacli.fim import Truncation
from santacli.sampling import SamplingParams


@dataclass(frozen=True)
class CompletionOptions:
    """Options shared by every front end; see ``santa complete --help`` for their meaning."""

    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    n: int = 1
    mode: str = "auto"
    fim_mode: str = "psm"
    stop: tuple[str, ...] = ()
    filename: str | None = None  # StarCoder <filename> metadata when the model has it
    use_filename: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UsageError(f"max tokens must be >= 1, got {self.max_tokens}")
        if not 1 <= self.n <= 16:
            raise UsageError(f"candidates must be between 1 and 16, got {self.n}")
        if self.fim_mode not in fim.FIM_MODES:
            raise UsageError(f"fim mode must be psm or spm, got {self.fim_mode!r}")
        if self.mode not in fim.COMPLETION_MODES:
            raise UsageError(f"mode must be one of {', '.join(fim.COMPLETION_MODES)}, got {self.mode!r}")
        SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)  # validates


@dataclass(frozen=True)
class CompletionResult:
    """The outcome of one completion request, with what the front ends report."""

    text: str  # the first candidate
    candidates: list[str]
    stop_reasons: list[str]
    mode: str
    fim: bool  # False: left-to-right completion
    fim_mode: str
    prompt_tokens: int
    reused_prompt_tokens: int
    generated_tokens: int
    time_to_first_token: float
    tokens_per_second: float
    elapsed: float
    truncation: Truncation
    model: str

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
                       "generated": self.generated_tokens},
            "timings": {"time_to_first_token_s": round(self.time_to_first_token, 4),
                        "tokens_per_s": round(self.tokens_per_second, 2),
                        "total_s": round(self.elapsed, 4)},
            "truncated": {"prefix_chars": self.truncation.prefix_chars,
                          "prefix_lines": self.truncation.prefix_lines,
                          "suffix_chars": self.truncation.suffix_chars,
                          "suffix_lines": self.truncation.suffix_lines},
        }


class ResultStream:
    """What every completion stream offers front ends: iterate for the first candidate's text
    as it arrives, then read ``result``; ``cancel()`` (from any thread, e.g. for a disconnected
    client) ends it at the next piece, and the result then says ``cancelled``."""

    def __init__(self) -> None:
        self._result: CompletionResult | None = None
        self.cancelled = False

    def __iter__(self) -> Iterator[str]:
        raise NotImplementedError

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def result(self) -> CompletionResult:
        if self._result is None:
            for _ in self:
                pass
        if self._result is None:
            raise SantaError("the completion ended without a result")
        return self._result

    def text(self) -> str:
        return self.result.text
