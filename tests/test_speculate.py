"""Speculative decoding from the prompt (santacli.speculate + generate + the native k-token step):
greedy output ids are identical with and without it, on every decode path; the drafter, the
cache rollback, the limits, the options and the time budget."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from checkpoints import write_checkpoint, write_endless_checkpoint
from santacli import Engine, generate, native
from santacli.catalog import BUNDLED_DIR
from santacli.completion import STOP_REASONS, CompletionOptions, CompletionRun, TokenEvent, raw_prompt
from santacli.errors import UsageError
from santacli.generate import AUTO_MAX_DRAFT, AUTO_MIN_STEP_BYTES, SamplingParams, TokenStream, draft_cap
from santacli.settings import Settings
from santacli.speculate import PAUSE_AFTER, PromptLookup, parse_speculate

NATIVE = native.status().available
needs_native = pytest.mark.skipif(not NATIVE, reason="native decode unavailable")
needs_bundled = pytest.mark.skipif(not (BUNDLED_DIR / "model.safetensors").is_file(),
                                   reason="the bundled model has not been built")

# Code that repeats itself, so the bundled model copies from its prompt (prefix, suffix).
FIM = [
    ("def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return ", "\n\n\ndef mul(a, b):\n    return a * b\n"),
    ("class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
     "    def __eq__(self, other):\n        return ", "\n\n    def __hash__(self):\n        return hash((self.x, self.y))\n"),
    ("import os\nimport sys\n\n\ndef main(argv):\n    for name in os.listdir(argv[1]):\n        print(name)\n"
     "    for name in os.listdir(argv[2]):\n", "\n\nif __name__ == '__main__':\n    main(sys.argv)\n"),
]
LEFT_TO_RIGHT = ["def f(x):\n    return x + 1\n\n\ndef g(x):\n    return x + 2\n\n\ndef h(x):\n"]
GREEDY = SamplingParams()


# ---------------------------------------------------------------------------------------------
# Options


def test_speculate_option_values():
    assert parse_speculate("auto") is None and parse_speculate(" AUTO ") is None
    assert parse_speculate("off") == 0 and parse_speculate("0") == 0
    assert parse_speculate("1") == 1 and parse_speculate("32") == 32
    for bad in ("", "on", "-1", "33", "2.5", "yes", "²"):
        with pytest.raises(UsageError, match="speculate must be"):
            parse_speculate(bad)


def test_options_settings_and_result_fields():
    assert Settings().speculate == "auto" and CompletionOptions().speculate == "auto"
    assert CompletionOptions().time_budget_ms is None and "time_budget" in STOP_REASONS
    with pytest.raises(UsageError, match="speculate must be"):
        CompletionOptions(speculate="fast")
    with pytest.raises(UsageError, match="time budget"):
        CompletionOptions(time_budget_ms=0)
    CompletionOptions(speculate="6", time_budget_ms=250)


# ---------------------------------------------------------------------------------------------
# The drafter


def test_lookup_proposes_what_followed_the_latest_occurrence():
    d = PromptLookup([1, 2, 3, 9, 1, 2, 3, 4, 5, 6, 7, 1, 2], max_draft=8, start=8)
    assert d.propose() == [3, 4, 5, 6, 7, 1, 2, 3]  # after the second "1 2" (the latest), running on
    assert d.propose(limit=2) == [3, 4]
    assert PromptLookup([5, 6, 7], max_draft=8).propose() == []  # "7" never occurred before


def test_lookup_prefers_the_longest_ngram():
    # "2 3" last occurred before 8, but "1 2 3" (longer) before 4.
    d = PromptLookup([1, 2, 3, 4, 0, 2, 3, 8, 1, 2, 3], max_draft=4, start=4, max_ngram=3)
    assert d.propose() == [4, 0, 2, 3]
    d = PromptLookup([1, 2, 3, 4, 0, 2, 3, 8, 1, 2, 3], max_draft=4, start=4, max_ngram=2)
    assert d.propose() == [8, 1, 2, 3]
    # A lone repeated token is the weakest clue: used when nothing longer matches.
    assert PromptLookup([7, 1, 9, 5, 1], max_draft=4, start=4).propose() == [9, 5, 1, 9]
    assert PromptLookup([7, 1, 9, 5, 1], max_draft=4, min_ngram=2).propose() == []


def test_lookup_copies_a_repeating_run_and_never_drafts_stop_ids():
    d = PromptLookup([5, 1, 2, 1, 2], max_draft=6, start=6)
    assert d.propose() == [1, 2, 1, 2, 1, 2]  # the copy overlaps its own end
    d = PromptLookup([5, 1, 2, 0, 7, 1, 2], max_draft=6, start=6, never={0})
    assert d.propose() == []  # the draft would start with the stop id
    d = PromptLookup([1, 2, 3, 0, 1, 2], max_draft=6, start=6, never={0})
    assert d.propose() == [3]


def test_lookup_index_grows_with_the_output():
    bulk = PromptLookup([4, 5, 6, 7, 4, 5], max_draft=4, start=4)
    stepwise = PromptLookup([4], max_draft=4, start=4)
    for tok in [5, 6, 7, 4, 5]:
        stepwise.extend([tok])
    assert bulk.propose() == stepwise.propose() == [6, 7, 4, 5]
    assert len(stepwise) == 6


def test_draft_length_adapts_and_misses_back_off():
    d = PromptLookup([1, 2] * 20, max_draft=8, start=2)
    assert len(d.propose()) == 2
    d.update(2, 2)
    assert d.length == 4  # grew after a full accept
    d.update(4, 4)
    d.update(6, 6)
    assert d.length == 8 and len(d.propose()) == 8  # capped at max_draft
    d.update(8, 3)
    assert d.length == 8  # right for a while: kept
    d.update(8, 0)
    assert d.length == 4  # wrong from its first token: halved
    for _ in range(PAUSE_AFTER - 1):
        d.update(1, 0)
    assert d.length == 1 and d.propose() == []  # the PAUSE_AFTER-th miss in a row pauses 1 step
    assert d.propose() == [1]
    d.update(1, 0)
    assert d.propose() == [] and d.propose() == [] and d.propose() == [1]  # then 2 steps
    d.update(1, 1)
    assert d.propose() == [1, 2, 1]  # a hit ends the back-off


# ---------------------------------------------------------------------------------------------
# The k-token step


def _steps(model, ids: torch.Tensor, prefill: int, chunks: list[int], max_len: int = 64):
    """Prefill, then the rest in steps of ``chunks`` tokens (1: plain decoding); all logits."""
    cache = model.new_cache(batch=ids.shape[0], max_len=max_len)
    out = []
    with torch.inference_mode():
        model(ids[:, :prefill], cache=cache)
        pos = prefill
        for size in chunks:
            out.append(model(ids[:, pos:pos + size], start_pos=pos, cache=cache, step=True,
                             last_only=size == 1))
            pos += size
    return torch.cat(out, dim=1), cache, pos


LOADS = [{}, {"dtype": "bfloat16"}, {"dtype": "float16"}, {"quantize": "int8"}]


@needs_native
@pytest.mark.parametrize("load", LOADS, ids=["fp32", "bf16", "fp16", "int8"])
@pytest.mark.parametrize("mq", [True, False], ids=["mqa", "mha"])
def test_native_k_token_step_is_bit_identical_to_one_token_steps(tmp_path, tokenizer, load, mq):
    """Logits and the keys/values written, bit for bit: 8 MQA heads per thread take the 8-head
    attention path, 64 x 64 int8 blocks the VNNI one, rows > 4 the second register block."""
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, multi_query=mq, n_embd=128, n_head=8 if mq else 4)
    model = Engine.load(str(folder), decode="native", **load).model
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, tokenizer.get_vocab_size(), (2, 30), generator=g)
    one, cache1, end = _steps(model, ids, 9, [1] * 21)
    many, cache2, _ = _steps(model, ids, 9, [3, 9, 1, 6, 2])
    assert torch.equal(one, many)
    assert torch.equal(cache1.k[:, :, :, :end], cache2.k[:, :, :, :end])
    assert torch.equal(cache1.v[:, :, :, :end], cache2.v[:, :, :, :end])


@needs_native
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")],
                         ids=["avx2", "plain-c"])
def test_k_token_step_on_other_instruction_sets(tmp_path, tokenizer, flags):
    try:
        lib, _ = native.load_library(flags)
    except OSError as exc:
        pytest.skip(f"cannot build with {flags}: {exc}")
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer, n_embd=128, n_head=8)
    ids = torch.randint(0, tokenizer.get_vocab_size(), (1, 24), generator=torch.Generator().manual_seed(4))
    for load in ({}, {"dtype": "bfloat16"}, {"quantize": "int8"}):
        model = Engine.load(str(folder), decode="pytorch", **load).model
        model.decoder = native.NativeDecoder(model, lib)
        one, _, _ = _steps(model, ids, 6, [1] * 18)
        many, _, _ = _steps(model, ids, 6, [5, 1, 9, 3])
        assert torch.equal(one, many), load


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_pytorch_k_token_step_matches_one_token_steps(tmp_path, tokenizer, backend):
    """Without the native step, PyTorch verifies: causal over the new positions, to fp32 rounding."""
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer)
    model = Engine.load(str(folder), decode="pytorch", attention=backend).model
    ids = torch.randint(0, tokenizer.get_vocab_size(), (1, 30), generator=torch.Generator().manual_seed(5))
    one, _, _ = _steps(model, ids, 10, [1] * 20)
    many, _, _ = _steps(model, ids, 10, [4, 9, 7])
    assert (one - many).abs().max().item() <= 1e-5


@needs_native
def test_rollback_is_just_a_shorter_cache(tmp_path, tokenizer):
    """Rejected positions stay in the buffer above ``length`` and are overwritten unread."""
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer)
    model = Engine.load(str(folder), decode="native").model
    ids = torch.randint(0, tokenizer.get_vocab_size(), (1, 20), generator=torch.Generator().manual_seed(6))
    other = (ids + 1) % tokenizer.get_vocab_size()
    with torch.inference_mode():
        cache = model.new_cache(max_len=32)
        model(ids[:, :10], cache=cache)
        model(other[:, 10:16], start_pos=10, cache=cache, step=True)  # a draft that is wrong from 11 on
        cache.length = 11  # keep position 10 only
        rolled = model(ids[:, 11:18], start_pos=11, cache=cache, step=True)
    fresh, _, _ = _steps(model, torch.cat([ids[:, :10], other[:, 10:11], ids[:, 11:]], dim=1), 10, [1] * 8)
    assert torch.equal(rolled, fresh[:, 1:])


# ---------------------------------------------------------------------------------------------
# Identical output


_engines: dict[str, Engine] = {}


def bundled(**load: str) -> Engine:
    key = repr(sorted(load.items()))
    if key not in _engines:
        _engines[key] = Engine.load("tiny", **load)
    return _engines[key]


def prompts(engine: Engine) -> Iterator[list[int]]:
    for prefix, suffix in FIM:
        yield engine.build_prompt(prefix, suffix, CompletionOptions(max_tokens=48)).ids
    for text in LEFT_TO_RIGHT:
        yield engine.build_prompt(text, "", CompletionOptions(max_tokens=48)).ids


def check_identical(engine: Engine, speculate: str = "8", max_new_tokens: int = 48) -> tuple[int, int]:
    drafted = accepted = 0
    for ids in prompts(engine):
        plain = engine.generate(ids, max_new_tokens=max_new_tokens)
        stream = engine.stream_ids(ids, max_new_tokens=max_new_tokens, sampling=GREEDY, speculate=speculate)
        assert [step[0] for step in stream] == plain
        assert stream.max_draft > 0
        drafted, accepted = drafted + stream.drafted, accepted + stream.accepted
    return drafted, accepted


PATHS = [
    pytest.param({"decode": "native"}, marks=needs_native, id="native-fp32"),
    pytest.param({"decode": "native", "dtype": "bfloat16"}, marks=needs_native, id="native-bf16"),
    pytest.param({"decode": "native", "quantize": "int8"}, marks=needs_native, id="native-int8"),
    # PyTorch's batched products may round differently from its one-row products (see
    # generate.draft_cap); on these models and prompts no top-2 logits come that close.
    pytest.param({"decode": "pytorch", "attention": "sdpa"}, id="pytorch-fp32-sdpa"),
    pytest.param({"decode": "pytorch", "attention": "eager"}, id="pytorch-fp32-eager"),
    pytest.param({"decode": "pytorch", "quantize": "int8"}, id="pytorch-int8"),
]


@needs_bundled
@pytest.mark.parametrize("load", PATHS)
def test_greedy_ids_identical_with_speculation(load):
    drafted, accepted = check_identical(bundled(**load))
    assert 0 < accepted <= drafted  # the model did copy from its prompts


@needs_bundled
@needs_native
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c")],
                         ids=["avx2", "plain-c"])
def test_greedy_ids_identical_on_other_instruction_sets(flags):
    try:
        lib, _ = native.load_library(flags)
    except OSError as exc:
        pytest.skip(f"cannot build with {flags}: {exc}")
    engine = Engine.load("tiny", decode="pytorch", quantize="int8")
    engine.model.decoder = native.NativeDecoder(engine.model, lib)
    assert check_identical(engine)[1] > 0


def test_pytorch_bf16_identical_where_logits_are_clear(tmp_path, tokenizer):
    """bf16 PyTorch steps round visibly differently at T > 1 (why auto leaves it off); with a
    clear winner at every step the output is the same, and T >= 8 keeps 16-bit activations."""
    folder = write_endless_checkpoint(tmp_path / "m", tokenizer=tokenizer, n_positions=64)
    engine = Engine.load(str(folder), decode="pytorch", dtype="bfloat16")
    ids = engine.tokenizer.encode("def f():\n")
    plain = engine.generate(ids, max_new_tokens=40)
    stream = engine.stream_ids(ids, max_new_tokens=40, sampling=GREEDY, speculate="12")
    assert [step[0] for step in stream] == plain and stream.accepted >= 30


@needs_bundled
def test_auto_speculates_on_big_models_with_the_native_step(monkeypatch):
    torch_model = bundled(decode="pytorch").model
    assert draft_cap("5", torch_model, GREEDY, 1) == 5 and draft_cap("off", torch_model, GREEDY, 1) == 0
    assert draft_cap("auto", torch_model, GREEDY, 1) == 0  # PyTorch: not bit-exact
    if not NATIVE:
        return
    model = bundled(decode="native").model
    assert model.step_bytes() < AUTO_MIN_STEP_BYTES and draft_cap("auto", model, GREEDY, 1) == 0  # cache-resident
    assert "fit the CPU caches" in bundled(decode="native").describe_speculation("auto")
    assert bundled(decode="native").describe_speculation("4").startswith("on: prompt-lookup drafts of up to 4")
    monkeypatch.setattr(generate, "AUTO_MIN_STEP_BYTES", 0)
    assert draft_cap("auto", model, GREEDY, 1) == AUTO_MAX_DRAFT
    assert draft_cap("auto", model, SamplingParams(temperature=0.5), 1) == 0  # sampling: off
    assert draft_cap("5", model, GREEDY, 3) == 0  # candidates: plain decoding
    assert draft_cap("auto", torch_model, GREEDY, 1) == 0


@needs_bundled
def test_candidates_and_sampling_decode_plainly_with_the_same_output():
    engine = bundled()
    ids = next(prompts(engine))
    single = engine.generate(ids, max_new_tokens=24)
    stream = engine.stream_ids(ids, max_new_tokens=24, sampling=GREEDY, n=3, speculate="8")
    rows = list(zip(*list(stream), strict=True))
    assert stream.drafted == 0 and all([t for t in row if t is not None] == single for row in rows)
    hot = SamplingParams(temperature=0.8, seed=11)
    sampled = [[s[0] for s in engine.stream_ids(ids, max_new_tokens=24, sampling=hot, speculate=mode)]
               for mode in ("off", "8")]
    assert sampled[0] == sampled[1]


def _record_steps(model) -> list[tuple[int, int]]:
    """Wrap ``model.forward`` to record (start_pos, T) of every call."""
    calls: list[tuple[int, int]] = []
    forward = model.forward

    def recording(input_ids, **kw):
        calls.append((kw.get("start_pos", 0), input_ids.shape[1]))
        return forward(input_ids, **kw)

    model.forward = recording
    return calls


@pytest.mark.parametrize("decode", [pytest.param("native", marks=needs_native), "pytorch"])
def test_drafts_stop_at_max_tokens_and_the_context_end(tmp_path, tokenizer, decode):
    """A model that repeats one token accepts every draft: drafts grow until max_new_tokens and
    the last position of the context bound them, and the output still ends exactly there."""
    folder = write_endless_checkpoint(tmp_path / "m", tokenizer=tokenizer, n_positions=48)
    engine = Engine.load(str(folder), decode=decode)
    ids = engine.tokenizer.encode("x = 1\n")
    for budget in (48 - len(ids), 7, 2, 1):  # the whole context, then token limits inside a draft
        plain = engine.generate(ids, max_new_tokens=budget)
        calls = _record_steps(engine.model)
        stream = engine.stream_ids(ids, max_new_tokens=budget, sampling=GREEDY, speculate="16")
        got = [step[0] for step in stream]
        del engine.model.forward
        assert got == plain and len(got) == budget
        assert all(start + size <= len(ids) + budget - 1 for start, size in calls[1:])
        if budget >= 7:
            assert stream.accepted > 0 and max(size for _, size in calls[1:]) > 2


@needs_bundled
@pytest.mark.parametrize("mode", ["line", "block", "full"])
def test_completions_identical_and_counted(mode):
    engine = bundled()
    for prefix, suffix in FIM:
        off = engine.infill(prefix, suffix, max_tokens=48, mode=mode, speculate="off").result
        on = engine.infill(prefix, suffix, max_tokens=48, mode=mode, speculate="8").result
        assert (on.text, on.stop_reason, on.generated_tokens) == (off.text, off.stop_reason, off.generated_tokens)
        assert off.drafted_tokens == off.accepted_tokens == 0
        assert on.accepted_tokens <= on.drafted_tokens
        tokens = on.to_dict()["tokens"]
        assert isinstance(tokens, dict)
        assert (tokens["drafted"], tokens["accepted"]) == (on.drafted_tokens, on.accepted_tokens)


def test_stop_rules_inside_an_accepted_draft(tmp_path, tokenizer):
    """A stop string completed in the middle of a verified run cuts where plain decoding cuts,
    and the stream yields nothing past it; the warm prompt cache stays valid."""
    folder = write_endless_checkpoint(tmp_path / "m", tokenizer=tokenizer, n_positions=96)
    engine = Engine.load(str(folder))
    prefix = "x = 'aaaaaaaaaaaaaaaaaaaaaaaa'\ny = '"
    opts = CompletionOptions(max_tokens=40, mode="full", stop=("a" * 13,))
    off = engine.complete(prefix, replace(opts, speculate="off")).result
    for _ in range(2):  # the second run starts from the warm cache the first one left
        on = engine.complete(prefix, replace(opts, speculate="8")).result
        assert (on.text, on.stop_reason, on.generated_tokens) == (off.text, "stop_sequence", off.generated_tokens)
        assert on.generated_tokens < 40 and on.accepted_tokens > 0
    assert on.reused_prompt_tokens == on.prompt_tokens - 1
    plain_ids = engine.generate(engine.tokenizer.encode(prefix), max_new_tokens=40)
    assert engine.generate(engine.tokenizer.encode(prefix), max_new_tokens=40, speculate="8") == plain_ids


# ---------------------------------------------------------------------------------------------
# Time budget


class _Clock:
    """A fake ``time.perf_counter`` that advances ``tick`` seconds a call."""

    def __init__(self, tick: float) -> None:
        self.now, self.tick = 1000.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


class _TextSource:
    """A TokenSource of ready-made text pieces (as a server sends them)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces, self.stopped, self.sent = pieces, False, 0

    def __iter__(self) -> Iterator[TokenEvent]:
        for piece in self.pieces:
            if self.stopped:
                return
            self.sent += 1
            yield 0, piece, None

    def stop_row(self, row: int) -> None:
        self.stopped = True

    def close(self) -> None:
        pass

    @property
    def reused_prompt_tokens(self) -> int:
        return 0


def _run(pieces: list[str], **options: object) -> tuple[CompletionRun, _TextSource]:
    source = _TextSource(pieces)
    run = CompletionRun(lambda: source, prompt=raw_prompt([1], "p"), mode="raw",
                        options=CompletionOptions(**options), model="m")  # type: ignore[arg-type]
    return run, source


PIECES = ["x = 1", "\ny", " = 2", "\nz = 3\n", "w = 4", "\n"]


def test_time_budget_ends_at_the_next_line_end(monkeypatch):
    # 10 ms a reading: the run reads the clock at its start, at the first piece (the budget
    # starts there, at 1020) and at each piece with a newline (1030, 1040 ...).
    monkeypatch.setattr(time, "perf_counter", _Clock(0.010))
    run, source = _run(PIECES, time_budget_ms=5)
    result = run.result
    # Spent when the second piece comes: its newline ends the text and is dropped.
    assert (result.text, result.stop_reason) == ("x = 1", "time_budget")
    assert source.sent == 2 and source.stopped

    monkeypatch.setattr(time, "perf_counter", _Clock(0.010))
    run, source = _run(PIECES, time_budget_ms=15)  # not yet spent at 1030, spent at 1040
    assert (run.result.text, run.result.stop_reason) == ("x = 1\ny = 2", "time_budget")
    assert source.sent == 4


def test_unspent_budget_changes_nothing(monkeypatch):
    monkeypatch.setattr(time, "perf_counter", _Clock(0.001))
    with_budget = _run(PIECES, time_budget_ms=60_000)[0].result
    without = _run(PIECES)[0].result
    assert (with_budget.text, with_budget.stop_reason) == (without.text, without.stop_reason)
    assert with_budget.stop_reason == "max_tokens" and with_budget.text == "".join(PIECES)


def test_time_budget_with_the_model(tmp_path, tokenizer, monkeypatch):
    folder = write_endless_checkpoint(tmp_path / "m", tokenizer=tokenizer, token="Ċ", n_positions=64)  # "\n"
    engine = Engine.load(str(folder))
    monkeypatch.setattr(time, "perf_counter", _Clock(0.010))
    result = engine.complete("a = 1", max_tokens=20, mode="full", time_budget_ms=25).result
    assert result.stop_reason == "time_budget" and result.generated_tokens < 20 and "\n" not in result.text


def test_speculation_and_budget_are_per_request_options(tmp_path: Path, tokenizer):
    folder = write_checkpoint(tmp_path / "m", tokenizer=tokenizer)
    engine = Engine.load(str(folder))
    with pytest.raises(UsageError, match="speculate must be"):
        engine.complete("x", speculate="always")
    stream = TokenStream(engine.model, [1, 2, 3], max_new_tokens=4, sampling=GREEDY, speculate="off")
    assert stream.max_draft == 0 and len(list(stream)) == 4
