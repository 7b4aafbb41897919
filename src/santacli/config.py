"""ModelConfig: the architecture read from a checkpoint's config.json.

Keys use Hugging Face names (and their aliases). Every key that changes the math is either
honoured or rejected with a clear error; unknown keys are ignored. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from santacli.errors import ConfigError

SUPPORTED_ACTIVATIONS = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new", "gelu", "relu", "silu", "tanh")
SUPPORTED_MODEL_TYPES = ("gpt_bigcode", "gpt2 with attention_head_type=multiquery (original santacoder)")

# HF alias -> canonical key.
_ALIASES = {
    "hidden_size": "n_embd",
    "num_hidden_layers": "n_layer",
    "num_attention_heads": "n_head",
    "max_position_embeddings": "n_positions",
}


@dataclass(frozen=True)
class ModelConfig:
    """The GPTBigCode hyper-parameters that santa needs, with config.json's key names."""

    vocab_size: int
    n_embd: int
    n_layer: int
    n_head: int
    n_positions: int
    n_inner: int | None = None
    multi_query: bool = True
    activation_function: str = "gelu_pytorch_tanh"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    attention_softmax_in_fp32: bool = True
    scale_attention_softmax_in_fp32: bool = True
    model_type: str = "gpt_bigcode"
    # True when the checkpoint uses the original bigcode/santacoder layout (Conv1D weights,
    # separate q_attn/kv_attn); weights.py converts it on load.
    original_santacoder_layout: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"config.json: n_embd ({self.n_embd}) is not divisible by n_head ({self.n_head})"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ConfigError(f"config.json: n_inner must be a positive integer or null, got {self.n_inner!r}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"config.json: activation_function {self.activation_function!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise ConfigError(f"config.json: layer_norm_epsilon must be positive, got {self.layer_norm_epsilon!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads: 1 for multi-query attention."""
        return 1 if self.multi_query else self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def num_parameters(self) -> int:
        """Parameter count (lm_head is tied to wte, so it is not counted twice)."""
        d, kv = self.n_embd, self.kv_heads * self.head_dim
        attn = d * (d + 2 * kv) + (d + 2 * kv) + d * d + d
        mlp = d * self.inner_dim + self.inner_dim + self.inner_dim * d + d
        block = attn + mlp + 4 * d
        return self.vocab_size * d + self.n_positions * d + self.n_layer * block + 2 * d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from a parsed config.json, resolving aliases and the original santacoder keys."""
        data = dict(raw)
        for alias, key in _ALIASES.items():
            if key not in data and alias in data:
                data[key] = data[alias]
        model_type = data.get("model_type")
        original = False
        if model_type == "gpt2" and data.get("attention_head_type") == "multiquery":
            original = True
            data["multi_query"] = True
        elif model_type != "gpt_bigcode":
            raise ConfigError(
                f"config.json: model_type {model_type!r} is not supported; supported: "
                + "; ".join(SUPPORTED_MODEL_TYPES)
            )
        if data.get("add_cross_attention"):
            raise ConfigError("config.json: add_cross_attention models are not supported (santa runs decoders only)")
        for required in ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"):
            if required not in data:
                raise ConfigError(f"config.json: missing required key {required!r}")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known and k != "original_santacoder_layout"}
        kwargs["model_type"] = "gpt_bigcode"
        for flag in ("multi_query", "scale_attn_weights", "attention_softmax_in_fp32",
                     "scale_attention_softmax_in_fp32"):
            if flag in kwargs and not isinstance(kwargs[flag], bool):
                raise ConfigError(f"config.json: {flag} must be true or false, got {kwargs[flag]!r}")
        return cls(**kwargs, original_santacoder_layout=original)

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json; is this a model folder?") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config.json ({exc})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: config.json must hold a JSON object")
        return cls.from_dict(raw)
