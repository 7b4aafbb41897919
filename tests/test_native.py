"""The native CPU decode step (santacli/native.py + kernels/decode.c) against PyTorch's."""

from __future__ import annotations

import pytest
import torch

from checkpoints import write_checkpoint
from santacli import Engine, native
from santacli.config import SUPPORTED_ACTIVATIONS
from santacli.errors import BackendError
from santacli.generate import SamplingParams

if not native.status().available:
    pytest.skip(f"native decode unavailable: {native.status().detail}", allow_module_level=True)


def prompt(n: int, vocab: int, seed: int = 1) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@torch.inference_mode()
def decode_logits(model, ids: list[list[int]], prefill: int, max_len: int = 64) -> torch.Tensor:
    """Prefill ``prefill`` tokens with PyTorch, then one-token steps through model.decoder (if set)."""
    rows = torch.tensor(ids)
    cache = model.new_cache(batch=rows.shape[0], max_len=max_len)
    model(rows[:, :prefill], start_pos=0, cache=cache)
    cache.length = prefill
    steps = []
    for pos in range(prefill, rows.shape[1]):
        steps.append(model(rows[:, pos:pos + 1], start_pos=pos, cache=cache, last_only=True).float())
        cache.length += 1
    return torch.cat(steps, dim=1)


def both_paths(folder, **load):
    fast = Engine.load(str(folder), decode="native", **load)
    slow = Engine.load(str(folder), decode="pytorch", **load)
    assert fast.info.decode.startswith("native") and fast.model.decoder is not None
    assert slow.info.decode == "pytorch" and slow.model.decoder is None
    return fast, slow


@pytest.mark.parametrize("mq", [True, False])
@pytest.mark.parametrize("act", SUPPORTED_ACTIVATIONS)
def test_fp32_steps_match_pytorch(tmp_path, tokenizer, mq, act):
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, multi_query=mq, activation_function=act)
    fast, slow = both_paths(folder)
    ids = [prompt(30, tokenizer.get_vocab_size(), seed=s) for s in (1, 2)]
    full = torch.stack([slow.logits(row) for row in ids])[:, 12:]
    got = decode_logits(fast.model, ids, prefill=12)
    assert (got - decode_logits(slow.model, ids, prefill=12)).abs().max().item() <= 1e-5
    assert (got - full).abs().max().item() <= 1e-5  # cached native steps == uncached pass


@pytest.mark.parametrize("config", [
    {"n_head": 1}, {"n_head": 8}, {"n_inner": 48}, {"scale_attn_weights": False},
    {"n_embd": 72, "n_head": 3, "multi_query": False},  # head_dim 24: vector tails in every loop
    {"n_embd": 40, "n_head": 2, "n_inner": 100},
])
def test_fp32_steps_match_for_every_shape_and_flag(tmp_path, tokenizer, config):
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, **config)
    fast, slow = both_paths(folder)
    ids = [prompt(24, tokenizer.get_vocab_size(), seed=4)]
    assert (decode_logits(fast.model, ids, 8) - decode_logits(slow.model, ids, 8)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("mq", [True, False])
def test_16bit_steps_track_fp32(tmp_path, tokenizer, dtype, mq):
    """16-bit weights and cache, fp32 activations: at least as close to fp32 as PyTorch's 16-bit step."""
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, multi_query=mq)
    ids = [prompt(30, tokenizer.get_vocab_size(), seed=6)]
    ref = decode_logits(Engine.load(str(folder), decode="pytorch").model, ids, 12)
    fast, slow = both_paths(folder, dtype=dtype)
    native_err = (decode_logits(fast.model, ids, 12) - ref).abs().max().item()
    torch_err = (decode_logits(slow.model, ids, 12) - ref).abs().max().item()
    # Measured: both ≈ 0.03-0.05 (bf16) and ≈ 0.005 (fp16) on logits of magnitude ≈ 5.
    assert native_err <= max(1.5 * torch_err, 0.02)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_16bit_prompt_chunks_then_steps(tmp_path, tokenizer, dtype):
    """A warm prefix extended by a prompt-sized chunk (fp32 activations reading the 16-bit cache
    back), then native steps: close to fp32, like one uncached pass of the 16-bit model."""
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer)
    ids = prompt(40, tokenizer.get_vocab_size(), seed=12)
    ref = Engine.load(str(folder)).logits(ids)
    model = Engine.load(str(folder), dtype=dtype).model
    cache = model.new_cache(max_len=64)
    with torch.inference_mode():
        pieces = [model(torch.tensor([ids[:10]]), cache=cache)[0].float()]
        pieces.append(model(torch.tensor([ids[10:25]]), start_pos=10, cache=cache)[0].float())
        cache.length = 25
        for pos in range(25, 40):
            pieces.append(model(torch.tensor([ids[pos:pos + 1]]), start_pos=pos, cache=cache, last_only=True)[0])
    got = torch.cat(pieces)
    assert (got - ref).abs().max().item() < 0.15  # the bf16 tolerance of test_model's bf16 test
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean().item() >= 0.9


@pytest.mark.parametrize("mq", [True, False])
def test_int8_steps_equal_the_prompt_path(tmp_path, tokenizer, mq):
    """Decode steps and prompts quantize activations the same way: the int32 sums are exact, so
    cached native steps agree with an uncached int8 pass to float rounding."""
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, multi_query=mq, n_embd=128, n_head=4)
    fast, slow = both_paths(folder, quantize="int8")
    ids = [prompt(30, tokenizer.get_vocab_size(), seed=8)]
    full = fast.logits(ids[0])[10:]
    got = decode_logits(fast.model, ids, 10)[0]
    assert (got - full).abs().max().item() <= 1e-4
    assert (got - decode_logits(slow.model, ids, 10)[0]).abs().max().item() <= 1e-4


def test_candidates_and_threads(tmp_path, tokenizer):
    """n rows share one prefill; two OpenMP threads give the single-thread numbers."""
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, n_embd=128, n_head=4)
    engine = Engine.load(str(folder))
    ids = prompt(10, tokenizer.get_vocab_size(), seed=7)
    single = engine.generate(ids, max_new_tokens=20, stop_at_eos=False)
    stream = engine.stream_ids(ids, max_new_tokens=20, sampling=SamplingParams(), n=3, stop_ids=frozenset())
    assert all(list(row) == single for row in zip(*list(stream), strict=True))
    rows = [prompt(20, tokenizer.get_vocab_size(), seed=s) for s in (1, 2, 3)]
    one = decode_logits(engine.model, rows, 5)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        two = decode_logits(engine.model, rows, 5)
    finally:
        torch.set_num_threads(old)
    assert (one - two).abs().max().item() <= 1e-5


def test_steps_up_to_the_end_of_the_context(tmp_path, tokenizer):
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, n_positions=48)
    fast, slow = both_paths(folder)
    ids = [prompt(48, tokenizer.get_vocab_size(), seed=9)]
    got = decode_logits(fast.model, ids, 40, max_len=48)
    assert (got - slow.logits(ids[0])[40:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("flags", [("-mno-avx512vnni",), ("-mno-avx512f",),
                                   ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")],
                         ids=["avx512-without-vnni", "avx2", "plain-c"])
def test_other_instruction_sets_compute_the_same(tmp_path, tokenizer, flags):
    """The AVX-512 without VNNI, AVX2 and plain-C builds agree with PyTorch too."""
    try:
        lib, _ = native.load_library(flags)
    except OSError as exc:
        pytest.skip(f"cannot build with {flags}: {exc}")
    expected = 1 if "-mno-avx2" in flags else 8 if "-mno-avx512f" in flags else 16
    if lib.santa_simd_width() != expected:
        pytest.skip(f"this compiler/CPU gives width {lib.santa_simd_width()} with {flags}")
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, n_embd=72, n_head=3, multi_query=False)
    ids = [prompt(20, tokenizer.get_vocab_size(), seed=10)]
    for load, tol in (({}, 1e-5), ({"dtype": "bfloat16"}, 1e-3), ({"dtype": "float16"}, 1e-3),
                      ({"quantize": "int8"}, 1e-4)):
        reference = Engine.load(str(folder), decode="native", **load).model
        other = Engine.load(str(folder), decode="pytorch", **load).model
        other.decoder = native.NativeDecoder(other, lib)
        diff = (decode_logits(other, ids, 6) - decode_logits(reference, ids, 6)).abs().max().item()
        assert diff <= tol, load


def test_pytorch_fallback_when_disabled_or_unbuildable(tmp_path, tokenizer, monkeypatch):
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer)
    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.setenv("SANTA_NATIVE", "0")
    engine = Engine.load(str(folder))
    assert engine.info.decode == "pytorch (native step unavailable: disabled by SANTA_NATIVE=0)"
    assert engine.model.decoder is None
    with pytest.raises(BackendError, match="--decode native is unavailable here"):
        Engine.load(str(folder), decode="native")

    monkeypatch.setattr(native, "_loaded", None)
    monkeypatch.delenv("SANTA_NATIVE")
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # nothing cached there
    state = native.status()
    assert not state.available and "false failed" in state.detail
    assert Engine.load(str(folder)).generate([1, 2, 3], max_new_tokens=4)  # still decodes, in PyTorch
    monkeypatch.setattr(native, "_loaded", None)  # the next test builds (or finds) the real one


def test_out_of_range_ids_raise_instead_of_reading_out_of_bounds(tiny_checkpoint):
    model = Engine.load(str(tiny_checkpoint), decode="native").model
    cache = model.new_cache(max_len=8)
    with torch.inference_mode(), pytest.raises(IndexError, match="token id out of range"):
        model(torch.tensor([[model.config.vocab_size]]), start_pos=0, cache=cache, last_only=True)


def test_bad_decode_mode_is_a_clear_error(tiny_checkpoint):
    with pytest.raises(BackendError, match="unknown decode mode 'fast'"):
        Engine.load(str(tiny_checkpoint), decode="fast")
