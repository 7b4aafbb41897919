"""Stop rules and post-processing (santacli.stoprules): each mode's rules, stop strings, raw
prompts, suffix repeats, indentation, and streamed chunks that add up to the final text."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from santacli.stoprules import CompletionFilter, match_indentation, partial_match_length

# -- stop rules and post-processing --------------------------------------------------------------


def run_filter(mode, pieces, prefix="", suffix="", stops=(), eos=True):
    f = CompletionFilter(mode, prefix=prefix, suffix=suffix, stops=stops)
    out = ""
    for piece in pieces:
        out += f.feed(piece)
        if f.stopped:
            break
    out += f.finish(ended_by_rule=f.stopped is not None or not eos)
    assert out == f.text
    return f.text, f.stopped


def test_line_mode_stops_at_newline():
    assert run_filter("line", ["a + ", "b\n", "    x"]) == ("a + b", "end_of_line")


def test_block_mode_stops_when_block_ends():
    text, why = run_filter("block", ["\n    return a", " + b\n", "\n", "def sub(a, b):\n"],
                           prefix="def add(a, b):")
    assert (text, why) == ("\n    return a + b", "end_of_block")


def test_block_mode_same_level_inside_body_continues():
    text, why = run_filter("block", ["x = 1\n", "    y = 2\n", "    return y\n", "z = 3\n"],
                           prefix="def f():\n    ")
    assert (text, why) == ("x = 1\n    y = 2\n    return y", "end_of_block")


def test_block_mode_blank_line_run():
    text, why = run_filter("block", ["x = 1\n", "\n", "\n", "y = 2\n"], prefix="")
    assert (text, why) == ("x = 1", "blank_lines")


def test_user_stop_string_in_every_mode():
    for mode in ("line", "block", "full"):
        assert run_filter(mode, ["foo(", "1) # END", " more"], stops=["# END"])[0] == "foo(1)"


def test_drops_lines_that_repeat_the_suffix():
    pieces = ["    total += x\n", "    return total\n"]
    text, _ = run_filter("full", pieces, prefix="def s(xs):\n", suffix="    return total\n", eos=False)
    assert text == "    total += x"
    # Ended by the model itself: its line break before the suffix stays.
    text, _ = run_filter("full", pieces, prefix="def s(xs):\n", suffix="    return total\n", eos=True)
    assert text == "    total += x\n"


def test_block_stops_on_suffix_repeat():
    text, why = run_filter("block", ["\n    total += x\n", "    return total\n", "    more\n"],
                           prefix="def s(xs):", suffix="\n    return total\n")
    assert (text, why) == ("\n    total += x", "suffix_repeat")


def test_drops_surplus_closing_bracket_only():
    # The model closes the call that the suffix closes already: drop the duplicate.
    assert run_filter("line", ["a, b)"], prefix="print(", suffix=")\n")[0] == "a, b"
    # Balanced: the bracket is the model's own; keep it.
    assert run_filter("line", ["g(1)"], prefix="x = f(", suffix=")\n")[0] == "g(1)"


def test_eos_keeps_model_whitespace_rule_cut_strips_it():
    assert run_filter("full", ["x = 1\n"], eos=True)[0] == "x = 1\n"
    assert run_filter("full", ["x = 1\n"], eos=False)[0] == "x = 1"


def test_indentation_follows_file_style():
    prefix = "def f():\n\tif x:\n\t\tpass\n"
    pieces = ["def g(y):\n", "    for i in y:\n", "        print(i)\n", "    return\n", "\n\n", "z\n"]
    text, _ = run_filter("block", pieces, prefix=prefix)
    assert text == "def g(y):\n\tfor i in y:\n\t\tprint(i)\n\treturn"
    assert match_indentation("a\n\tb", " ", 2) == "a\n  b"


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab )(:\n\t#")), max_size=60),
       cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=10),
       mode=st.sampled_from(["line", "block", "full", "raw"]),
       suffix=st.sampled_from(["", ")\n", "\n    b\n", "a)\nb"]),
       eos=st.booleans())
def test_streamed_chunks_add_up_to_final_text(text, cuts, mode, suffix, eos):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    # run_filter asserts that the released chunks add up to the final text.
    final, _ = run_filter(mode, pieces, prefix="def f(x):\n    ", suffix=suffix, stops=["##"], eos=eos)
    assert "##" not in final


def test_partial_match_length():
    assert partial_match_length("x = 1\n#", ["\n#"]) == 2
    assert partial_match_length("abc", ["cde", "bcx"]) == 2  # the longest candidate start wins
    assert partial_match_length("abc", ["xyz"]) == 0
    assert partial_match_length("", ["a"]) == 0
    assert partial_match_length("ab", []) == 0


def test_raw_mode_changes_nothing_but_stop_strings():
    # A raw prompt's text keeps its whitespace and indentation, whatever ends it.
    text, reason = run_filter("raw", ["def f():\n\tx  ", "\n  y \n\n\n", "z"], suffix="z", eos=False)
    assert text == "def f():\n\tx  \n  y \n\n\nz" and reason is None
    text, reason = run_filter("raw", ["a \n", "b##c"], stops=["##"])
    assert text == "a \nb" and reason == "stop_sequence"


def test_raw_include_stop_keeps_the_piece_that_completed_it():
    f = CompletionFilter("raw", stops=["##"], include_stop=True)
    assert f.feed("a #") == "a #"
    assert f.feed("#b\nc") == "#b\nc" and f.stopped == "stop_sequence"
    assert f.feed("more") == "" and f.finish() == "" and f.text == "a ##b\nc"


def test_a_loop_within_a_line_ends_the_text():
    text, reason = run_filter("block", ["        self._is", "_is_is_is_is_is_is_is_is"], prefix="def f():\n")
    assert (text, reason) == ("        self._is", "repetition")
    # Code that repeats itself on purpose is left alone: rulers, numbers, short runs.
    for line in ("# " + "-" * 40, "x = 1000000000000000", "ab = abab + ababab", "s = 'ha' * 3  # hahaha"):
        assert run_filter("line", [line, "\nnext"])[0] == line
