"""Decoding speed, prompt (prefill) speed and memory: santa against its peers, in one run.

For each model shape (``santacoder``: 1.1B parameters; ``tiny_starcoder``: 164M) a random-weight
checkpoint in the Hugging Face layout is built once under ``benchmarks/results/ckpt/<shape>/``
(weights generated tensor by tensor and streamed to ``model.safetensors``, so building needs
little memory) and then every engine is measured in its own fresh subprocess, interleaved across
repeats (``for rep: for engine:``), medians reported:

* ``santa`` fp32 / bf16 / int8 (``Engine.load(..., dtype=...)`` / ``quantize="int8"``),
* ``transformers`` fp32 / bf16 (``GPTBigCodeForCausalLM``, SDPA attention, ``model.generate``),
* ``ctranslate2`` fp32 / int8 and ``llama.cpp`` (Python binding) when importable (otherwise a note),
* ``llamabench`` f32 / f16 / Q8_0 / Q4_0: llama.cpp's own ``llama-bench`` binary on the same
  weights as GGUF files (built by ``benchmarks/build_llama_bench.sh``),
* a memory-read bandwidth probe (``t.sum()`` over a 1 GiB fp32 tensor, best of several, plus
  fp32/bf16 GEMV probes) and the decode ceilings it implies: bytes of weights read per token /
  bandwidth, for 4-, 2- and 1-byte weights.

With ``--isa native,avx2`` every santa and llamabench engine runs once per instruction set per
repeat (rows ``santa-int8@avx2``, ``llamabench-q8_0@avx2``, ...): santa children get
``santacli.native.forced_isa_env("avx2")`` in their environment, llamabench uses the AVX2-only
build. Per ISA the run prints issue 19's targets (santa int8 TTFT <= fp32's; int8 decode >= 1.3x
llama.cpp Q8_0; bf16 decode >= llama.cpp F16) with PASS/MISS.

Per engine: decode tokens/s (the 63 steps after the first token of a 64-token greedy generation
after a random 128-token prompt), time to first token of that prompt, prefill seconds for random
512- and 1,024-token prompts (the first step of a one-token generation), the child's peak RSS
(``ru_maxrss``) and its ratio to the engine's weight bytes. Prints the command line, versions, a
table per shape with santa/peer ratios, and writes ``benchmarks/results/decode.json``.

    .venv/bin/python benchmarks/decode.py                       # both shapes, 3 repeats
    .venv/bin/python benchmarks/decode.py --quick               # smoke run: tiny shape, few tokens
    .venv/bin/python benchmarks/decode.py --shapes tiny_starcoder --reps 5
    .venv/bin/python benchmarks/decode.py --reps 2 --prefill-reps 1 --deadline 17:15
    .venv/bin/python benchmarks/decode.py --quick --isa native,avx2 \
        --engines santa-fp32,santa-bf16,santa-int8,llamabench-f16,llamabench-q8_0

See benchmarks/README.md for what is comparable between rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import itertools
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
RESULTS = RESULTS_DIR / "decode.json"
CKPT_DIR = RESULTS_DIR / "ckpt"
SHARED = ROOT.parent / "shared" / "data"
RESULT_TAG = "@@DECODE-BENCH-RESULT@@ "

SHAPES: dict[str, dict[str, Any]] = {
    "santacoder": {"n_embd": 2048, "n_layer": 24, "n_head": 16, "vocab_size": 49280, "n_positions": 2048,
                   "tokenizer": "santacoder_tokenizer.json"},
    "tiny_starcoder": {"n_embd": 768, "n_layer": 20, "n_head": 12, "vocab_size": 49152, "n_positions": 8192,
                       "tokenizer": "starcoder_tokenizer.json"},
}

# name -> (family, dtype label, bytes per weight used for the bandwidth ceiling)
ENGINES: dict[str, tuple[str, str, float]] = {
    "santa-fp32": ("santa", "float32", 4),
    "santa-bf16": ("santa", "bfloat16", 2),
    "santa-int8": ("santa", "int8", 1),
    # The same with one-token steps in PyTorch instead of santa's native kernel (decode="pytorch").
    "santa-fp32-pt": ("santa", "float32", 4),
    "santa-bf16-pt": ("santa", "bfloat16", 2),
    "hf-fp32": ("transformers", "float32", 4),
    "hf-bf16": ("transformers", "bfloat16", 2),
    "ct2-fp32": ("ctranslate2", "float32", 4),
    "ct2-int8": ("ctranslate2", "int8", 1),
    # GGUF block formats: Q8_0 stores 32 int8 weights + one fp16 scale (8.5 bits), Q4_0 32
    # 4-bit weights + one fp16 scale (4.5 bits).
    "llamacpp-f32": ("llama.cpp", "f32", 4),
    "llamacpp-f16": ("llama.cpp", "f16", 2),
    "llamacpp-q8_0": ("llama.cpp", "q8_0", 1.0625),
    "llamacpp-q4_0": ("llama.cpp", "q4_0", 0.5625),
    # The same GGUF files through llama.cpp's C++ ``llama-bench`` (no Python binding in the loop,
    # which costs the binding 10-20% per token): what llama.cpp's own numbers are quoted from.
    "llamabench-f32": ("llama-bench", "f32", 4),
    "llamabench-f16": ("llama-bench", "f16", 2),
    "llamabench-q8_0": ("llama-bench", "q8_0", 1.0625),
    "llamabench-q4_0": ("llama-bench", "q4_0", 0.5625),
}
DEFAULT_ENGINES = list(ENGINES)
GGUF_FAMILIES = ("llama.cpp", "llama-bench")
# Families whose rows are repeated per --isa: santa (forced through environment variables) and
# llama-bench (a separate build per ISA). The others always run natively.
ISA_FAMILIES = ("santa", "llama-bench")
ISAS = ("native", "avx2")
LLAMA_BUILD_DIR = RESULTS_DIR / "llama.cpp"
# CPU flags that decide which kernels run (printed in the header; /proc/cpuinfo spelling).
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8")
# Issue 19's done-when, per ISA: (label, numerator, denominator, metric, target, higher is better).
# "ttft" compares times (int8 / fp32: <= 1 passes), "decode" tokens/s (santa / llama.cpp).
TARGETS: list[tuple[str, str, str, str, float, bool]] = [
    ("santa int8 TTFT / santa fp32 TTFT", "santa-int8", "santa-fp32", "ttft", 1.0, False),
    ("santa int8 decode / llama.cpp Q8_0 decode", "santa-int8", "llamabench-q8_0", "decode", 1.3, True),
    ("santa bf16 decode / llama.cpp F16 decode", "santa-bf16", "llamabench-f16", "decode", 1.0, True),
]

SANTA_SPECIALS = ["<|endoftext|>", "<fim-prefix>", "<fim-middle>", "<fim-suffix>", "<fim-pad>"]


# =============================================================================================
# Checkpoints


def tensor_specs(shape: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(HF key, shape, init) for every tensor of a multi-query GPTBigCode; lm_head is tied."""
    d, layers, heads = shape["n_embd"], shape["n_layer"], shape["n_head"]
    hd = d // heads
    inner = 4 * d
    specs: list[tuple[str, tuple[int, ...], str]] = [
        ("transformer.wte.weight", (shape["vocab_size"], d), "randn"),
        ("transformer.wpe.weight", (shape["n_positions"], d), "randn"),
    ]
    for i in range(layers):
        p = f"transformer.h.{i}."
        specs += [
            (p + "ln_1.weight", (d,), "ones"), (p + "ln_1.bias", (d,), "zeros"),
            (p + "attn.c_attn.weight", (d + 2 * hd, d), "randn"), (p + "attn.c_attn.bias", (d + 2 * hd,), "zeros"),
            (p + "attn.c_proj.weight", (d, d), "randn"), (p + "attn.c_proj.bias", (d,), "zeros"),
            (p + "ln_2.weight", (d,), "ones"), (p + "ln_2.bias", (d,), "zeros"),
            (p + "mlp.c_fc.weight", (inner, d), "randn"), (p + "mlp.c_fc.bias", (inner,), "zeros"),
            (p + "mlp.c_proj.weight", (d, inner), "randn"), (p + "mlp.c_proj.bias", (d,), "zeros"),
        ]
    specs += [("transformer.ln_f.weight", (d,), "ones"), ("transformer.ln_f.bias", (d,), "zeros")]
    return specs


def param_counts(shape: dict[str, Any]) -> dict[str, int]:
    """All parameters, and those read from memory per decoded token (all but wpe: one row is
    gathered; wte is read in full as the tied lm_head)."""
    total = sum(math.prod(s) for _, s, _ in tensor_specs(shape))
    wpe = shape["n_positions"] * shape["n_embd"]
    return {"total": total, "per_token": total - wpe}


def hf_config(shape: dict[str, Any], eos_id: int) -> dict[str, Any]:
    return {
        "model_type": "gpt_bigcode",
        "architectures": ["GPTBigCodeForCausalLM"],
        "vocab_size": shape["vocab_size"],
        "n_embd": shape["n_embd"],
        "n_layer": shape["n_layer"],
        "n_head": shape["n_head"],
        "n_positions": shape["n_positions"],
        "n_inner": None,
        "multi_query": True,
        "activation_function": "gelu_pytorch_tanh",
        "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True,
        "attention_softmax_in_fp32": True,
        "scale_attention_softmax_in_fp32": True,
        "initializer_range": 0.02,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def write_tokenizer(folder: Path, shape: dict[str, Any]) -> tuple[int, str]:
    """tokenizer.json: the shape's real tokenizer from ../shared/data when present (any that fits
    the vocabulary), else a tiny byte-level BPE. Returns (eos id, where it came from)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    for name in (shape["tokenizer"], "santacoder_tokenizer.json", "starcoder_tokenizer.json"):
        src = SHARED / name
        if src.is_file():
            tk = Tokenizer.from_file(str(src))
            if tk.get_vocab_size(with_added_tokens=True) <= shape["vocab_size"]:
                shutil.copyfile(src, folder / "tokenizer.json")
                return int(tk.token_to_id("<|endoftext|>")), str(src)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=SANTA_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [Path(__file__).read_text(), (ROOT / "src" / "santacli" / "model.py").read_text()] * 4
    tk.train_from_iterator(corpus, trainer=trainer)
    tk.save(str(folder / "tokenizer.json"))
    return int(tk.token_to_id("<|endoftext|>")), "trained byte-level BPE (1,000 tokens)"


def write_safetensors(path: Path, specs: list[tuple[str, tuple[int, ...], str]], seed: int) -> None:
    """Stream fp32 tensors into a safetensors file one at a time (never the whole model in RAM)."""
    import torch

    header: dict[str, Any] = {}
    offset = 0
    for name, shape, _ in specs:
        size = math.prod(shape) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(seed)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, shape, init in specs:
            if init == "ones":
                t = torch.ones(shape)
            elif init == "zeros":
                t = torch.zeros(shape)
            else:
                t = torch.randn(shape, generator=gen).mul_(0.02)
            f.write(memoryview(t.numpy()).cast("B"))
            del t
    os.replace(tmp, path)


def build_checkpoint(name: str) -> Path:
    """The random checkpoint for shape ``name``; reused when its stamp matches."""
    shape = SHAPES[name]
    folder = CKPT_DIR / name
    stamp = folder / "bench_stamp.json"
    want = {"shape": shape, "seed": 0, "std": 0.02, "format": 1}
    if stamp.is_file() and json.loads(stamp.read_text()) == want and (folder / "model.safetensors").is_file():
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    eos_id, tok_src = write_tokenizer(folder, shape)
    write_safetensors(folder / "model.safetensors", tensor_specs(shape), seed=0)
    (folder / "config.json").write_text(json.dumps(hf_config(shape, eos_id), indent=2) + "\n")
    stamp.write_text(json.dumps(want))
    print(f"  built {folder} in {time.perf_counter() - started:.0f} s (tokenizer: {tok_src})", flush=True)
    return folder


# =============================================================================================
# Child side: one engine (or the bandwidth probe) in a fresh process, one JSON line out


def _rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _prompt(length: int, seed: int, high: int) -> list[int]:
    """Random ordinary-token ids (ids below 100 hold the StarCoder specials; SantaCoder's are
    above 49151), the same for every engine."""
    import random

    rng = random.Random(1000 * length + seed)
    return [rng.randrange(100, high) for _ in range(length)]


def _model_bytes(model: Any) -> int:
    """Bytes of a module's unique parameter/buffer storages plus packed int8 weights (PyTorch's
    dynamic quantized Linear keeps those outside parameters and buffers)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    packed = 0
    for module in model.modules():
        params = getattr(module, "_packed_params", None)
        unpack = getattr(params, "_weight_bias", None)
        if unpack is None:
            continue
        weight, bias = unpack()
        packed += weight.numel() * weight.element_size()
        try:
            packed += weight.q_per_channel_scales().numel() * 4  # fp32 scales in fbgemm's packing
        except RuntimeError:  # per-tensor quantized
            packed += 4
        if bias is not None:
            packed += bias.numel() * bias.element_size()
    return sum(seen.values()) + packed


def child_membw(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    n = spec["bytes"] // 4
    x = torch.ones(n)
    best = math.inf
    for _ in range(spec.get("sum_iters", 10)):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    out: dict[str, Any] = {"sum_gbps": x.nbytes / best / 1e9, "bytes": x.nbytes}
    cols = 8192
    w = x.view(-1, cols)
    v = torch.ones(cols)
    for label, dtype in (("gemv_fp32_gbps", torch.float32), ("gemv_bf16_gbps", torch.bfloat16)):
        mat, vec = w.to(dtype), v.to(dtype)  # a weight-matrix-times-vector read, as in decoding
        best = math.inf
        for _ in range(spec.get("gemv_iters", 6)):
            t0 = time.perf_counter()
            torch.mv(mat, vec)
            best = min(best, time.perf_counter() - t0)
        out[label] = mat.nbytes / best / 1e9
    return out


def _time_stream(spec: dict[str, Any], res: dict[str, Any], first_step: Any, token_id: Any, high: int,
                 who: str) -> None:
    """Decode and prefill timings through an engine's ``first_step(ids, new) -> (ttft, first id, rest)``."""
    if spec.get("decode", True):
        ttft, first, it = first_step(_prompt(spec["prompt"], spec["seed"], high), spec["new"])
        t = time.perf_counter()
        rest = [token_id(step) for step in it]
        dec = time.perf_counter() - t
        if len(rest) != spec["new"] - 1:
            raise RuntimeError(f"{who} produced {len(rest) + 1} tokens, expected {spec['new']}")
        res.update(ttft_s=ttft, decode_s=dec, decode_tps=len(rest) / dec, tokens=[first, *rest])
    for length in spec["prefill"]:
        seconds, _, rest_steps = first_step(_prompt(length, spec["seed"], high), 1)
        for _ in rest_steps:  # let the engine finish the one-token request
            pass
        res[f"prefill_{length}_s"] = seconds
    res["peak_rss"] = _peak_rss()


def child_santa(spec: dict[str, Any]) -> dict[str, Any]:
    import inspect

    import torch

    torch.set_num_threads(spec["threads"])
    sys.path.insert(0, str(ROOT / "src"))
    from santacli import Engine
    from santacli.generate import SamplingParams

    rss_base = _rss_now()
    kwargs: dict[str, Any] = {}
    if spec["dtype"] == "int8":
        if "quantize" not in inspect.signature(Engine.load).parameters:
            return {"skipped": "Engine.load has no quantize= keyword yet"}
        kwargs["quantize"] = "int8"
    else:
        kwargs["dtype"] = spec["dtype"]
    if "decode" in inspect.signature(Engine.load).parameters:
        kwargs["decode"] = spec.get("decode", "auto")
    t0 = time.perf_counter()
    engine = Engine.load(spec["path"], device="cpu", allow_download=False, **kwargs)
    load_s = time.perf_counter() - t0
    model = engine.model
    weights = _model_bytes(model)
    rss_loaded, peak_loaded = _rss_now(), _peak_rss()
    greedy = SamplingParams()
    high = min(engine.tokenizer.vocab_size, engine.config.vocab_size) - 1

    def first_step(ids: list[int], new: int) -> tuple[float, int, Any]:
        t = time.perf_counter()
        it = iter(engine.stream_ids(ids, max_new_tokens=new, sampling=greedy, stop_ids=frozenset()))
        first = next(it)[0]
        return time.perf_counter() - t, first, it

    # Warm-up: one short generation (first-call allocations, oneDNN kernel selection).
    list(first_step(_prompt(16, 99, high), 4)[2])
    # Which kernels ran: the one-token step (native C kernel and its ISA, or PyTorch), the int8
    # prompt GEMM (LoadInfo.prompt, absent in older checkouts), and what ATen dispatched to, which
    # shows whether a forced ISA reached PyTorch.
    cpu_capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: None)()
    res: dict[str, Any] = {"load_s": load_s, "weights_bytes": weights, "rss_base": rss_base,
                           "rss_loaded": rss_loaded, "peak_rss_loaded": peak_loaded,
                           "info": {"dtype": engine.info.dtype, "attention": engine.info.attention,
                                    "decode": getattr(engine.info, "decode", "pytorch"),
                                    "prompt": getattr(engine.info, "prompt", None),
                                    "isa": os.environ.get("SANTA_NATIVE_ISA", "native"),
                                    "aten_cpu_capability": cpu_capability}}
    _time_stream(spec, res, first_step, lambda step: step[0], high, "santa")
    return res


def child_hf(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    import transformers
    from tokenizers import Tokenizer
    from transformers import GPTBigCodeForCausalLM

    transformers.logging.set_verbosity_error()
    rss_base = _rss_now()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec["dtype"]]
    t0 = time.perf_counter()
    model = GPTBigCodeForCausalLM.from_pretrained(spec["path"], dtype=dtype, attn_implementation="sdpa")
    model.eval()
    load_s = time.perf_counter() - t0
    weights = _model_bytes(model)
    rss_loaded, peak_loaded = _rss_now(), _peak_rss()
    tok = Tokenizer.from_file(str(Path(spec["path"]) / "tokenizer.json"))
    high = min(tok.get_vocab_size(with_added_tokens=True), model.config.vocab_size) - 1
    eos = model.config.eos_token_id

    def gen(ids: list[int], new: int) -> tuple[float, list[int]]:
        x = torch.tensor([ids], dtype=torch.long)
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, use_cache=True, pad_token_id=eos)
        seconds = time.perf_counter() - t
        if out.shape[1] != len(ids) + new:
            raise RuntimeError(f"transformers produced {out.shape[1] - len(ids)} tokens, expected {new}")
        return seconds, out[0, len(ids):].tolist()

    gen(_prompt(16, 99, high), 4)  # warm-up
    res: dict[str, Any] = {"load_s": load_s, "weights_bytes": weights, "rss_base": rss_base,
                           "rss_loaded": rss_loaded, "peak_rss_loaded": peak_loaded,
                           "info": {"transformers": transformers.__version__,
                                    "attn": model.config._attn_implementation}}
    if spec.get("decode", True):
        ids = _prompt(spec["prompt"], spec["seed"], high)
        one, _ = gen(ids, 1)
        full, tokens = gen(ids, spec["new"])
        res.update(ttft_s=one, gen_full_s=full, decode_s=full - one,
                   decode_tps=(spec["new"] - 1) / (full - one), tokens=tokens)
    for length in spec["prefill"]:
        res[f"prefill_{length}_s"] = gen(_prompt(length, spec["seed"], high), 1)[0]
    res["peak_rss"] = _peak_rss()
    return res


def child_ct2_convert(spec: dict[str, Any]) -> dict[str, Any]:
    import ctranslate2
    import torch

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    conv = ctranslate2.converters.TransformersConverter(spec["path"], low_cpu_mem_usage=True)
    conv.convert(spec["out"], quantization=spec["quantization"], force=True)
    # The folder has tokenizer.json but no tokenizer_config.json, so the converter finds no special
    # tokens (and leaves layer_norm_epsilon unset): fill them in as the real checkpoints have them.
    cfg_path = Path(spec["out"]) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("bos_token", "eos_token", "unk_token"):
        if cfg.get(key) is None:
            cfg[key] = "<|endoftext|>"
    if cfg.get("layer_norm_epsilon") is None:
        cfg["layer_norm_epsilon"] = 1e-5
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return {"convert_s": time.perf_counter() - t0}


def child_ct2(spec: dict[str, Any]) -> dict[str, Any]:
    import ctranslate2
    from tokenizers import Tokenizer

    rss_base = _rss_now()
    t0 = time.perf_counter()
    gen = ctranslate2.Generator(spec["ct2_path"], device="cpu", compute_type=spec["compute_type"],
                                intra_threads=spec["threads"], inter_threads=1)
    load_s = time.perf_counter() - t0
    rss_loaded, peak_loaded = _rss_now(), _peak_rss()
    tok = Tokenizer.from_file(str(Path(spec["path"]) / "tokenizer.json"))
    high = tok.get_vocab_size(with_added_tokens=True) - 1
    weights = sum(p.stat().st_size for p in Path(spec["ct2_path"]).glob("model*.bin"))

    def first_step(ids: list[int], new: int) -> tuple[float, int, Any]:
        tokens = [tok.id_to_token(i) for i in ids]
        t = time.perf_counter()
        it = gen.generate_tokens(tokens, max_length=new, min_length=new, sampling_topk=1)
        first = next(it).token_id
        return time.perf_counter() - t, first, it

    list(first_step(_prompt(16, 99, high), 4)[2])  # warm-up
    res: dict[str, Any] = {"load_s": load_s, "weights_bytes": weights, "rss_base": rss_base,
                           "rss_loaded": rss_loaded, "peak_rss_loaded": peak_loaded,
                           "info": {"ctranslate2": ctranslate2.__version__}}
    _time_stream(spec, res, first_step, lambda step: step.token_id, high, "ctranslate2")
    return res


def child_gguf_quantize(spec: dict[str, Any]) -> dict[str, Any]:
    """Q4_0 from the f16 GGUF with llama.cpp's own quantizer (the converter writes only f32/f16/q8_0)."""
    import llama_cpp

    t0 = time.perf_counter()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = spec["threads"]
    rc = llama_cpp.llama_model_quantize(spec["src"].encode(), spec["out"].encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")
    return {"convert_s": time.perf_counter() - t0}


def _llama_bench(binary: str, args: list[str]) -> tuple[list[dict[str, Any]], float]:
    """Run ``llama-bench ... -o json``: its result records and the wall seconds of the run."""
    t = time.perf_counter()
    proc = subprocess.run([binary, *args, "-o", "json"], capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"llama-bench exit {proc.returncode}: " + " | ".join(tail))
    # stdout is the JSON array; logs go to stderr, but be lenient about anything before it.
    out = proc.stdout
    return json.loads(out[out.index("["):]), wall


def child_llamabench(spec: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp's C++ ``llama-bench`` on one GGUF file, in two invocations:

    * ``-p PROMPT[,PREFILL...] -n 0``: prompt processing at an empty context; first-token time
      = PROMPT / pp t/s (one batched forward over the prompt, as santa's first step),
      prefill N s = N / ppN t/s;
    * ``-p 0 -n NEW-1 -d PROMPT``: token generation after a PROMPT-token context (llama-bench
      fills it untimed), i.e. decode steps at positions PROMPT..PROMPT+NEW-2, the same positions
      as the other engines' steps 2..NEW; decode tok/s = tg t/s.

    llama-bench warms up once per test and repeats ``-r`` times; its mean t/s is used. Peak RSS is
    the largest of the two llama-bench processes (RUSAGE_CHILDREN), the mapped GGUF included.
    """
    import resource

    common = ["-m", spec["gguf"], "-t", str(spec["threads"]), "-r", str(spec["bench_reps"])]
    res: dict[str, Any] = {"weights_bytes": Path(spec["gguf"]).stat().st_size, "rss_base": None,
                           "load_s": None, "rss_loaded": None, "peak_rss_loaded": None}
    records: list[dict[str, Any]] = []
    lengths = [n for n in dict.fromkeys([spec["prompt"], *spec["prefill"]]) if n > 0]
    if spec.get("decode", True) or spec["prefill"]:
        pp, wall = _llama_bench(spec["binary"], [*common, "-p", ",".join(map(str, lengths)), "-n", "0"])
        records += pp
        res["pp_wall_s"] = wall
        by_len = {r["n_prompt"]: r for r in pp if r.get("n_gen") == 0}
        for n in spec["prefill"]:
            res[f"prefill_{n}_s"] = n / by_len[n]["avg_ts"]
        res["ttft_s"] = spec["prompt"] / by_len[spec["prompt"]]["avg_ts"]
    if spec.get("decode", True):
        steps = spec["new"] - 1
        tg, wall = _llama_bench(spec["binary"], [*common, "-p", "0", "-n", str(steps), "-d", str(spec["prompt"])])
        records += tg
        res["tg_wall_s"] = wall
        rec = next(r for r in tg if r.get("n_gen") == steps)
        res.update(decode_tps=rec["avg_ts"], decode_s=steps / rec["avg_ts"])
    res["peak_rss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    first = records[0] if records else {}
    res["info"] = {"binary": spec["binary"], "build_commit": first.get("build_commit"),
                   "build_number": first.get("build_number"), "cpu_info": first.get("cpu_info"),
                   "backends": first.get("backends"), "type": first.get("model_type"),
                   "n_batch": first.get("n_batch"), "n_ubatch": first.get("n_ubatch"),
                   "flash_attn": first.get("flash_attn")}
    res["llama_bench"] = [{k: r.get(k) for k in ("n_prompt", "n_gen", "n_depth", "avg_ts", "stddev_ts",
                                                 "samples_ts")} for r in records]
    return res


def child_llamacpp(spec: dict[str, Any]) -> dict[str, Any]:
    import llama_cpp
    from tokenizers import Tokenizer

    rss_base = _rss_now()
    n_ctx = min(max([spec["prompt"] + spec["new"], *[n + 1 for n in spec["prefill"]]]) + 16,
                json.loads((Path(spec["path"]) / "config.json").read_text())["n_positions"])
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=n_ctx, n_batch=n_ctx, n_threads=spec["threads"],
                          n_threads_batch=spec["threads"], verbose=False)
    load_s = time.perf_counter() - t0
    rss_loaded, peak_loaded = _rss_now(), _peak_rss()
    high = Tokenizer.from_file(str(Path(spec["path"]) / "tokenizer.json")).get_vocab_size(with_added_tokens=True) - 1

    def first_step(ids: list[int], new: int) -> tuple[float, int, Any]:
        llm.reset()
        t = time.perf_counter()
        # Greedy; generate() yields every sampled id (EOS included) until the caller stops.
        it = llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True)
        first = next(it)
        return time.perf_counter() - t, first, itertools.islice(it, new - 1)

    list(first_step(_prompt(16, 99, high), 4)[2])  # warm-up
    res: dict[str, Any] = {"load_s": load_s, "weights_bytes": Path(spec["gguf"]).stat().st_size,
                           "rss_base": rss_base, "rss_loaded": rss_loaded, "peak_rss_loaded": peak_loaded,
                           "info": {"llama_cpp_python": llama_cpp.__version__, "n_ctx": n_ctx}}
    _time_stream(spec, res, first_step, lambda token: token, high, "llama.cpp")
    return res


def run_child(spec: dict[str, Any]) -> None:
    kind = spec["kind"]
    fn = {"membw": child_membw, "santa": child_santa, "transformers": child_hf,
          "ct2-convert": child_ct2_convert, "ctranslate2": child_ct2,
          "gguf-quantize": child_gguf_quantize, "llama.cpp": child_llamacpp,
          "llama-bench": child_llamabench}[kind]
    out = fn(spec)
    print(RESULT_TAG + json.dumps(out), flush=True)


# =============================================================================================
# Parent side


ISA_ENV_KEYS = ("SANTA_NATIVE_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def spawn(spec: dict[str, Any], timeout: float, isa_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one child; its JSON result, or {"error": ...}. ``isa_env`` (``forced_isa_env(...)``)
    goes into the child's environment, so it is in place before the child imports torch; without
    it any such variables inherited from this shell are removed, so a native row is native."""
    env = {k: v for k, v in os.environ.items() if k not in ISA_ENV_KEYS}
    env.update(isa_env or {})
    threads = str(spec.get("threads", 2))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - started
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            res = json.loads(line[len(RESULT_TAG):])
            res["child_wall_s"] = wall
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    return {"error": f"exit {proc.returncode}: " + " | ".join(tail), "stderr_tail": proc.stderr[-3000:]}


def probe_ct2_convert(folder: Path, quant: str, threads: int, notes: list[str]) -> Path | None:
    out = folder / f"ct2-{quant}"
    stamp = out / "bench_stamp.json"
    if stamp.is_file() and (out / "model.bin").is_file():
        return out
    res = spawn({"kind": "ct2-convert", "path": str(folder), "out": str(out), "quantization": quant,
                 "threads": threads}, timeout=1800)
    if "error" in res:
        notes.append(f"ctranslate2 conversion ({quant}) of {folder.name} failed: {res['error'][:300]}")
        return None
    stamp.write_text(json.dumps(res))
    print(f"  converted {folder.name} to ctranslate2 {quant} in {res['convert_s']:.0f} s", flush=True)
    return out


def gguf_staging_folder(folder: Path) -> Path | None:
    """``folder``'s config and weights (linked) with StarCoder's tokenizer from ../shared/data."""
    tokenizer = SHARED / "starcoder_tokenizer.json"
    if not tokenizer.is_file():
        return None
    staging = folder / "gguf" / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        link = staging / name
        if not link.exists():
            link.symlink_to(folder / name)
    shutil.copyfile(tokenizer, staging / "tokenizer.json")
    return staging


def probe_gguf_convert(folder: Path, kind: str, threads: int, converter: Path, notes: list[str],
                       quantizer: Path | None = None) -> Path | None:
    """``folder/gguf/model-<kind>.gguf``: f32/f16/q8_0 from llama.cpp's convert_hf_to_gguf.py,
    q4_0 quantized from the f16 file by llama.cpp itself: its ``llama-quantize`` binary when
    ``quantizer`` is given, else through the Python binding."""
    out = folder / "gguf" / f"model-{kind}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(exist_ok=True)
    started = time.perf_counter()
    error: str | None
    if kind == "q4_0":
        src = probe_gguf_convert(folder, "f16", threads, converter, notes)
        if src is None:
            return None
        if quantizer is not None:
            proc = subprocess.run([str(quantizer), str(src), str(out) + ".tmp", "Q4_0", str(threads)],
                                  capture_output=True, text=True, timeout=1800)
            error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
        else:
            res = spawn({"kind": "gguf-quantize", "src": str(src), "out": str(out) + ".tmp", "threads": threads},
                        timeout=1800)
            error = res.get("error")
    else:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
        source = folder
        for attempt in range(2):
            proc = subprocess.run([sys.executable, str(converter), str(source), "--outfile", str(out) + ".tmp",
                                   "--outtype", kind], capture_output=True, text=True, env=env, timeout=1800)
            error = None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]
            if attempt or not error or "pre-tokenizer was not recognized" not in error:
                break
            # llama.cpp's converter identifies a BPE tokenizer by hashing its output and does not
            # know SantaCoder's. The weights are random and the prompts are token ids, so convert
            # the same weights with StarCoder's (known) tokenizer; the vocabulary is padded to
            # the config's vocab_size either way.
            source = gguf_staging_folder(folder)
            if source is None:
                break
            note = (f"GGUF ({folder.name}): converted with StarCoder's tokenizer, which llama.cpp's "
                    "converter recognizes (it does not know SantaCoder's); same weights")
            if note not in notes:  # once, not per GGUF type
                notes.append(note)
    if error:
        notes.append(f"GGUF conversion ({kind}) of {folder.name} failed: {error[:300]}")
        return None
    os.replace(str(out) + ".tmp", out)
    print(f"  converted {folder.name} to GGUF {kind} in {time.perf_counter() - started:.0f} s", flush=True)
    return out


def converted(label: str, ct2_paths: dict[str, Path], gguf_paths: dict[str, Path]) -> bool:
    """Whether the model files a row needs exist (CTranslate2 folder, GGUF file of its type)."""
    family, dtype, _ = ENGINES[base_engine(label)]
    return (family != "ctranslate2" or label in ct2_paths) and (family not in GGUF_FAMILIES or dtype in gguf_paths)


def base_engine(label: str) -> str:
    """``santa-int8@avx2`` -> ``santa-int8``."""
    return label.split("@", 1)[0]


def label_isa(label: str) -> str:
    """The instruction set a row ran with: ``santa-int8@avx2`` -> ``avx2``; untagged rows are native."""
    return label.split("@", 1)[1] if "@" in label else "native"


def engine_label(name: str, isa: str, tagged: bool) -> str:
    """Row name: ISA-dependent engines get ``@isa`` when more than the native ISA is requested
    (a plain ``--isa native`` run keeps the old names)."""
    return f"{name}@{isa}" if tagged and ENGINES[name][0] in ISA_FAMILIES else name


def available_engines(wanted: list[str], converter: Path | None = None, isas: tuple[str, ...] = ("native",),
                      bench_bins: dict[str, Path] | None = None) -> tuple[list[str], dict[str, str]]:
    """The rows that can run here (engines labelled per ISA), and why the others cannot."""
    import inspect

    sys.path.insert(0, str(ROOT / "src"))
    from santacli import Engine

    tagged = tuple(isas) != ("native",)
    no_converter = ("not run: needs llama.cpp's convert_hf_to_gguf.py (--llama-cpp-src DIR: the "
                    "vendor/llama.cpp folder of the llama-cpp-python sdist)")
    out, missing = [], {}
    for name in wanted:
        family = ENGINES[name][0]
        labels = [engine_label(name, isa, tagged) for isa in (isas if family in ISA_FAMILIES else ("native",))]
        why: str | None = None
        if name == "santa-int8" and "quantize" not in inspect.signature(Engine.load).parameters:
            why = "skipped: Engine.load() has no quantize= keyword in this checkout"
        elif family == "ctranslate2" and importlib.util.find_spec("ctranslate2") is None:
            why = "not installed (pip install ctranslate2: a manylinux x86_64 wheel exists)"
        elif family == "llama.cpp" and importlib.util.find_spec("llama_cpp") is None:
            why = ("not installed: llama-cpp-python has no binary wheel on PyPI for this platform; "
                   "build it from source (see benchmarks/README.md)")
        elif family in GGUF_FAMILIES and (converter is None or not converter.is_file()):
            why = no_converter
        if why is not None:
            missing.update(dict.fromkeys(labels, why))
            continue
        for label in labels:
            binary = (bench_bins or {}).get(label_isa(label))
            if family == "llama-bench" and (binary is None or not binary.is_file()):
                missing[label] = (f"not run: no llama-bench binary at {binary} (build it with "
                                  "benchmarks/build_llama_bench.sh, or pass --llama-bench-" + label_isa(label) + ")")
            else:
                out.append(label)
    return out, missing


def med(runs: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def summarize(shape_res: dict[str, Any], engines: list[str], prefill: list[int]) -> dict[str, Any]:
    bw = shape_res["bandwidth"].get("read_gbps")
    per_token = shape_res["params"]["per_token"]
    summary: dict[str, Any] = {}
    ref_name, ref = None, None
    for cand in ("hf-fp32", "santa-fp32", "santa-fp32@native", "santa-fp32@avx2"):
        ref = next((r["tokens"] for r in shape_res["runs"] if r["engine"] == cand and r.get("tokens")), None)
        if ref:
            ref_name = cand
            break
    shape_res["agreement_reference"] = ref_name
    for name in engines:
        runs = [r for r in shape_res["runs"] if r["engine"] == name and "error" not in r and "skipped" not in r]
        bad = [r for r in shape_res["runs"] if r["engine"] == name and ("error" in r or "skipped" in r)]
        base = ENGINES[base_engine(name)]
        entry: dict[str, Any] = {"family": base[0], "dtype": base[1], "isa": label_isa(name), "n": len(runs)}
        if bad and not runs:
            entry["problem"] = bad[-1].get("error") or bad[-1].get("skipped")
        for key in ["decode_tps", "ttft_s", "load_s", "peak_rss", "rss_base", "rss_loaded", "peak_rss_loaded",
                    "weights_bytes"] + \
                [f"prefill_{n}_s" for n in prefill]:
            entry[key] = med(runs, key)
        tokens = next((r["tokens"] for r in runs if r.get("tokens")), None)
        if ref and tokens:
            pairs = enumerate(zip(tokens, ref, strict=False))
            same = next((i for i, (x, y) in pairs if x != y), min(len(tokens), len(ref)))
            entry["greedy_agree"] = f"{same}/{len(ref)}"
        tps = entry["decode_tps"]
        ceiling = bw * 1e9 / (per_token * base[2]) if bw else None
        entry["ceiling_tps"] = ceiling
        entry["pct_of_ceiling"] = 100 * tps / ceiling if tps and ceiling else None
        if entry["peak_rss"] and entry["weights_bytes"]:
            entry["rss_over_weights"] = entry["peak_rss"] / entry["weights_bytes"]
        info = next((r["info"] for r in runs if r.get("info")), None)
        if info is not None:
            entry["info"] = info
        summary[name] = entry
    return summary


RATIOS = [  # (label, numerator engine, denominator engine)
    ("santa fp32 / transformers fp32", "santa-fp32", "hf-fp32"),
    ("santa bf16 / transformers bf16", "santa-bf16", "hf-bf16"),
    ("santa int8 / transformers fp32", "santa-int8", "hf-fp32"),
    ("santa bf16 / transformers fp32", "santa-bf16", "hf-fp32"),
    ("santa fp32 / ctranslate2 fp32", "santa-fp32", "ct2-fp32"),
    ("santa int8 / ctranslate2 int8", "santa-int8", "ct2-int8"),
    ("santa fp32 / llama.cpp f32", "santa-fp32", "llamacpp-f32"),
    ("santa bf16 / llama.cpp f16", "santa-bf16", "llamacpp-f16"),
    ("santa int8 / llama.cpp Q8_0", "santa-int8", "llamacpp-q8_0"),
    ("santa int8 / llama.cpp Q4_0", "santa-int8", "llamacpp-q4_0"),
    ("santa fp32 / llama-bench f32", "santa-fp32", "llamabench-f32"),
    ("santa bf16 / llama-bench f16", "santa-bf16", "llamabench-f16"),
    ("santa int8 / llama-bench Q8_0", "santa-int8", "llamabench-q8_0"),
    ("santa int8 / llama-bench Q4_0", "santa-int8", "llamabench-q4_0"),
    ("santa int8 / santa fp32", "santa-int8", "santa-fp32"),
    ("santa fp32: native / PyTorch decode", "santa-fp32", "santa-fp32-pt"),
    ("santa bf16: native / PyTorch decode", "santa-bf16", "santa-bf16-pt"),
]


def resolve(name: str, isa: str, summary: dict[str, Any]) -> str | None:
    """The row of engine ``name`` for ``isa``: its ``@isa`` row for ISA-dependent engines; an
    untagged row (always native) only for the native ISA, so AVX2 tables never mix in native
    peers."""
    for cand in (f"{name}@{isa}", name):
        if cand in summary and label_isa(cand) == isa:
            return cand
    return None


def ratios(summary: dict[str, Any], prefill: list[int], isas: list[str] | None = None) -> list[dict[str, Any]]:
    """Speed-ups of santa over a peer (>1: santa faster): decode tok/s ratio, prefill time ratio;
    per ISA, both sides of a row run with that ISA."""
    out = []
    isas = isas or ["native"]
    tagged = isas != ["native"]
    for isa, (label, name_a, name_b) in itertools.product(isas, RATIOS):
        a, b = resolve(name_a, isa, summary), resolve(name_b, isa, summary)
        if a is None or b is None or summary[a].get("problem") or summary[b].get("problem"):
            continue
        sa, sb = summary[a], summary[b]
        row: dict[str, Any] = {"label": f"{label} @{isa}" if tagged else label, "a": a, "b": b, "isa": isa}
        row["decode"] = sa["decode_tps"] / sb["decode_tps"] if sa["decode_tps"] and sb["decode_tps"] else None
        row["ttft"] = sb["ttft_s"] / sa["ttft_s"] if sa["ttft_s"] and sb["ttft_s"] else None
        for n in prefill:
            x, y = sa.get(f"prefill_{n}_s"), sb.get(f"prefill_{n}_s")
            row[f"prefill_{n}"] = y / x if x and y else None
        row["peak_rss"] = sa["peak_rss"] / sb["peak_rss"] if sa["peak_rss"] and sb["peak_rss"] else None
        out.append(row)
    return out


def targets(summary: dict[str, Any], isas: list[str]) -> list[dict[str, Any]]:
    """Issue 19's done-when per ISA: the ratio, its target and PASS/MISS (None when a side is missing)."""
    out = []
    for isa, (label, name_a, name_b, metric, target, higher) in itertools.product(isas, TARGETS):
        a, b = resolve(name_a, isa, summary), resolve(name_b, isa, summary)
        key = "decode_tps" if metric == "decode" else "ttft_s"
        x = summary[a].get(key) if a else None
        y = summary[b].get(key) if b else None
        value = x / y if x and y else None
        ok = None if value is None else (value >= target if higher else value <= target)
        out.append({"isa": isa, "label": label, "a": a or name_a, "b": b or name_b, "metric": metric,
                    "value": value, "target": target, "op": ">=" if higher else "<=", "pass": ok})
    return out


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "-" if x is None else format(x, spec) + suffix


def kernels(entry: dict[str, Any]) -> str | None:
    """One line on the kernels a row used (santa: LoadInfo.decode / .prompt and ATen's dispatch;
    llama-bench: the binary's build and backends)."""
    info = entry.get("info") or {}
    if entry["family"] == "santa":
        prompt = info.get("prompt") or "(LoadInfo.prompt not reported by this checkout)"
        return (f"decode: {info.get('decode')}; prompt: {prompt}; SANTA_NATIVE_ISA={info.get('isa')}, "
                f"ATen CPU capability {info.get('aten_cpu_capability')}")
    if entry["family"] == "llama-bench":
        return (f"{info.get('binary')} (commit {info.get('build_commit')}, backends {info.get('backends')}, "
                f"flash_attn {info.get('flash_attn')}, batch {info.get('n_batch')}/{info.get('n_ubatch')})")
    return None


def table(name: str, shape_res: dict[str, Any], prefill: list[int]) -> str:
    summary, bw = shape_res["summary"], shape_res["bandwidth"]
    p = shape_res["params"]
    lines = [f"== {name}: {p['total'] / 1e6:.0f}M parameters ({p['per_token'] / 1e6:.0f}M read per token), "
             f"prompt {shape_res['prompt']} + {shape_res['new']} new tokens, {shape_res['threads']} threads",
             f"   memory read bandwidth {fmt(bw.get('read_gbps'), '.1f')} GB/s (best of: sum "
             f"{fmt(bw.get('sum_gbps'), '.1f')}, GEMV fp32 {fmt(bw.get('gemv_fp32_gbps'), '.1f')}; "
             f"GEMV bf16 reads {fmt(bw.get('gemv_bf16_gbps'), '.1f')} GB/s)",
             "   decode ceilings (weights bytes per token / bandwidth): " + ", ".join(
                 f"{k} {v:.1f} tok/s" for k, v in shape_res["ceilings"].items())]
    head = ["engine", "dtype", "decode tok/s", "% ceiling", f"ttft{shape_res['prompt']} s"] + \
        [f"prefill {n} s" for n in prefill] + \
        ["load s", "peak RSS GB", "RSS/weights", "base RSS GB", "weights GB", "same tokens", "n"]
    rows, problems = [], []
    for eng, s in summary.items():
        if s.get("problem"):
            problems.append((eng, s["dtype"], s["problem"][:150]))
            continue
        rows.append([eng, s["dtype"], fmt(s["decode_tps"], ".2f"), fmt(s["pct_of_ceiling"], ".0f", "%"),
                     fmt(s["ttft_s"], ".2f")] + [fmt(s.get(f"prefill_{n}_s"), ".2f") for n in prefill] +
                    [fmt(s["load_s"], ".1f"),
                     fmt(s["peak_rss"] and s["peak_rss"] / 1e9, ".2f"), fmt(s.get("rss_over_weights"), ".2f"),
                     fmt(s["rss_base"] and s["rss_base"] / 1e9, ".2f"),
                     fmt(s["weights_bytes"] and s["weights_bytes"] / 1e9, ".2f"), s.get("greedy_agree", "-"),
                     str(s["n"])])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    widths[0] = max([widths[0]] + [len(e) for e, _, _ in problems])
    render = lambda r: "   " + "  ".join(str(c).rjust(w) if i > 1 else str(c).ljust(w)
                                          for i, (c, w) in enumerate(zip(r, widths, strict=False)))
    lines += [render(head), "   " + "-" * (sum(widths) + 2 * (len(widths) - 1))] + [render(r) for r in rows]
    lines += [f"   {e.ljust(widths[0])}  {d.ljust(widths[1])}  {why}" for e, d, why in problems]
    kernel_lines = [(eng, kernels(s)) for eng, s in summary.items() if not s.get("problem")]
    kernel_lines = [(eng, k) for eng, k in kernel_lines if k]
    if kernel_lines:
        w = max(len(e) for e, _ in kernel_lines)
        lines += ["   kernels:"] + [f"     {e.ljust(w)}  {k}" for e, k in kernel_lines]
    if shape_res.get("agreement_reference"):
        lines.append(f"   same tokens: greedy tokens equal to {shape_res['agreement_reference']}'s before the "
                     "first difference (random weights give near-flat logits, so 16-bit/int8 rows diverge early)")
    rat = shape_res["ratios"]
    if rat:
        rhead = ["santa speed-up (>1: santa faster)", "decode", "ttft"] + [f"prefill {n}" for n in prefill] + \
            ["peak RSS ratio"]
        rrows = [[r["label"], fmt(r["decode"], ".2f", "x"), fmt(r["ttft"], ".2f", "x")] +
                 [fmt(r.get(f"prefill_{n}"), ".2f", "x") for n in prefill] + [fmt(r["peak_rss"], ".2f")]
                 for r in rat]
        rw = [max(len(str(r[i])) for r in [rhead, *rrows]) for i in range(len(rhead))]
        rr = lambda r: "   " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                                           for i, (c, w) in enumerate(zip(r, rw, strict=False)))
        lines += ["", rr(rhead)] + [rr(r) for r in rrows]
    tg = shape_res.get("targets") or []
    if tg:
        lines += ["", f"   issue 19 targets (prompt {shape_res['prompt']} tokens; decode = llama-bench tg t/s, "
                      f"llama.cpp TTFT = prompt / pp t/s):"]
        w = max(len(t["label"]) for t in tg)
        for t in tg:
            verdict = "n/a " if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
            goal = f"(target {t['op']} {t['target']:g})"
            lines.append(f"   [{t['isa']:>6}] {t['label'].ljust(w)}  {fmt(t['value'], '.2f').rjust(5)}  "
                         f"{goal.ljust(16)}  {verdict}   {t['a']} vs {t['b']}")
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    """README-ready tables of a finished run (``--markdown results/decode.json``)."""
    out = [f"`{report['command']}` ({report['started'][:10]}; "
           + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + ")"]
    for name, res in report["shapes"].items():
        if "summary" not in res:
            continue
        prefill = res["prefill_lengths"]
        bw = res["bandwidth"].get("read_gbps")
        ceil = ", ".join(f"{k} {v:.1f}" for k, v in res["ceilings"].items())
        out += ["", f"**{name}** ({res['params']['total'] / 1e6:,.0f}M parameters; read bandwidth "
                    f"{fmt(bw, '.1f')} GB/s, so decode ceilings of {ceil} tok/s):", "",
                "| engine | decode tok/s | % of ceiling | ttft (128) s | "
                + " | ".join(f"prefill {n} s" for n in prefill) + " | load s | peak RSS GB (/ weights) |",
                "|---" * (6 + len(prefill)) + "|"]
        for eng, row in res["summary"].items():
            if row.get("problem"):
                continue
            rss = row["peak_rss"] and f"{row['peak_rss'] / 1e9:.2f} ({fmt(row.get('rss_over_weights'), '.2f')})"
            out.append(f"| {eng} | {fmt(row['decode_tps'], '.2f')} | {fmt(row['pct_of_ceiling'], '.0f', '%')} | "
                       f"{fmt(row['ttft_s'], '.2f')} | "
                       + " | ".join(fmt(row.get(f"prefill_{n}_s"), ".2f") for n in prefill)
                       + f" | {fmt(row['load_s'], '.1f')} | {rss or '-'} |")
        out += ["", "| santa / peer (> 1: santa faster) | decode | ttft | "
                + " | ".join(f"prefill {n}" for n in prefill) + " | peak RSS (santa / peer) |",
                "|---" * (4 + len(prefill)) + "|"]
        for r in res["ratios"]:
            out.append(f"| {r['label']} | {fmt(r['decode'], '.2f', 'x')} | {fmt(r['ttft'], '.2f', 'x')} | "
                       + " | ".join(fmt(r.get(f"prefill_{n}"), ".2f", "x") for n in prefill)
                       + f" | {fmt(r['peak_rss'], '.2f')} |")
        if res.get("targets"):
            out += ["", f"| issue 19 target (prompt {res['prompt']}) | ISA | value | target | |",
                    "|---|---|---|---|---|"]
            for t in res["targets"]:
                verdict = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
                out.append(f"| {t['label']} | {t['isa']} | {fmt(t['value'], '.2f')} | {t['op']} {t['target']:g} | "
                           f"{verdict} |")
    return "\n".join(out)


def cpu_model_and_flags() -> tuple[str, set[str]]:
    """The CPU's model name and feature flags, from /proc/cpuinfo."""
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        return platform.processor() or platform.machine(), set()
    fields: dict[str, str] = {}
    for ln in lines:
        if not ln.strip():
            break  # the first CPU is enough
        key, _, value = ln.partition(":")
        fields.setdefault(key.strip(), value.strip())
    model = fields.get("model name") or platform.processor()
    # VMs often show a generic name ("AMD EPYC"); family/model tell the generation apart.
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    return model, set(fields.get("flags", "").split())


def llama_source() -> Path | None:
    """The llama.cpp source folder that build_llama_bench.sh built from, if it still exists."""
    version = LLAMA_BUILD_DIR / "VERSION"
    if version.is_file():
        for line in version.read_text().splitlines():
            if line.startswith("source: ") and Path(line[8:]).is_dir():
                return Path(line[8:])
    return None


def llama_build_info(binary: Path) -> dict[str, Any]:
    """What build_llama_bench.sh recorded next to a llama-bench binary (``<out>/<isa>/bin/``)."""
    variant = binary.parent.parent
    version_file, flags_file = variant.parent / "VERSION", variant / "arch_flags.txt"
    fields = {}
    if version_file.is_file():
        fields = dict(ln.split(": ", 1) for ln in version_file.read_text().splitlines() if ": " in ln)
    version = ", ".join(f"{k} {v}" for k, v in fields.items() if k in ("llama.cpp commit", "llama-cpp-python sdist"))
    return {"binary": str(binary), "exists": binary.is_file(), "version": version or "unknown version",
            "arch_flags": flags_file.read_text().strip() if flags_file.is_file() else None, **fields}


def warm_santa_kernels(isas: list[str], notes: list[str]) -> None:
    """Compile santa's native kernel for each ISA before measuring (it is cached per CPU and flags),
    so the first repeat's load time is not a compile."""
    try:
        from santacli.native import load_library
    except ImportError:
        return
    for isa in isas:
        try:
            load_library(isa=isa)
        except Exception as exc:  # the children will report it properly
            notes.append(f"santa native kernel for {isa} did not build ahead of the run: {exc}")


def past(deadline: dt.datetime | None) -> bool:
    return deadline is not None and dt.datetime.now(dt.timezone.utc) >= deadline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)} (default: all)")
    parser.add_argument("--engines", default=",".join(DEFAULT_ENGINES), help="comma list of engines")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shape, 1 repeat, few tokens")
    parser.add_argument("--reps", type=int, default=None, help="repeats, interleaved across engines (default 3)")
    parser.add_argument("--prefill-reps", type=int, default=None,
                        help="measure the long-prompt prefills in the first N repeats only (default: all)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens before decoding")
    parser.add_argument("--new", type=int, default=64, help="tokens generated for the decode measurement")
    parser.add_argument("--prefill", default="512,1024", help="comma list of prompt lengths for prefill")
    parser.add_argument("--skip-prefill", action="append", default=[], metavar="ENGINE:LEN",
                        help="leave out one slow prefill, e.g. hf-bf16:1024 (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--membw-gib", type=float, default=1.0, help="size of the bandwidth probe tensor")
    parser.add_argument("--deadline", default=None, metavar="HH:MM",
                        help="UTC time after which no new measurement starts (partial results are kept)")
    parser.add_argument("--prepare", action="store_true",
                        help="only build the checkpoints (and ctranslate2 conversions), measure nothing")
    parser.add_argument("--llama-cpp-src", type=Path, default=os.environ.get("LLAMA_CPP_SRC") or llama_source(),
                        help="llama.cpp source folder with convert_hf_to_gguf.py (for the llama.cpp and "
                             "llamabench engines; default: LLAMA_CPP_SRC, else the source that "
                             "build_llama_bench.sh recorded)")
    parser.add_argument("--isa", default="native",
                        help="comma list of instruction sets for santa and llama-bench rows: native, avx2 "
                             "(avx2: santa forced through SANTA_NATIVE_ISA & co., llama-bench's AVX2-only build)")
    parser.add_argument("--llama-bench-native", type=Path, default=LLAMA_BUILD_DIR / "native" / "bin" / "llama-bench",
                        help="llama-bench built with -DGGML_NATIVE=ON (default: build_llama_bench.sh's output)")
    parser.add_argument("--llama-bench-avx2", type=Path, default=LLAMA_BUILD_DIR / "avx2" / "bin" / "llama-bench",
                        help="llama-bench built for AVX2 only (default: build_llama_bench.sh's output)")
    parser.add_argument("--llama-bench-reps", type=int, default=None,
                        help="llama-bench's own -r per child (default 3; --quick 2)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--markdown", type=Path, metavar="JSON", help="print README tables of a finished run")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        run_child(json.loads(args.child))
        return
    if args.markdown is not None:
        print(markdown(json.loads(args.markdown.read_text())))
        return

    if args.quick:
        args.shapes = args.shapes or "tiny_starcoder"
        args.reps = args.reps or 1
        args.llama_bench_reps = args.llama_bench_reps or 2
        args.prompt, args.new, args.prefill = 64, 16, "128,256"
        args.membw_gib = min(args.membw_gib, 0.25)
    args.reps = args.reps or 3
    args.llama_bench_reps = args.llama_bench_reps or 3
    isas = [x for x in args.isa.split(",") if x]
    if not isas or any(x not in ISAS for x in isas) or len(set(isas)) != len(isas):
        parser.error(f"--isa: a comma list of {', '.join(ISAS)}")
    isa_env: dict[str, dict[str, str]] = {"native": {}}
    if "avx2" in isas:
        sys.path.insert(0, str(ROOT / "src"))
        try:
            from santacli.native import forced_isa_env
        except ImportError:
            parser.error("--isa avx2 needs santacli.native.forced_isa_env (not in this checkout)")
        isa_env["avx2"] = forced_isa_env("avx2")
    bench_bins = {"native": args.llama_bench_native.resolve(), "avx2": args.llama_bench_avx2.resolve()}
    shapes = (args.shapes or ",".join(SHAPES)).split(",")
    for s in shapes:
        if s not in SHAPES:
            parser.error(f"unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    wanted = args.engines.split(",")
    for e in wanted:
        if e not in ENGINES:
            parser.error(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    prefill = [int(x) for x in args.prefill.split(",") if x]
    prefill_reps = args.reps if args.prefill_reps is None else args.prefill_reps
    skip_prefill = {tuple(x.split(":")) for x in args.skip_prefill}
    deadline = None
    if args.deadline:
        hh, mm = (int(x) for x in args.deadline.split(":"))
        now = dt.datetime.now(dt.timezone.utc)
        deadline = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if deadline < now - dt.timedelta(hours=12):
            deadline += dt.timedelta(days=1)

    import torch
    import transformers

    command = shlex.join([sys.executable, *sys.argv])
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    for mod in ("ctranslate2", "llama_cpp"):
        if importlib.util.find_spec(mod) is not None:
            versions[mod] = getattr(__import__(mod), "__version__", "?")
    cpu, flags = cpu_model_and_flags()
    bench_wanted = any(ENGINES[e][0] == "llama-bench" for e in wanted)
    llama_builds = {isa: llama_build_info(bench_bins[isa]) for isa in isas} if bench_wanted else {}
    if llama_builds:
        versions["llama.cpp"] = "; ".join(f"{isa}: {b['version']}" for isa, b in llama_builds.items())
    header = [f"command: {command}",
              "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
              f"machine: {cpu}, {os.cpu_count()} logical CPUs, {args.threads} threads per engine",
              "cpu flags: " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in CPU_FLAGS),
              f"isa: {', '.join(isas)}" + ("; avx2 = santa children with " + " ".join(
                  f"{k}={v}" for k, v in isa_env["avx2"].items()) if "avx2" in isas else "")]
    header += [f"llama-bench {isa}: {b['binary']} ({b['version']}; compiled with {b['arch_flags'] or '?'})"
               for isa, b in llama_builds.items()]
    print("\n".join(header))
    print(f"started {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC", flush=True)

    notes: list[str] = []
    converter = args.llama_cpp_src / "convert_hf_to_gguf.py" if args.llama_cpp_src else None
    quantizer = next((b.parent / "llama-quantize" for b in bench_bins.values()
                      if (b.parent / "llama-quantize").is_file()), None)
    engines, missing = available_engines(wanted, converter, tuple(isas), bench_bins)
    notes.extend(f"{name}: {why}" for name, why in missing.items())
    report: dict[str, Any] = {"command": command, "versions": versions, "cpu": cpu, "cpu_flags":
                              {f: f in flags for f in CPU_FLAGS}, "isas": isas, "isa_env": isa_env,
                              "llama_builds": llama_builds, "cpus": os.cpu_count(),
                              "threads": args.threads, "started": dt.datetime.now(dt.timezone.utc).isoformat(),
                              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                       if k != "child"},
                              "engines": engines, "not_run": missing, "notes": notes, "probes": [], "shapes": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["finished"] = dt.datetime.now(dt.timezone.utc).isoformat()
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    tables = []
    setups: dict[str, dict[str, Any]] = {}
    for name in shapes:
        print(f"\n[{name}] checkpoint", flush=True)
        folder = build_checkpoint(name)
        ct2_paths: dict[str, Path] = {}
        for eng in [e for e in engines if ENGINES[base_engine(e)][0] == "ctranslate2"]:
            path = probe_ct2_convert(folder, ENGINES[eng][1], args.threads, notes)
            if path is not None:
                ct2_paths[eng] = path
        gguf_paths: dict[str, Path] = {}  # by GGUF type, shared by the binding and llama-bench rows
        for kind in dict.fromkeys(ENGINES[base_engine(e)][1] for e in engines
                                  if ENGINES[base_engine(e)][0] in GGUF_FAMILIES):
            assert converter is not None
            path = probe_gguf_convert(folder, kind, args.threads, converter, notes, quantizer)
            if path is not None:
                gguf_paths[kind] = path
        setups[name] = {"folder": folder, "ct2": ct2_paths, "gguf": gguf_paths,
                        "engines": [e for e in engines if converted(e, ct2_paths, gguf_paths)]}
        report["shapes"][name] = {"folder": str(folder), "shape": SHAPES[name], "params": param_counts(SHAPES[name]),
                                  "prompt": args.prompt, "new": args.new, "threads": args.threads,
                                  "prefill_lengths": prefill, "bandwidth": {}, "runs": []}
    if args.prepare:
        print("\n".join(notes))
        return
    if any(ENGINES[base_engine(e)][0] == "santa" for e in engines):
        warm_santa_kernels(isas, notes)

    # Interleaved: every repeat runs every shape and engine once, so a deadline cuts repeats, not rows.
    report["loadavg_start"] = os.getloadavg()
    stop = False
    for rep in range(args.reps):
        for name in shapes:
            shape, shape_res, setup = SHAPES[name], report["shapes"][name], setups[name]
            if past(deadline):
                notes.append(f"deadline {args.deadline} UTC reached: repeat {rep + 1} of {name} and later not run")
                stop = True
                break
            if name == shapes[0]:
                probe = spawn({"kind": "membw", "threads": args.threads, "bytes": int(args.membw_gib * 2**30)},
                              timeout=300)
                probe["rep"] = rep
                report["probes"].append(probe)
                print(f"\nrepeat {rep + 1}/{args.reps}: bandwidth probe: " + (probe.get("error") or
                      f"sum {probe['sum_gbps']:.1f} GB/s, gemv fp32 {probe['gemv_fp32_gbps']:.1f}, "
                      f"bf16 {probe['gemv_bf16_gbps']:.1f}"), flush=True)
            print(f"[{name}] repeat {rep + 1}/{args.reps}", flush=True)
            for eng in setup["engines"]:
                if past(deadline):
                    notes.append(f"deadline {args.deadline} UTC reached: {name} {eng} and later engines of "
                                 f"repeat {rep + 1} not run")
                    stop = True
                    break
                base = base_engine(eng)
                family, dtype, _ = ENGINES[base]
                lengths = [n for n in prefill if not {(e, str(n)) for e in (eng, base)} & skip_prefill
                           and not {(name, e, str(n)) for e in (eng, base)} & skip_prefill] \
                    if rep < prefill_reps else []
                lengths = [n for n in lengths if n + 1 <= shape["n_positions"]]
                spec = {"kind": family, "path": str(setup["folder"]), "dtype": dtype, "threads": args.threads,
                        "prompt": args.prompt, "new": args.new, "prefill": lengths, "seed": 0,
                        "decode": "pytorch" if base.endswith("-pt") else "auto"}
                isa = label_isa(eng)
                if family == "ctranslate2":
                    spec.update(ct2_path=str(setup["ct2"][base]), compute_type=dtype)
                elif family in GGUF_FAMILIES:
                    spec.update(gguf=str(setup["gguf"][dtype]))
                if family == "llama-bench":
                    spec.update(binary=str(bench_bins[isa]), bench_reps=args.llama_bench_reps)
                res = spawn(spec, timeout=1800, isa_env=isa_env[isa] if family == "santa" else None)
                res.update(engine=eng, isa=isa, rep=rep)
                shape_res["runs"].append(res)
                if "error" in res or "skipped" in res:
                    print(f"  {eng:<22} {res.get('error') or res.get('skipped')}", flush=True)
                else:
                    pre = ", ".join(f"prefill {n} {res[f'prefill_{n}_s']:.2f} s" for n in lengths)
                    print(f"  {eng:<22} decode {res.get('decode_tps', 0):.2f} tok/s, "
                          f"ttft {res.get('ttft_s', 0):.3f} s{', ' + pre if pre else ''}, "
                          f"peak RSS {res['peak_rss'] / 1e9:.2f} GB, load {fmt(res.get('load_s'), '.1f')} s "
                          f"({res['child_wall_s']:.0f} s wall)", flush=True)
                save()
            if stop:
                break
        if stop:
            break
    report["loadavg_end"] = os.getloadavg()

    for name in shapes:
        shape_res, params = report["shapes"][name], report["shapes"][name]["params"]
        good = [p for p in report["probes"] if "error" not in p]
        if good:
            shape_res["bandwidth"] = {k: max(p[k] for p in good) for k in ("sum_gbps", "gemv_fp32_gbps",
                                                                           "gemv_bf16_gbps")}
            shape_res["bandwidth"]["read_gbps"] = max(shape_res["bandwidth"]["sum_gbps"],
                                                      shape_res["bandwidth"]["gemv_fp32_gbps"])
        bw = shape_res["bandwidth"].get("read_gbps")
        shape_res["ceilings"] = ({f"{label}": bw * 1e9 / (params["per_token"] * b) for label, b in
                                  (("fp32", 4), ("16-bit", 2), ("int8", 1))} if bw else {})
        shape_res["summary"] = summarize(shape_res, setups[name]["engines"], prefill)
        shape_res["ratios"] = ratios(shape_res["summary"], prefill, isas)
        shape_res["targets"] = targets(shape_res["summary"], isas)
        for eng, why in missing.items():
            shape_res["summary"][eng] = {"family": ENGINES[base_engine(eng)][0],
                                         "dtype": ENGINES[base_engine(eng)][1], "isa": label_isa(eng), "n": 0,
                                         "problem": why}
        tables.append(table(name, shape_res, prefill))
    save()

    print("\n" + "=" * 100)
    print("\n".join(header))
    print(f"medians of up to {args.reps} interleaved repeats (n: how many ran; prefill: first "
          f"{min(prefill_reps, args.reps)}), fresh process each; llama-bench: mean of its -r "
          f"{args.llama_bench_reps} per child")
    for t in tables:
        print("\n" + t)
    if notes:
        print("\nnotes:\n" + "\n".join(f"  - {n}" for n in notes))
    save()
    took = dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(report["started"])
    print(f"\nwrote {args.out} (run took {took.total_seconds() / 60:.1f} min; load average at start "
          f"{report.get('loadavg_start', (0,))[0]:.2f}, at end {report.get('loadavg_end', (0,))[0]:.2f})")


if __name__ == "__main__":
    main()
