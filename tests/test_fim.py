"""FIM text layer: cursors, prompt layout (checked against the real tokenizers) and budgets."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from santacli.errors import ContextLengthError, UsageError
from santacli.fim import (
    build_prompt,
    choose_mode,
    fit_to_budget,
    parse_cursor_spec,
    split_at_marker,
    split_at_position,
)
from santacli.tokenizer import Tokenizer

# -- cursors -------------------------------------------------------------------------------------


def test_parse_cursor_spec():
    assert parse_cursor_spec("a.py:3") == ("a.py", 3, None)
    assert parse_cursor_spec("a.py:3:7") == ("a.py", 3, 7)
    assert parse_cursor_spec("C:/x/a.py:10:2") == ("C:/x/a.py", 10, 2)


@pytest.mark.parametrize("spec", ["a.py", "a.py:", "a.py:x", "a.py:0", "a.py:3:0", "a.py:-1", "a.py:3:b", ":3:"])
def test_parse_cursor_spec_rejects(spec):
    with pytest.raises(UsageError):
        parse_cursor_spec(spec)


def test_split_at_position():
    text = "ab\ncdef\n\nxyz"
    assert split_at_position(text, 2, None) == ("ab\ncdef", "\n\nxyz")
    assert split_at_position(text, 2, 1) == ("ab\n", "cdef\n\nxyz")
    assert split_at_position(text, 2, 5) == ("ab\ncdef", "\n\nxyz")
    assert split_at_position(text, 3, None) == ("ab\ncdef\n", "\nxyz")
    assert split_at_position("é😀x\n", 1, 3) == ("é😀", "x\n")
    assert split_at_position("a\r\nb\r\n", 1, None) == ("a", "\r\nb\r\n")
    for line, col in ((0, None), (5, None), (2, 6), (1, 4)):
        with pytest.raises(UsageError):
            split_at_position(text, line, col)


def test_split_at_marker():
    assert split_at_marker("a<CURSOR>b", "<CURSOR>") == ("a", "b")
    assert split_at_marker("ab", "<CURSOR>") is None
    with pytest.raises(UsageError, match="2 times"):
        split_at_marker("<CURSOR>a<CURSOR>", "<CURSOR>")


def test_choose_mode():
    assert choose_mode("auto", "x = f(", ")\n") == "line"
    assert choose_mode("auto", "def f():\n", "\n\nx = 1") == "block"
    assert choose_mode("auto", "x = ", "   \nfoo") == "block"
    assert choose_mode("full", "a", "b") == "full"
    with pytest.raises(UsageError):
        choose_mode("words", "", "")


# -- prompt layout against the real tokenizers ----------------------------------------------------


@pytest.fixture(params=["santacoder", "starcoder"])
def real_tokenizer(request, shared_data):
    return Tokenizer.from_file(shared_data / f"{request.param}_tokenizer.json")


def test_sentinels_found_for_both_families(shared_data):
    santa = Tokenizer.from_file(shared_data / "santacoder_tokenizer.json")
    assert (santa.eos_id, santa.fim.prefix, santa.fim.middle, santa.fim.suffix, santa.fim.pad) == (
        49152, 49153, 49154, 49155, 49156)
    assert santa.fim.family == "santacoder" and santa.filename_id is None and santa.vocab_size == 49157
    star = Tokenizer.from_file(shared_data / "starcoder_tokenizer.json")
    assert (star.eos_id, star.fim.prefix, star.fim.middle, star.fim.suffix, star.fim.pad) == (0, 1, 2, 3, 4)
    assert star.fim.family == "starcoder" and star.filename_id == 5 and star.reponame_id == 18


def test_literal_sentinel_text_round_trips_as_plain_text(real_tokenizer):
    text = 'x = "<fim-prefix><fim_prefix><|endoftext|><filename>"  # é😀\n'
    ids = real_tokenizer.encode(text)
    assert not set(ids) & real_tokenizer.special_ids
    assert real_tokenizer.decode(ids) == text


def test_psm_spm_exact_sequences(real_tokenizer):
    tok = real_tokenizer
    f = tok.fim
    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    p_ids, s_ids = tok.encode(prefix), tok.encode(suffix)
    psm = build_prompt(tok.encode, prefix=prefix, suffix=suffix, fim=f, n_positions=2048, max_tokens=64)
    assert psm.ids == [f.prefix, *p_ids, f.suffix, *s_ids, f.middle]
    spm = build_prompt(tok.encode, prefix=prefix, suffix=suffix, fim=f, fim_mode="spm", n_positions=2048,
                       max_tokens=64)
    assert spm.ids == [f.prefix, f.suffix, *s_ids, f.middle, *p_ids]
    ltr = build_prompt(tok.encode, prefix=prefix, suffix="", fim=f, n_positions=2048, max_tokens=64)
    assert ltr.ids == p_ids and not ltr.fim
    nofim = build_prompt(tok.encode, prefix=prefix, suffix=suffix, fim=None, n_positions=2048, max_tokens=64)
    assert nofim.ids == p_ids and not nofim.fim


def test_filename_metadata_starcoder(shared_data):
    tok = Tokenizer.from_file(shared_data / "starcoder_tokenizer.json")
    f = tok.fim
    prefix, suffix = "import os\n", "\nprint(1)\n"
    meta = [tok.filename_id, *tok.encode("src/app.py\n")]
    psm = build_prompt(tok.encode, prefix=prefix, suffix=suffix, fim=f, n_positions=8192, max_tokens=64,
                       filename_id=tok.filename_id, filename="src/app.py")
    assert psm.ids == [f.prefix, *meta, *tok.encode(prefix), f.suffix, *tok.encode(suffix), f.middle]
    spm = build_prompt(tok.encode, prefix=prefix, suffix=suffix, fim=f, fim_mode="spm", n_positions=8192,
                       max_tokens=64, filename_id=tok.filename_id, filename="src/app.py")
    assert spm.ids == [f.prefix, f.suffix, *tok.encode(suffix), f.middle, *meta, *tok.encode(prefix)]
    ltr = build_prompt(tok.encode, prefix=prefix, suffix="", fim=f, n_positions=8192, max_tokens=64,
                       filename_id=tok.filename_id, filename="src/app.py")
    assert ltr.ids == [*meta, *tok.encode(prefix)]


def test_no_room_for_prompt(real_tokenizer):
    with pytest.raises(ContextLengthError, match="max-tokens"):
        build_prompt(real_tokenizer.encode, prefix="a", suffix="b", fim=real_tokenizer.fim, n_positions=64,
                     max_tokens=64)


# -- budgets (property tests, with a real tokenizer when available, else a byte tokenizer) -------

@pytest.fixture(scope="module")
def santacoder_tokenizer(shared_data):
    return Tokenizer.from_file(shared_data / "santacoder_tokenizer.json")


_LINE = st.text(alphabet=st.sampled_from(list("abc xyz_():=\t0123é😀")), max_size=30)
_CODE = st.lists(_LINE, max_size=25).map("\n".join)


def _bytes_encode(text: str) -> list[int]:
    return list(text.encode())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=_CODE, suffix=_CODE, budget=st.integers(min_value=1, max_value=300))
def test_budget_fits_and_keeps_text_next_to_cursor(prefix, suffix, budget):
    kept_p, kept_s, trunc = fit_to_budget(_bytes_encode, prefix, suffix, budget)
    assert len(_bytes_encode(kept_p)) + len(_bytes_encode(kept_s)) <= budget
    assert prefix.endswith(kept_p) and suffix.startswith(kept_s)
    assert trunc.prefix_chars == len(prefix) - len(kept_p)
    assert trunc.suffix_chars == len(suffix) - len(kept_s)
    total = len(_bytes_encode(prefix)) + len(_bytes_encode(suffix))
    if total <= budget:
        assert (kept_p, kept_s) == (prefix, suffix)
    elif prefix:
        # The prefix side keeps something next to the cursor when its share of the budget (3/4,
        # or all the suffix leaves) has room for its last character.
        share = max(budget * 3 // 4, budget - len(_bytes_encode(suffix)))
        assert kept_p or len(_bytes_encode(prefix[-1])) > share


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=_CODE, suffix=_CODE, max_tokens=st.integers(min_value=1, max_value=200),
       fim_mode=st.sampled_from(["psm", "spm"]))
def test_prompt_fits_and_keeps_sentinels(santacoder_tokenizer, prefix, suffix, max_tokens, fim_mode):
    tok = santacoder_tokenizer
    n_positions = 256
    prompt = build_prompt(tok.encode, prefix=prefix or "x", suffix=suffix, fim=tok.fim, fim_mode=fim_mode,
                          n_positions=n_positions, max_tokens=max_tokens)
    assert len(prompt.ids) + max_tokens <= n_positions
    if suffix:
        f = tok.fim
        p_ids, s_ids = tok.encode(prompt.prefix), tok.encode(prompt.suffix)
        expected = ([f.prefix, *p_ids, f.suffix, *s_ids, f.middle] if fim_mode == "psm"
                    else [f.prefix, f.suffix, *s_ids, f.middle, *p_ids])
        assert prompt.ids == expected
    assert (prefix or "x").endswith(prompt.prefix) and suffix.startswith(prompt.suffix)


def test_budget_prefers_prefix_and_cuts_at_lines():
    prefix = "".join(f"line{i} = {i}\n" for i in range(100))
    suffix = "".join(f"after{i}()\n" for i in range(100))
    kept_p, kept_s, trunc = fit_to_budget(_bytes_encode, prefix, suffix, 400)
    assert kept_p.startswith("line") and kept_s.endswith("\n")
    assert len(kept_p) > 2 * len(kept_s)
    assert trunc.prefix_lines > 0 and trunc.suffix_lines > 0
