"""The int8 prompt GEMMs (native per instruction set, torch._int_mm, BLAS) and how one is chosen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import write_checkpoint
from santacli import Engine, native, prompt_gemm
from santacli.errors import BackendError
from santacli.quantize import Int8Linear, blas_gemm, quantize_activations, quantize_rows, torch_int_mm_gemm

ROOT = Path(__file__).resolve().parents[1]


def exact(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The reference: int64 sums, then the shared fp32 epilogue order."""
    xq, x_scale = quantize_activations(x)
    y = (xq.long() @ layer.weight.long().t()).float().mul_(x_scale).mul_(layer.scale)
    return y.add_(layer.bias) if layer.bias is not None else y


def layer(in_features: int, out_features: int, bias: bool = True, seed: int = 0) -> Int8Linear:
    g = torch.Generator().manual_seed(seed)
    q, scale, row_sum = quantize_rows(torch.randn((out_features, in_features), generator=g))
    return Int8Linear(q, scale, row_sum, torch.randn(out_features, generator=g) if bias else None)


def native_gemms() -> dict[str, native.NativeInt8Gemm]:
    """The native GEMM built for every instruction set this machine runs."""
    found = {}
    for isa in native.ISA_FLAGS:
        try:
            lib, _ = native.load_library(isa=isa)
        except OSError:
            continue
        found[isa] = native.NativeInt8Gemm(lib)
    return found


# (M, K, N): every tail, and more columns and rows than one cache block holds (KC, MC in decode.c)
SHAPES = [(1, 64, 4), (3, 72, 216), (5, 100, 37), (9, 2048, 129), (130, 300, 20), (70, 4200, 9)]


@pytest.mark.parametrize(("M", "K", "N"), SHAPES)
def test_every_gemm_computes_the_exact_sums(M, K, N):
    lin = layer(K, N, bias=N % 2 == 0)
    x = torch.randn((M, K), generator=torch.Generator().manual_seed(M)) * 3
    expected = exact(lin, x)
    gemms = native_gemms()
    assert gemms, "no native build"
    for isa, gemm in gemms.items():
        assert torch.equal(gemm(lin, x), expected), isa
    assert torch.equal(blas_gemm(lin, x), expected)
    if prompt_gemm._is_exact(torch_int_mm_gemm, K):
        assert torch.equal(torch_int_mm_gemm(lin, x), expected)


def test_native_builds_name_their_instruction_set():
    gemms = native_gemms()
    assert gemms["generic"].isa == "plain C"
    if "avx2" in gemms:
        assert gemms["avx2"].isa == "avx2"
    if "avx512" in gemms:
        assert gemms["avx512"].isa == "avx512"  # x86-64-v4: AVX-512 without VNNI


def test_a_forced_isa_this_cpu_lacks_is_refused(monkeypatch):
    """A kernel built for more than the CPU has would die of an illegal instruction."""
    monkeypatch.setattr(native, "missing_cpu_flags", lambda isa: ["avx512f"] if isa == "avx512" else [])
    with pytest.raises(OSError, match="needs CPU features this CPU lacks: avx512f"):
        native.load_library(isa="avx512")
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv("SANTA_NATIVE_ISA", "avx512")
    state = native.status()
    assert not state.available and "avx512f" in state.detail
    monkeypatch.setattr(native, "_loaded", None)


def test_blas_chunks_stay_exact_past_two_to_the_24():
    """K = 3,000 at |q| = 127: sums reach 4.8e7, beyond fp32's exact integers."""
    weight = torch.full((8, 3000), 127, dtype=torch.int8)
    lin = Int8Linear(weight, torch.ones(8), weight.sum(dim=1, dtype=torch.int32), None)
    x = torch.full((2, 3000), 127.0)
    x[1, ::7] = -127.0
    assert torch.equal(blas_gemm(lin, x), exact(lin, x))


def test_a_saturating_gemm_is_never_chosen(monkeypatch, tmp_path):
    def saturating(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:  # 16-bit pair sums, like oneDNN on AVX2
        xq, _ = quantize_activations(x)
        u = xq.long() + 128
        w = layer.weight.long()
        pairs = (u[:, None, 0::2] * w[None, :, 0::2] + u[:, None, 1::2] * w[None, :, 1::2]).clamp(-32768, 32767)
        return (pairs.sum(dim=2) - 128 * layer.row_sum.long()).float()

    assert not prompt_gemm._is_exact(saturating, 256)
    assert prompt_gemm._is_exact(blas_gemm, 256)
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path)
    monkeypatch.delenv("SANTA_INT8_GEMM", raising=False)
    choice = prompt_gemm.choose(256, 64, {"fast-but-wrong": saturating, "blas": blas_gemm})
    assert choice.name == "blas"
    assert "fast-but-wrong inexact here" in choice.description


def test_the_choice_is_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "cache_dir", lambda: tmp_path)
    monkeypatch.delenv("SANTA_INT8_GEMM", raising=False)
    first = prompt_gemm.choose(128, 96)
    assert first.name in prompt_gemm.candidates()
    assert "measured at 128x128x96" in first.description
    saved = json.loads((tmp_path / "int8-gemm.json").read_text())
    assert [entry["name"] for entry in saved.values()] == [first.name]

    def fail(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(prompt_gemm, "_measure", fail)
    assert prompt_gemm.choose(128, 96) == first
    monkeypatch.setenv("SANTA_INT8_GEMM", "measure")  # asked to measure again: the cache is not read
    with pytest.raises(AssertionError, match="measured again"):
        prompt_gemm.choose(128, 96)
    monkeypatch.delenv("SANTA_INT8_GEMM")
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")  # another instruction-set override: another key
    with pytest.raises(AssertionError, match="measured again"):
        prompt_gemm.choose(128, 96)


def test_forcing_a_gemm(monkeypatch, tmp_path, tokenizer):
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer)
    ids = torch.randint(0, tokenizer.get_vocab_size(), (1, 40), generator=torch.Generator().manual_seed(5)).tolist()[0]
    logits = {}
    for name in ("native", "torch", "blas"):
        monkeypatch.setenv("SANTA_INT8_GEMM", name)
        engine = Engine.load(str(folder), quantize="int8")
        assert engine.info.prompt.endswith("(SANTA_INT8_GEMM)")
        logits[name] = engine.logits(ids)
    assert torch.equal(logits["native"], logits["blas"])
    if prompt_gemm._is_exact(torch_int_mm_gemm, 64):
        assert torch.equal(logits["native"], logits["torch"])
    monkeypatch.setenv("SANTA_INT8_GEMM", "fastest")
    with pytest.raises(BackendError, match="SANTA_INT8_GEMM='fastest' is not one of auto, measure, native, torch, blas"):
        Engine.load(str(folder), quantize="int8")
    monkeypatch.setenv("SANTA_INT8_GEMM", "native")
    monkeypatch.setattr(native, "int8_gemm", lambda: None)
    with pytest.raises(BackendError, match="the native kernel is unavailable here"):
        Engine.load(str(folder), quantize="int8")


def test_unquantized_models_describe_their_prompt_gemm(tiny_checkpoint):
    assert Engine.load(str(tiny_checkpoint)).info.prompt == "pytorch fp32 GEMM"
    assert Engine.load(str(tiny_checkpoint), dtype="bfloat16").info.prompt == (
        "pytorch fp32 GEMM (bfloat16 weights widened a layer at a time)")


def test_bad_isa_override_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv("SANTA_NATIVE_ISA", "avx9000")
    state = native.status()
    assert not state.available and "SANTA_NATIVE_ISA='avx9000' is not one of native, avx512, avx2, generic" in state.detail
    monkeypatch.setattr(native, "_loaded", None)


FORCED_AVX2_SCRIPT = """
import torch
from santacli import Engine
engine = Engine.load({folder!r}, quantize="int8")
ids = list(range(3, 40))
full = engine.logits(ids)
model = engine.model
cache = model.new_cache(batch=1, max_len=64)
with torch.inference_mode():
    model(torch.tensor([ids[:30]]), start_pos=0, cache=cache)
    cache.length = 30
    steps = []
    for pos in range(30, len(ids)):
        steps.append(model(torch.tensor([ids[pos:pos + 1]]), start_pos=pos, cache=cache, last_only=True)[0, -1])
        cache.length += 1
diff = (torch.stack(steps) - full[30:]).abs().max().item()
print("CAPABILITY", torch.backends.cpu.get_cpu_capability())
print("DECODE", engine.info.decode)
print("PROMPT", engine.info.prompt)
print("DIFF", diff)
"""


@pytest.mark.skipif(native.requested_isa() != "native", reason="already forced")
def test_forced_avx2_runs_the_avx2_paths(tmp_path, tokenizer):
    """A fresh process with the forced-AVX2 environment takes AVX2 kernels in PyTorch and santa,
    and its cached int8 steps still equal an uncached pass."""
    if "avx2" not in native_gemms():
        pytest.skip("no AVX2 build on this machine")
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer)
    env = {**os.environ, **native.forced_isa_env("avx2")}
    proc = subprocess.run([sys.executable, "-c", FORCED_AVX2_SCRIPT.format(folder=str(folder))], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split(" ", 1) for line in proc.stdout.splitlines())
    assert out["CAPABILITY"] == "AVX2"
    assert out["DECODE"].startswith("native avx2 (8 lanes)")
    assert "avx2" in out["PROMPT"] or out["PROMPT"].startswith("blas")
    assert float(out["DIFF"]) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_native_weight_quantization_equals_pytorchs(dtype):
    g = torch.Generator().manual_seed(4)
    weight = torch.randn((67, 300), generator=g) * 0.05
    weight[3] = 0.0  # an all-zero row: the 1e-12 floor
    weight[5, :8] = torch.tensor([2.54, -2.54, 1.27, 0.635, -0.635, 0.0, 3.81, -1.905])  # halves: ties to even
    weight = weight.to(dtype)
    expected = quantize_rows(weight)
    got = native.quantize_rows(weight)
    for a, b in zip(got, expected, strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
