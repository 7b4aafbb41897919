"""Tokenizer wrapper: specials as plain text, streaming decode of multi-byte characters."""

from __future__ import annotations

from santacli.tokenizer import Tokenizer


def test_stream_decoder_never_splits_characters(tokenizer, shared_data):
    for tk in (Tokenizer(tokenizer), Tokenizer.from_file(shared_data / "starcoder_tokenizer.json")):
        text = "naïve café — 😀🎉 日本語 def f(): return 'ß'\n"
        ids = tk.encode(text)
        stream = tk.stream()
        pieces = [stream.push(i) for i in ids]
        pieces.append(stream.flush())
        assert "".join(pieces) == text
        assert all("\ufffd" not in p for p in pieces)


def test_encode_raw_honours_spelled_sentinels(shared_data):
    tk = Tokenizer.from_file(shared_data / "santacoder_tokenizer.json")
    assert tk.encode_raw("<fim-prefix>a<fim-suffix>") == [49153, *tk.encode("a"), 49155]
    assert 49153 not in tk.encode("<fim-prefix>")  # plain encode still treats it as text


def test_tiny_tokenizer_specials(tokenizer):
    tk = Tokenizer(tokenizer)
    assert tk.eos_id == 0 and tk.fim is not None and tk.fim.family == "santacoder"
    assert tk.sentinel_ids == frozenset(range(5))


def test_raw_and_plain_encoding_do_not_race_across_threads(shared_data):
    """The server encodes user text and raw prompts on different threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    tk = Tokenizer.from_file(shared_data / "santacoder_tokenizer.json")
    text = "<fim-prefix>def f(x):\n    return x<fim-suffix>\n" * 20
    plain, raw = tk.encode(text), tk.encode_raw(text)
    assert plain != raw

    def check(i: int) -> bool:
        return tk.encode(text) == plain if i % 2 else tk.encode_raw(text) == raw

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(check, range(400)))
