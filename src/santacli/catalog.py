"""Model aliases: short names for the BigCode checkpoints santa knows (no torch, no network)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BUNDLED_ALIAS = "tiny"
BUNDLED_DIR = Path(__file__).parent / "bundled" / "santa-tiny"


@dataclass(frozen=True)
class ModelAlias:
    name: str
    repo_id: str  # hub id, or "" for the bundled model
    description: str


ALIASES: dict[str, ModelAlias] = {a.name: a for a in (
    ModelAlias(BUNDLED_ALIAS, "", "santa-tiny, bundled with santa: small, offline, Python only"),
    ModelAlias("santacoder", "bigcode/gpt_bigcode-santacoder", "SantaCoder 1.1B (Python, Java, JS)"),
    ModelAlias("santacoder-original", "bigcode/santacoder", "SantaCoder 1.1B, original layout"),
    ModelAlias("tiny-starcoder", "bigcode/tiny_starcoder_py", "TinyStarCoder 164M (Python)"),
    ModelAlias("starcoderbase-1b", "bigcode/starcoderbase-1b", "StarCoderBase 1B (80+ languages)"),
    ModelAlias("starcoderbase-3b", "bigcode/starcoderbase-3b", "StarCoderBase 3B"),
    ModelAlias("starcoderbase-7b", "bigcode/starcoderbase-7b", "StarCoderBase 7B"),
    ModelAlias("starcoderbase", "bigcode/starcoderbase", "StarCoderBase 15.5B"),
    ModelAlias("starcoder", "bigcode/starcoder", "StarCoder 15.5B (gated: accept the license on the hub)"),
)}


def lookup(name: str) -> ModelAlias | None:
    return ALIASES.get(name.strip().lower())
