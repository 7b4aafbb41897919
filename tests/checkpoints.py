"""Build tiny random GPTBigCode checkpoints in the Hugging Face layout (no network)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SANTA_SPECIALS = ["<|endoftext|>", "<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>"]
STAR_SPECIALS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
                 "<filename>", "<gh_stars>", "<reponame>"]

_CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    main()\n",
    "# comment héllo wörld 😀 — ünïcode\nvalue = {'key': [1, 2, 3]}\n",
] * 20


def build_tokenizer(specials: list[str] = SANTA_SPECIALS, vocab_size: int = 400) -> Tokenizer:
    """A byte-level BPE with digits split and the given specials first, like the BigCode ones."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_CORPUS, trainer=trainer)
    return tk


def tiny_config(**overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "model_type": "gpt_bigcode",
        "architectures": ["GPTBigCodeForCausalLM"],
        "vocab_size": 400,
        "n_embd": 64,
        "n_layer": 2,
        "n_head": 4,
        "n_positions": 128,
        "n_inner": None,
        "multi_query": True,
        "activation_function": "gelu_pytorch_tanh",
        "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True,
        "attention_softmax_in_fp32": True,
        "scale_attention_softmax_in_fp32": True,
        "bos_token_id": 0,
        "eos_token_id": 0,
    }
    cfg.update(overrides)
    return cfg


def random_state(cfg: dict[str, Any], seed: int = 0, std: float = 0.15) -> dict[str, torch.Tensor]:
    """HF-named random tensors; biases and LayerNorm affine parameters are random too."""
    g = torch.Generator().manual_seed(seed)
    d, layers, heads = cfg["n_embd"], cfg["n_layer"], cfg["n_head"]
    hd = d // heads
    kv = hd if cfg.get("multi_query", True) else d
    inner = cfg.get("n_inner") or 4 * d

    def rnd(*shape: int, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std + mean

    state = {
        "transformer.wte.weight": rnd(cfg["vocab_size"], d),
        "transformer.wpe.weight": rnd(cfg["n_positions"], d),
        "transformer.ln_f.weight": rnd(d, mean=1.0),
        "transformer.ln_f.bias": rnd(d),
    }
    for i in range(layers):
        p = f"transformer.h.{i}."
        state.update({
            p + "ln_1.weight": rnd(d, mean=1.0), p + "ln_1.bias": rnd(d),
            p + "attn.c_attn.weight": rnd(d + 2 * kv, d), p + "attn.c_attn.bias": rnd(d + 2 * kv),
            p + "attn.c_proj.weight": rnd(d, d), p + "attn.c_proj.bias": rnd(d),
            p + "ln_2.weight": rnd(d, mean=1.0), p + "ln_2.bias": rnd(d),
            p + "mlp.c_fc.weight": rnd(inner, d), p + "mlp.c_fc.bias": rnd(inner),
            p + "mlp.c_proj.weight": rnd(d, inner), p + "mlp.c_proj.bias": rnd(d),
        })
    return state


def write_checkpoint(folder: Path, *, tokenizer: Tokenizer | None = None, seed: int = 0,
                     state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
                     **overrides: Any) -> Path:
    """Write config.json, model.safetensors and tokenizer.json into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or build_tokenizer()
    cfg = tiny_config(**overrides)
    if "vocab_size" not in overrides:
        cfg["vocab_size"] = tokenizer.get_vocab_size(with_added_tokens=True)
    state = state if state is not None else random_state(cfg, seed)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def write_endless_checkpoint(folder: Path, *, tokenizer: Tokenizer | None = None, token: str = "a",
                             **overrides: Any) -> Path:
    """A model that repeats ``token`` forever and never emits a special token.

    ln_f's weight is zero, so every position's final hidden state is its bias b; with lm_head
    tied to wte, logits are b · wte[i]: one row is made parallel to b and the specials opposite.
    """
    tokenizer = tokenizer or build_tokenizer()
    cfg = tiny_config(**overrides)
    cfg["vocab_size"] = tokenizer.get_vocab_size(with_added_tokens=True)
    state = random_state(cfg)
    bias = state["transformer.ln_f.bias"]
    bias /= bias.norm()
    state["transformer.ln_f.weight"] = torch.zeros_like(bias)
    wte = state["transformer.wte.weight"]
    for special in tokenizer.get_added_tokens_decoder():
        wte[special] = -10 * bias
    wte[tokenizer.token_to_id(token)] = 10 * bias
    return write_checkpoint(folder, tokenizer=tokenizer, state=state, **overrides)
