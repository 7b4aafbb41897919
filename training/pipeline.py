"""Reproducible CPU pipeline for santacli's bundled model: corpus -> tokenizer -> model -> export.

Usage (from the repository root, with the project's venv):

    python -m training.pipeline --out src/santacli/bundled/santa-tiny

Stages cache their results in ``training/work/`` (git-ignored): the corpus manifest, the
tokenizer, the checkpoint. ``--resume`` continues an interrupted training run from
``training/work/ckpt.pt``. ``--deadline HH:MM`` (UTC) or ``--max-minutes`` stop training early
and still export. ``--measure`` only prints throughput for a few candidate sizes.

Nothing here is imported by the runtime package.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "training" / "work"
sys.path.insert(0, str(REPO / "src"))

SPECIALS = ["<|endoftext|>", "<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>"]
EOS, FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = range(5)
SEED = 1234
HELDOUT_PER_MILLE = 30  # ~3% of files, chosen by a hash of the relative path

# Trees left out of the corpus. Tests are left out: they are repetitive, hold deliberately
# broken or odd-encoding files and data tables, and the shipped model targets library-style code.
EXCLUDED_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__"}
EXCLUDED_FILES = {"_sysconfigdata__linux_x86_64-linux-gnu.py"}  # machine-generated
# Data, not code: the text of the pydoc topics and the HTML entity table. Together with the
# generated codec tables below they were a quarter of the tokens of santa-tiny v0, which then
# drifted into `0x00..: 0x00..,  # LATIN ... LETTER` lines wherever it was unsure.
EXCLUDED_DATA_FILES = {"pydoc_data/topics.py", "html/entities.py"}
GENERATED_TABLE_MARK = "Python Character Mapping Codec"  # header gencodec.py writes


def is_data_table(rel: str, text: str) -> bool:
    if rel in EXCLUDED_DATA_FILES:
        return True
    return rel.startswith("encodings/") and GENERATED_TABLE_MARK in text[:400]


def log(msg: str) -> None:
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------
# Corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 1000 < HELDOUT_PER_MILLE


def build_corpus() -> dict:
    """List the stdlib's .py files, read them as UTF-8, split train/held-out by path hash."""
    root = stdlib_root()
    files: list[tuple[str, str]] = []
    skipped = []
    data_tables: list[str] = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if any(p in EXCLUDED_DIRS for p in parts[:-1]) or parts[-1] in EXCLUDED_FILES:
            continue
        if parts[-1].startswith("_sysconfigdata_"):
            continue
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped.append(rel)
            continue
        if not text.strip():
            continue
        if is_data_table(rel, text):
            data_tables.append(rel)
            continue
        files.append((rel, text.replace("\r\n", "\n")))
    train = [(r, t) for r, t in files if not is_heldout(r)]
    held = [(r, t) for r, t in files if is_heldout(r)]
    info = {
        "python_version": platform.python_version(),
        "implementation": platform.python_implementation(),
        "stdlib": str(root),
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "skipped_undecodable": skipped,
        "excluded_data_tables": data_tables,
        "n_files": len(files),
        "n_train_files": len(train),
        "n_heldout_files": len(held),
        "train_chars": sum(len(t) for _, t in train),
        "heldout_chars": sum(len(t) for _, t in held),
        "heldout_files": [r for r, _ in held],
    }
    return {"info": info, "train": train, "heldout": held}


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, s in enumerate(SPECIALS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def load_or_train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer

    # Keyed by the corpus too: a tokenizer cached for another file list must not be reused.
    digest = hashlib.sha1("\0".join(texts).encode()).hexdigest()[:12]
    path = WORK / f"tokenizer-{vocab_size}-{digest}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    t0 = time.time()
    tok = train_tokenizer(texts, vocab_size)
    tok.save(str(path))
    log(f"trained tokenizer vocab={vocab_size} in {time.time() - t0:.1f}s -> {path}")
    return tok


# ---------------------------------------------------------------------------------------------
# FIM data


def split_segments(text: str, max_chars: int) -> list[str]:
    """Split a file at line boundaries into segments of at most ~max_chars characters.

    Long files are cut so that a FIM example fits in one context window (the BigCode runs
    applied FIM to each training sample, i.e. at context level, rather than to whole files).
    """
    if len(text) <= max_chars:
        return [text]
    segs, cur, n = [], [], 0
    for line in text.splitlines(keepends=True):
        if n + len(line) > max_chars and cur:
            segs.append("".join(cur))
            cur, n = [], 0
        cur.append(line)
        n += len(line)
    if cur:
        segs.append("".join(cur))
    return segs


def make_documents(files: list[tuple[str, str]], max_chars: int) -> list[tuple[str, bool]]:
    """(segment text, is_last_segment_of_file) for every file, in file order."""
    docs = []
    for _, text in files:
        segs = split_segments(text, max_chars)
        for i, s in enumerate(segs):
            docs.append((s, i == len(segs) - 1))
    return docs


def encode_epoch(tok, docs: list[tuple[str, bool]], epoch: int, fim_rate: float = 0.5,
                 spm_rate: float = 0.5) -> list[int]:
    """One epoch's token stream: documents shuffled, FIM drawn afresh per epoch.

    FIM (probability fim_rate): two random character positions split the document into
    prefix/middle/suffix, each tokenized separately; half PSM
    ``<fim-prefix>P<fim-suffix>S<fim-middle>M<|endoftext|>``, half SPM v2
    ``<fim-prefix><fim-suffix>S<fim-middle>PM<|endoftext|>``. Non-FIM documents are the plain
    tokens, followed by ``<|endoftext|>`` at the end of the file.
    """
    rng = random.Random(SEED * 1000 + epoch)
    order = list(range(len(docs)))
    rng.shuffle(order)
    plan = []  # (kind, pieces) with kind 0 plain, 1 PSM, 2 SPM
    pieces: list[str] = []
    for i in order:
        text, last = docs[i]
        if rng.random() < fim_rate:
            a, b = sorted(rng.randint(0, len(text)) for _ in range(2))
            kind = 1 if rng.random() >= spm_rate else 2
            plan.append((kind, len(pieces), last))
            pieces += [text[:a], text[a:b], text[b:]]
        else:
            plan.append((0, len(pieces), last))
            pieces.append(text)
    enc = [e.ids for e in tok.encode_batch(pieces, add_special_tokens=False)]
    out: list[int] = []
    for kind, j, last in plan:
        if kind == 0:
            out += enc[j]
            if last:
                out.append(EOS)
        else:
            p, m, s = enc[j], enc[j + 1], enc[j + 2]
            if kind == 1:
                out += [FIM_PREFIX, *p, FIM_SUFFIX, *s, FIM_MIDDLE, *m, EOS]
            else:
                out += [FIM_PREFIX, FIM_SUFFIX, *s, FIM_MIDDLE, *p, *m, EOS]
    return out


# ---------------------------------------------------------------------------------------------
# Model


@dataclass
class Hyper:
    vocab_size: int = 8192
    n_embd: int = 256
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 512
    batch: int = 16
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    steps: int = 1000


def build_model(h: Hyper):
    import torch

    from santacli.config import ModelConfig
    from santacli.model import GPTBigCode

    cfg = ModelConfig(vocab_size=h.vocab_size, n_embd=h.n_embd, n_layer=h.n_layer, n_head=h.n_head,
                      n_positions=h.n_positions, multi_query=True,
                      activation_function="gelu_pytorch_tanh")
    torch.manual_seed(SEED)
    model = GPTBigCode(cfg, backend="sdpa")
    std = 0.02
    resid_std = std / math.sqrt(2 * h.n_layer)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            elif name.endswith("c_proj.weight"):
                p.normal_(0.0, resid_std)
            else:  # wte (tied lm_head), wpe, c_attn, c_fc
                p.normal_(0.0, std)
    model.tie_weights()
    return cfg, model


def make_optimizer(model, h: Hyper):
    import torch

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=h.lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, progress: float, h: Hyper) -> float:
    """Linear warmup over h.warmup steps, then cosine decay to min_lr_ratio as progress -> 1.

    ``progress`` is the larger of the step fraction and the wall-clock fraction (see main), so
    the schedule always completes its decay, even when a busy CPU makes the run time-limited.
    """
    if step < h.warmup:
        return h.lr * (step + 1) / h.warmup
    p = min(1.0, max(0.0, progress))
    return h.lr * (h.min_lr_ratio + (1 - h.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


class Batcher:
    """Packs the epoch's token stream into (batch, n_positions + 1) windows; new epoch on wrap."""

    def __init__(self, tok, docs, h: Hyper, epoch: int = 0, pos: int = 0):
        self.tok, self.docs, self.h = tok, docs, h
        self.epoch, self.pos = epoch, pos
        self._load()

    def _load(self):
        import torch

        t0 = time.time()
        stream = encode_epoch(self.tok, self.docs, self.epoch)
        n = (len(stream) - 1) // self.h.n_positions
        self.windows = n
        self.data = torch.tensor(stream, dtype=torch.long)
        g = torch.Generator().manual_seed(SEED + self.epoch)
        self.perm = torch.randperm(n, generator=g)
        log(f"epoch {self.epoch}: {len(stream):,} tokens, {n} windows, encoded in {time.time() - t0:.1f}s")

    def next(self):
        import torch

        T, B = self.h.n_positions, self.h.batch
        if self.pos + B > self.windows:
            self.epoch += 1
            self.pos = 0
            self._load()
        idx = self.perm[self.pos:self.pos + B]
        self.pos += B
        rows = torch.stack([self.data[i * T: i * T + T + 1] for i in idx.tolist()])
        return rows[:, :-1], rows[:, 1:]


def evaluate(model, tok, files, h: Hyper, max_windows: int = 400) -> float:
    """Mean next-token loss on held-out files, left-to-right (no FIM), packed into windows."""
    import torch
    import torch.nn.functional as F

    stream: list[int] = []
    for enc in tok.encode_batch([t for _, t in files], add_special_tokens=False):
        stream += [*enc.ids, EOS]
    T = h.n_positions
    n = min(max_windows, (len(stream) - 1) // T)
    data = torch.tensor(stream[: n * T + 1])
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, n, 8):
            rows = torch.stack([data[j * T: j * T + T + 1] for j in range(i, min(n, i + 8))])
            logits = model(rows[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1),
                                   reduction="sum")
            total += loss.item()
            count += rows[:, 1:].numel()
    model.train()
    return total / max(1, count)


# ---------------------------------------------------------------------------------------------
# Export


def export(model, cfg, tok, out: Path, card: dict) -> None:
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {
        "architectures": ["GPTBigCodeForCausalLM"],
        "model_type": "gpt_bigcode",
        "vocab_size": cfg.vocab_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "n_positions": cfg.n_positions,
        "multi_query": True,
        "activation_function": cfg.activation_function,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "scale_attn_weights": True,
        "attention_softmax_in_fp32": True,
        "scale_attention_softmax_in_fp32": True,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "use_cache": True,
        "bos_token_id": EOS,
        "eos_token_id": EOS,
        "torch_dtype": "float16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to(torch.float16).contiguous()
             for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)
    tok.save(str(out / "tokenizer.json"))
    (out / "heldout_files.json").write_text(json.dumps(card["corpus"]["heldout_files"], indent=1) + "\n")
    write_stats(out, card)
    (out / "README.md").write_text(model_card(card))
    log(f"exported to {out}")


def write_stats(out: Path, card: dict) -> None:
    """``training_stats.json``: the card's facts (the held-out file list is its own file)."""
    corpus = {k: v for k, v in card["corpus"].items() if k != "heldout_files"}
    (out / "training_stats.json").write_text(
        json.dumps({k: v for k, v in card.items() if k != "corpus"} | {"corpus": corpus}, indent=2) + "\n")


def evaluation_section(ev: dict | None) -> str:
    """The card's table of ``benchmarks/fim_eval.py`` results (added by ``--card-eval``)."""
    if not ev:
        return "Not yet run through `benchmarks/fim_eval.py`."
    held, he = ev.get("heldout") or {}, ev.get("humaneval_single_line") or {}
    lines = [f"Evaluation harness (`{ev.get('command', 'python benchmarks/fim_eval.py --model tiny')}`, "
             f"greedy, `mode=line`, {ev.get('fim_mode', 'psm').upper()}; run {ev.get('date', '?')}):", "",
             "| task | n | exact match | pass rate | baseline: repeat previous line |", "|---|---|---|---|---|"]
    if held:
        lines.append(f"| held-out stdlib lines (single-line FIM) | {held['lines']} | {held['exact_match']:.1%} "
                     f"| - | {held['baseline_repeat_previous_line']:.1%} |")
    if isinstance(he, dict) and he:
        lines.append(f"| HumanEval single-line infilling | {he['tasks']} | {he['exact_match']:.1%} "
                     f"| {he['pass_rate']:.1%} | - |")
    if held:
        met = held["exact_match"] >= 0.15 and held["exact_match"] > 2 * held["baseline_repeat_previous_line"]
        lines += ["", "santacli's target for this model (held-out exact match of at least 15%, well above the "
                  f"baseline) is **{'met' if met else 'not met'}**."]
    return "\n".join(lines)


def model_card(c: dict) -> str:
    corpus, h = c["corpus"], c["hyper"]
    ppl = math.exp(c["heldout_loss"]) if c.get("heldout_loss") is not None else float("nan")
    early = (" - the schedule was completed by the wall-clock deadline before the planned steps"
             if c.get("stopped_early") else "")
    return f"""---
license: apache-2.0
language: [code]
tags: [gpt_bigcode, code, fill-in-the-middle, santacli]
---

# santa-tiny

A very small GPTBigCode (multi-query attention) code model trained from scratch on a 2-core CPU,
bundled with santacli so that `santa` works offline. It knows Python only, and only roughly:
expect short, plausible, often wrong completions. Use a real model (SantaCoder, StarCoder)
for real work.

## Data

- Source: the `.py` files of the CPython {corpus['python_version']} standard library
  (`sysconfig.get_paths()["stdlib"]` of the interpreter that ran the pipeline), **excluding**
  `site-packages` and the test trees (`test/`, `*/tests/`, `idlelib/idle_test/`) and the
  machine-generated `_sysconfigdata_*.py`, and {len(corpus.get('excluded_data_tables', []))} files
  of data rather than code: the codec tables `gencodec.py` generated in `encodings/`,
  `pydoc_data/topics.py` and `html/entities.py`. `idlelib` (non-test) is included.
- {corpus['n_files']} files ({corpus['train_chars']:,} + {corpus['heldout_chars']:,} characters);
  files that are not valid UTF-8 are skipped ({len(corpus['skipped_undecodable'])} skipped).
- Split by file: a file is held out when `int(sha1(relative_path), 16) % 1000 < 30` (~3%):
  {corpus['n_train_files']} train files, {corpus['n_heldout_files']} held-out files, listed in
  `heldout_files.json` (paths relative to the stdlib root).
- Train tokens per epoch (with FIM sentinels): {c.get('epoch_tokens', 0):,}.
- License of the data: Python Software Foundation License (PSF-2.0); the standard library is
  (c) Python Software Foundation. The model weights are released under the project's
  Apache-2.0 license.

## Tokenizer

Byte-level BPE trained on the training files with `tokenizers`: pre-tokenizer
`Sequence([Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)])`,
ByteLevel decoder, no normalizer, no post-processor (no BOS/EOS added), vocabulary {h['vocab_size']}.
Special tokens (ids 0-4): `<|endoftext|>`, `<fim-prefix>`, `<fim-middle>`, `<fim-suffix>`,
`<fim-pad>` (SantaCoder's hyphen spelling). `<|endoftext|>` is BOS/EOS.

## Architecture

GPTBigCode (`model_type: gpt_bigcode`), multi-query attention, learned positions,
`gelu_pytorch_tanh`, tied embeddings: n_embd={h['n_embd']}, n_layer={h['n_layer']},
n_head={h['n_head']}, n_positions={h['n_positions']} (context length; prompt + output must fit),
vocab_size={h['vocab_size']}; {c['n_params']:,} parameters. Weights stored in float16.

## Training

- Objective: next-token prediction with fill-in-the-middle as in the BigCode models: each
  document (files longer than {c['segment_chars']} characters are first cut at line boundaries
  into segments, so that FIM examples fit the context) gets FIM with probability 0.5, split at
  two random character positions, pieces tokenized separately; half PSM
  `<fim-prefix>P<fim-suffix>S<fim-middle>M<|endoftext|>`, half SPM v2
  `<fim-prefix><fim-suffix>S<fim-middle>PM<|endoftext|>`. FIM is re-drawn every epoch;
  documents are packed into {h['n_positions']}-token windows.
- AdamW (betas 0.9/0.95, weight decay {h['weight_decay']}), peak LR {h['lr']}, {h['warmup']} warmup
  steps, cosine decay to {h['min_lr_ratio']}x over {h['steps']} planned steps (or, if the
  wall-clock deadline comes first, over the time to the deadline), gradient clipping
  {h['grad_clip']}, batch {h['batch']} x {h['n_positions']} tokens, fp32, seed {SEED}.
- Steps done: {c['steps_done']} ({c['tokens_trained']:,} tokens, {c['epochs']:.2f} epochs){early}.
- Wall time: {c['train_seconds'] / 60:.1f} min of training on {c['hardware']}, torch
  {c['torch_version']}, 2 threads.
- Final train loss (mean of the last 50 steps): {c['train_loss']:.3f} nats/token.
- Held-out loss (left-to-right, no FIM, {c['heldout_tokens']:,} tokens of the held-out files):
  **{c['heldout_loss']:.3f} nats/token, perplexity {ppl:.1f}**.

## Evaluation

Measured by the pipeline itself: held-out loss {c['heldout_loss']:.3f} / perplexity {ppl:.1f}
(see above).

{evaluation_section(c.get('evaluation'))}

## Intended use and limits

Intended as an offline default and a test fixture for santacli: smoke tests, demos, trying the
CLI without a download. It has seen only the Python standard library, has a
{h['n_positions']}-token context, and is far too small to be a useful assistant. It will produce
syntactically plausible but often incorrect code; do not rely on it. It may reproduce
fragments of the standard library verbatim.

## Reproduce

```
{c['command']}
```

(from the santacli repository root; see `training/README.md`). Same interpreter version,
seeds and thread count give the same data and tokenizer; the weights are reproducible up to
floating-point non-determinism of CPU kernels and the point where the wall-clock guard stops.
"""


# ---------------------------------------------------------------------------------------------
# Main


def measure(args, corpus) -> None:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    texts = [t for _, t in corpus["train"]]
    sample = "".join(t for _, t in corpus["heldout"])
    for v in (4096, 8192):
        t0 = time.time()
        tok = load_or_train_tokenizer(texts, v)
        n = sum(len(e.ids) for e in tok.encode_batch([t for _, t in corpus["heldout"]],
                                                      add_special_tokens=False))
        log(f"vocab {v}: {n / len(sample):.4f} tokens/char on held-out ({len(sample) / n:.3f} chars/token), "
            f"{time.time() - t0:.1f}s")
    cands = [tuple(int(x) for x in c.split(",")) for c in args.candidates]
    for v, d, L, nh, T, B in cands:
        h = Hyper(vocab_size=v, n_embd=d, n_layer=L, n_head=nh, n_positions=T, batch=B)
        cfg, model = build_model(h)
        opt = make_optimizer(model, h)
        x = torch.randint(0, v, (B, T + 1))
        steps, t0 = 0, None
        while True:
            logits = model(x[:, :-1])
            loss = F.cross_entropy(logits.reshape(-1, v), x[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            steps += 1
            if steps == 2:
                t0 = time.time()
            if t0 and time.time() - t0 > args.measure_seconds:
                break
        dt_ = time.time() - t0
        tps = (steps - 2) * B * T / dt_
        log(f"candidate v={v} d={d} L={L} h={nh} T={T} B={B}: {cfg.num_parameters / 1e6:.2f}M params, "
            f"{tps:,.0f} tok/s ({dt_ / (steps - 2):.2f}s/step)")


def rewrite_card(out: Path, eval_json: Path) -> None:
    """Regenerate ``out/README.md`` from ``training_stats.json`` plus an evaluation result."""
    stats_path = out / "training_stats.json"
    stats = json.loads(stats_path.read_text())
    stats["corpus"]["heldout_files"] = json.loads((out / "heldout_files.json").read_text())
    stats["evaluation"] = json.loads(eval_json.read_text())
    write_stats(out, stats)
    (out / "README.md").write_text(model_card(stats))
    log(f"model card rewritten with {eval_json}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "src/santacli/bundled/santa-tiny")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-positions", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--steps", type=int, default=1000, help="planned steps (sets the cosine schedule)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--adapt-threads", action="store_true",
                    help="every 80 steps, time 8 steps at --threads and 8 at 1 thread, keep the faster")
    ap.add_argument("--deadline", help="UTC HH:MM; stop training (and export) when reached")
    ap.add_argument("--max-minutes", type=float, help="stop training (and export) after this long")
    ap.add_argument("--export-reserve-minutes", type=float, default=4.0,
                    help="stop this long before the deadline to leave time for eval + export")
    ap.add_argument("--ckpt-minutes", type=float, default=10.0)
    ap.add_argument("--resume", action="store_true", help="continue from training/work/ckpt.pt")
    ap.add_argument("--measure", action="store_true", help="only measure vocab + throughput")
    ap.add_argument("--card-eval", type=Path, metavar="JSON",
                    help="only rewrite --out's model card with this benchmarks/fim_eval.py result")
    ap.add_argument("--measure-seconds", type=float, default=25.0)
    ap.add_argument("--candidates", nargs="*", default=["8192,256,4,4,512,16", "8192,384,6,6,512,16"],
                    help="vocab,n_embd,n_layer,n_head,n_positions,batch for --measure")
    args = ap.parse_args(argv)
    if args.card_eval:
        rewrite_card(args.out, args.card_eval)
        return

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    WORK.mkdir(parents=True, exist_ok=True)
    t_begin = time.time()
    corpus = build_corpus()
    info = corpus["info"]
    (WORK / "heldout.txt").write_text("\n".join(info["heldout_files"]) + "\n")
    (WORK / "corpus.json").write_text(json.dumps({k: v for k, v in info.items()}, indent=1))
    log(f"corpus: python {info['python_version']}, {info['n_train_files']} train / "
        f"{info['n_heldout_files']} held-out files, {info['train_chars']:,} train chars")
    if args.measure:
        measure(args, corpus)
        return

    h = Hyper(vocab_size=args.vocab, n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
              n_positions=args.n_positions, batch=args.batch, lr=args.lr, warmup=args.warmup,
              steps=args.steps)
    tok = load_or_train_tokenizer([t for _, t in corpus["train"]], h.vocab_size)
    assert tok.get_vocab_size() == h.vocab_size, tok.get_vocab_size()
    cpt = len("".join(t for _, t in corpus["train"][:50])) / sum(
        len(e.ids) for e in tok.encode_batch([t for _, t in corpus["train"][:50]], add_special_tokens=False))
    segment_chars = int(h.n_positions * cpt * 0.9)
    docs = make_documents(corpus["train"], segment_chars)
    log(f"{len(docs)} documents (segments of <= {segment_chars} chars)")

    cfg, model = build_model(h)
    opt = make_optimizer(model, h)
    step, elapsed_before, losses = 0, 0.0, []
    progress, t_origin = 0.0, None
    epoch, pos = 0, 0
    ckpt_path = WORK / "ckpt.pt"
    if args.resume and ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False)
        if ck["hyper"] != asdict(h):
            raise SystemExit(f"--resume: checkpoint hyper-parameters differ: {ck['hyper']} vs {asdict(h)}")
        model.load_state_dict(ck["model"])
        model.tie_weights()
        opt.load_state_dict(ck["opt"])
        step, elapsed_before, losses = ck["step"], ck["elapsed"], ck["losses"]
        epoch, pos = ck["epoch"], ck["pos"]
        progress, t_origin = ck["progress"], ck["t_origin"]
        torch.set_rng_state(ck["torch_rng"])
        log(f"resumed at step {step} (epoch {epoch}, window {pos})")
    batcher = Batcher(tok, docs, h, epoch=epoch, pos=pos)
    epoch_tokens = batcher.windows * h.n_positions

    deadline = None
    if args.deadline:
        hh, mm = (int(x) for x in args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        target = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if target < now - dt.timedelta(hours=12):
            target += dt.timedelta(days=1)
        deadline = target.timestamp() - args.export_reserve_minutes * 60
    if args.max_minutes is not None:
        limit = time.time() + args.max_minutes * 60 - args.export_reserve_minutes * 60
        deadline = limit if deadline is None else min(deadline, limit)

    log(f"model: {cfg.num_parameters:,} params, {h}")
    model.train()
    threads_now, step_times, first_step = args.threads, {}, step
    t_run = time.time()
    last_ckpt = time.time()
    stopped_early = False

    def save_ckpt():
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": elapsed_before + time.time() - t_run, "losses": losses,
                    "epoch": batcher.epoch, "pos": batcher.pos, "hyper": asdict(h),
                    "torch_rng": torch.get_rng_state(),
                    "progress": progress, "t_origin": t_origin}, WORK / "ckpt.tmp")
        os.replace(WORK / "ckpt.tmp", ckpt_path)

    # Progress through the LR schedule: the step fraction (after warmup) or, when a deadline is
    # set, the fraction of wall-clock time between the start and the deadline, whichever is
    # larger. Training ends when it reaches 1, so the cosine decay finishes either way.
    if t_origin is None:
        t_origin = time.time()
    while True:
        p_step = max(0, step - h.warmup) / max(1, h.steps - h.warmup)
        p_time = (time.time() - t_origin) / (deadline - t_origin) if deadline is not None else 0.0
        if step >= h.warmup:
            progress = max(progress, p_step, p_time)
        if step >= h.steps or progress >= 1.0:
            stopped_early = step < h.steps
            if stopped_early:
                log(f"wall-clock guard: schedule completed by time at step {step} of {h.steps}")
            break
        lr = lr_at(step, progress, h)
        for g in opt.param_groups:
            g["lr"] = lr
        if args.adapt_threads and args.threads > 1:
            # Every 80 steps: 8 steps at --threads, 8 at 1 thread, then keep the faster one
            # (on a shared, busy 2-core CPU one thread can beat two: OpenMP barrier stalls).
            cycle = (step - first_step) % 80
            if cycle == 0:
                threads_now = args.threads
            elif cycle == 8:
                threads_now = 1
            elif cycle == 16:
                med = {n: sorted(step_times[n][-8:])[4] for n in (1, args.threads)}
                threads_now = min(med, key=med.get)
                log(f"threads: median s/step {', '.join(f'{n}: {t:.2f}' for n, t in sorted(med.items()))}"
                    f" -> using {threads_now}")
        torch.set_num_threads(threads_now)
        t_step = time.time()
        x, y = batcher.next()
        logits = model(x)
        loss = F.cross_entropy(logits.reshape(-1, h.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), h.grad_clip)
        opt.step()
        step += 1
        losses.append(loss.item())
        step_times.setdefault(threads_now, []).append(time.time() - t_step)
        if step % 10 == 0 or step == 1:
            el = elapsed_before + time.time() - t_run
            tps = step * h.batch * h.n_positions / el if el else 0
            log(f"step {step}/{h.steps} loss {sum(losses[-10:]) / len(losses[-10:]):.4f} "
                f"lr {lr:.2e} progress {progress:.3f} gnorm {gn:.2f} epoch {batcher.epoch} "
                f"{tps:,.0f} tok/s elapsed {el / 60:.1f} min")
        if time.time() - last_ckpt > args.ckpt_minutes * 60:
            save_ckpt()
            last_ckpt = time.time()
            log(f"checkpoint saved at step {step}")
    save_ckpt()
    train_seconds = elapsed_before + time.time() - t_run

    log("evaluating held-out loss ...")
    held_loss = evaluate(model, tok, corpus["heldout"], h)
    held_tokens = min(400 * h.n_positions, sum(len(e.ids) + 1 for e in tok.encode_batch(
        [t for _, t in corpus["heldout"]], add_special_tokens=False)))
    log(f"held-out loss {held_loss:.4f} (ppl {math.exp(held_loss):.2f})")
    cmd = "python -m training.pipeline " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                     if a != "--resume")
    card = {
        "corpus": info,
        "hyper": asdict(h),
        "n_params": cfg.num_parameters,
        "segment_chars": segment_chars,
        "epoch_tokens": epoch_tokens,
        "steps_done": step,
        "tokens_trained": step * h.batch * h.n_positions,
        "epochs": step * h.batch / max(1, batcher.windows),
        "stopped_early": stopped_early,
        "train_seconds": train_seconds,
        "total_seconds": time.time() - t_begin,
        "hardware": f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})",
        "torch_version": torch.__version__,
        "train_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "heldout_loss": held_loss,
        "heldout_tokens": held_tokens,
        "command": cmd,
    }
    export(model, cfg, tok, args.out, card)
    log("done")


if __name__ == "__main__":
    main()
