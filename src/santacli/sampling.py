"""How the next token is chosen: the options, validated. No torch here (front ends that only
talk to a server use it too); generate.py does the sampling itself."""

from __future__ import annotations

import math
from dataclasses import dataclass

from santacli.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. ``temperature == 0`` is greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (0 <= self.temperature < math.inf):
            raise UsageError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise UsageError(f"seed must be a 64-bit number (0 to {2**64 - 1}), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
