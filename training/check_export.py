"""Check an exported folder: loads with santacli and transformers, logits agree, greedy samples.

    python -m training.check_export src/santacli/bundled/santa-tiny
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def greedy(model, tok, ids: list[int], n: int, stops=(0, 1, 2, 3, 4)) -> str:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([ids + out][-model.config.n_positions:])
            nxt = int(model(x)[0, -1].argmax())
            if nxt in stops:
                break
            out.append(nxt)
    return tok.decode(out)


def main() -> None:
    from tokenizers import Tokenizer

    from santacli.config import ModelConfig
    from santacli.weights import load_model

    folder = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "src/santacli/bundled/santa-tiny")
    cfg = ModelConfig.from_file(folder / "config.json")
    model = load_model(folder, cfg, device=torch.device("cpu"), dtype=torch.float32, backend="sdpa")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    print("santacli load_model: ok,", cfg.num_parameters, "params")
    try:
        from transformers import GPTBigCodeForCausalLM

        hf = GPTBigCodeForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
        ids = torch.tensor([tok.encode("import os\n\ndef main():\n    ").ids])
        with torch.no_grad():
            diff = (hf(ids).logits - model(ids)).abs().max().item()
        print(f"transformers from_pretrained: ok, max |logit diff| = {diff:.2e}")
    except ImportError:
        print("transformers not installed; skipped")

    def enc(s: str) -> list[int]:
        return tok.encode(s, add_special_tokens=False).ids

    prefix, suffix = "def add(a, b):\n    return ", "\n\n\ndef sub(a, b):\n    return a - b\n"
    psm = [1, *enc(prefix), 3, *enc(suffix), 2]
    spm = [1, 3, *enc(suffix), 2, *enc(prefix)]
    print("PSM  add  ->", repr(greedy(model, tok, psm, 16)))
    print("SPMv2 add ->", repr(greedy(model, tok, spm, 16)))
    for text in ("for i in range(", "import os\nimport sys\n\n\ndef main():\n    ",
                 "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"):
        print("L2R", repr(text), "->", repr(greedy(model, tok, enc(text), 40)))


if __name__ == "__main__":
    main()
