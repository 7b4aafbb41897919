"""What the editor may configure: ``initializationOptions`` at start and
``workspace/didChangeConfiguration`` later, under a ``santa`` section (or flat).

Keys use LSP's camelCase: ``model``, ``endpoint``, ``maxTokens``, ``mode``, ``budgetMs``.
Unset keys keep the value from ``santa lsp``'s flags and the user's config.toml (flag > setting).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from santacli.errors import UsageError
from santacli.fim import COMPLETION_MODES
from santacli.settings import Settings

SECTION = "santa"
DEFAULT_BUDGET_MS = 2000
MAX_BUDGET_MS = 600_000

# client key -> LspConfig field
_KEYS = {"model": "model", "endpoint": "endpoint", "maxTokens": "max_tokens", "mode": "mode",
         "budgetMs": "budget_ms"}


@dataclass(frozen=True)
class LspConfig:
    """The server's settings; ``model``/``endpoint`` None means the command line's choice."""

    model: str | None = None
    endpoint: str | None = None  # a running ``santa serve`` (or TGI/OpenAI server) instead of a local model
    max_tokens: int = Settings.max_tokens
    mode: str = Settings.mode
    budget_ms: int = DEFAULT_BUDGET_MS  # after this a completion stops and returns what it has

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UsageError(f"maxTokens must be >= 1, got {self.max_tokens}")
        if self.mode not in COMPLETION_MODES:
            raise UsageError(f"mode must be one of {', '.join(COMPLETION_MODES)}, got {self.mode!r}")
        if not 1 <= self.budget_ms <= MAX_BUDGET_MS:
            raise UsageError(f"budgetMs must be between 1 and {MAX_BUDGET_MS}, got {self.budget_ms}")

    @property
    def budget(self) -> float:
        """The time budget in seconds."""
        return self.budget_ms / 1000

    @property
    def engine_choice(self) -> tuple[str | None, str | None]:
        """What decides which engine runs: a change means loading another."""
        return self.model, self.endpoint

    def merged(self, values: Mapping[str, Any]) -> LspConfig:
        """This config with the client's ``values`` applied (null: back to the command line's
        choice for model/endpoint, else keep).

        Raises:
            UsageError: an unknown key or a bad value; nothing is applied then.
        """
        unknown = sorted(set(values) - set(_KEYS))
        if unknown:
            raise UsageError(f"unknown santa setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(_KEYS)}")
        changes: dict[str, Any] = {}
        for key, value in values.items():
            field = _KEYS[key]
            if field in ("model", "endpoint"):
                if value is not None and not (isinstance(value, str) and value.strip()):
                    raise UsageError(f"{key} must be a non-empty string or null, got {value!r}")
                changes[field] = value
            elif value is None:
                continue
            elif field == "mode":
                if not isinstance(value, str):
                    raise UsageError(f"mode must be a string, got {value!r}")
                changes[field] = value
            else:  # integers; JSON has no int type, so accept 64.0 but not 64.5 or true
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                    raise UsageError(f"{key} must be an integer, got {value!r}")
                changes[field] = int(value)
        return replace(self, **changes)


def section(payload: object) -> Mapping[str, Any] | None:
    """The santa settings in an ``initializationOptions`` or ``settings`` payload: its ``santa``
    object, else the payload itself when it names any of santa's keys (then its other keys are
    reported as unknown by :meth:`LspConfig.merged`); None if absent.

    Raises:
        UsageError: a ``santa`` entry that is not an object.
    """
    if not isinstance(payload, Mapping):
        return None
    if SECTION in payload:
        inner = payload[SECTION]
        if inner is None:
            return None
        if not isinstance(inner, Mapping):
            raise UsageError(f"the {SECTION!r} settings must be an object, got {inner!r}")
        return inner
    if set(payload) & set(_KEYS):
        return payload
    return None
