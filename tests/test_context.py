"""Cross-file context: BM25 against its formula, the one FIM budget (the cursor's text, the
sentinels and the output's room are never displaced), the layout, dedup, the warm prompt cache
reusing a stable block, repositories with thousands of files, unreadable and binary files, the
disk cache, and the CLI's --context flags and --json report."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from santacli import context, repoindex
from santacli.bm25 import Bm25, Postings, bm25_scores
from santacli.context import client_chunks, select
from santacli.fim import Snippet, build_prompt, fit_context, render_snippet
from santacli.repoindex import Index, chunk_text
from santacli.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Each test gets its own user cache folder and no warm indexes from other tests."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    repoindex.forget_indexes()
    yield
    repoindex.forget_indexes()


def git_repo(root: Path, files: dict[str, str | bytes], ignore: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    if ignore:
        (root / ".gitignore").write_text(ignore)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    return root


SHAPES = '''class Rectangle:
    def __init__(self, width, height):
        self.width = width
        self.height = height

    def area(self):
        return self.width * self.height


def make_square(side):
    return Rectangle(side, side)
'''
NETWORK = '''import socket


def open_connection(host, port):
    sock = socket.create_connection((host, port))
    sock.settimeout(5)
    return sock
'''
MAIN_PREFIX = "from shapes import make_square\n\n\ndef total_area(sides):\n    squares = [make_square(s) for s in sides]\n    return sum(sq."
MAIN_SUFFIX = " for sq in squares)\n"


# -- BM25 -----------------------------------------------------------------------------------------


def _formula(query: list[str], docs: list[list[str]]) -> list[float]:
    """Okapi BM25 (k1=1.2, b=0.75, Lucene idf) written out from the textbook, as the oracle."""
    n, avg = len(docs), sum(map(len, docs)) / len(docs)
    out = []
    for doc in docs:
        tf, score = Counter(doc), 0.0
        for term in set(query):
            df = sum(term in d for d in docs)
            if df and tf[term]:
                idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
                score += idf * tf[term] * 2.2 / (tf[term] + 1.2 * (0.25 + 0.75 * len(doc) / avg))
        out.append(score)
    return out


_WORD = st.sampled_from(["alpha", "beta", "gamma", "delta", "eps", "zeta"])


@settings(max_examples=80, deadline=None)
@given(docs=st.lists(st.lists(_WORD, min_size=1, max_size=12), min_size=1, max_size=8),
       query=st.lists(_WORD, min_size=1, max_size=4), split=st.integers(min_value=0, max_value=8))
def test_bm25_matches_the_formula_and_pools_corpora(docs, query, split):
    expected = _formula(query, docs)
    whole = Bm25()
    whole.add("u", Postings.of([Counter(d) for d in docs]))
    [scores] = bm25_scores(query, [whole])
    assert [scores.get(("u", i), 0.0) for i in range(len(docs))] == pytest.approx(expected)
    # Two corpora pooled score exactly as their union does.
    left, right = Bm25(), Bm25()
    left.add("a", Postings.of([Counter(d) for d in docs[:split]]))
    right.add("b", Postings.of([Counter(d) for d in docs[split:]]))
    a, b = bm25_scores(query, [left, right])
    pooled = [a.get(("a", i), 0.0) for i in range(len(docs[:split]))] + \
             [b.get(("b", i), 0.0) for i in range(len(docs[split:]))]
    assert pooled == pytest.approx(expected)


def test_bm25_add_and_remove_keep_statistics_exact():
    corpus = Bm25()
    corpus.add("x", Postings.of([Counter(["a", "b"]), Counter(["b"])]))
    corpus.add("y", Postings.of([Counter(["a", "c", "c"])]))
    corpus.add("x", Postings.of([Counter(["c"])]))  # a file changed: its chunks are replaced
    assert (corpus.chunks, corpus.total_length, dict(corpus.df)) == (2, 4, {"a": 1, "c": 2})
    corpus.remove("y")
    assert (corpus.chunks, corpus.total_length, dict(corpus.df)) == (1, 1, {"c": 1})


# -- layout and the one budget -----------------------------------------------------------------


@pytest.mark.parametrize(("target", "syntax"), [
    ("a.py", ("#", "")), ("x/b.ts", ("//", "")), ("q.sql", ("--", "")), ("m.lua", ("--", "")),
    ("page.html", ("<!--", "-->")), ("s.css", ("/*", "*/")), ("unknown.zzz", ("#", "")), (None, ("#", "")),
    ("data.json", None), ("Makefile", ("#", "")),
])
def test_comment_syntax_follows_the_target_language(target, syntax):
    assert repoindex.comment_syntax(target) == syntax


def test_render_heads_each_snippet_with_its_path():
    code = "def f():\n\n    return 1\n"
    assert render_snippet(Snippet("pkg/a.py", 3, 5, code, ("#", ""))) == (
        "# Path: pkg/a.py\n# def f():\n#\n#     return 1\n")
    assert render_snippet(Snippet("a.ts", 1, 1, "let x = 1;", ("//", ""))) == "// Path: a.ts\n// let x = 1;\n"
    assert render_snippet(Snippet("i.html", 1, 1, "<b>", ("<!--", "-->"))) == "<!-- Path: i.html -->\n<!-- <b> -->\n"


def _encode(text: str) -> list[int]:
    return list(text.encode())


def test_fit_context_takes_by_rank_and_lays_out_in_given_order():
    big = Snippet("big.py", 1, 40, "x = 1\n" * 40, rank=0)
    a = Snippet("a.py", 1, 1, "alpha = 1\n", rank=2)
    b = Snippet("b.py", 1, 1, "beta = 2\n", rank=1)
    room = len(_encode(render_snippet(a))) + len(_encode(render_snippet(b)))
    block, used = fit_context(_encode, [a, big, b], room)
    # The best one does not fit: it is skipped and the smaller ones come in, in the given order.
    assert [u.path for u in used] == ["a.py", "b.py"]
    assert block == _encode(render_snippet(a)) + _encode(render_snippet(b))
    assert sum(u.tokens for u in used) == len(block) <= room
    _, used = fit_context(_encode, [a, big, b], len(_encode(render_snippet(b))))
    assert [u.path for u in used] == ["b.py"]  # rank 1 before rank 2


@pytest.fixture(scope="module")
def santacoder(shared_data) -> Tokenizer:
    return Tokenizer.from_file(shared_data / "santacoder_tokenizer.json")


_LINE = st.text(alphabet=st.sampled_from(list("abc xyz_():=\t0123é")), max_size=30)
_CODE = st.lists(_LINE, max_size=25).map("\n".join)
_SNIPPETS = st.lists(st.tuples(st.sampled_from(["a.py", "b/c.py", "d.py"]), _CODE.filter(str.strip)), max_size=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=_CODE, suffix=_CODE, snippets=_SNIPPETS, max_tokens=st.integers(min_value=1, max_value=150),
       cap=st.one_of(st.none(), st.integers(min_value=0, max_value=400)), fim_mode=st.sampled_from(["psm", "spm"]))
def test_context_never_displaces_cursor_text_sentinels_or_output(santacoder, prefix, suffix, snippets, max_tokens,
                                                                 cap, fim_mode):
    tok = santacoder
    offered = [Snippet(f"s{i}/{path}", 1, text.count("\n") + 1, text, rank=len(snippets) - i)
               for i, (path, text) in enumerate(snippets)]
    by_path = {s.path: s for s in offered}
    common = dict(prefix=prefix or "x", suffix=suffix, fim=tok.fim, fim_mode=fim_mode, n_positions=256,
                  max_tokens=max_tokens)
    plain = build_prompt(tok.encode, **common)
    with_ctx = build_prompt(tok.encode, **common, context=offered, context_tokens=cap)
    # The cursor's text is exactly what it is without context; the output keeps its room.
    assert (with_ctx.prefix, with_ctx.suffix, with_ctx.truncation) == (plain.prefix, plain.suffix, plain.truncation)
    assert len(with_ctx.ids) + max_tokens <= 256
    block = [t for u in with_ctx.context for t in tok.encode(render_snippet(by_path[u.path]))]
    assert [u.path for u in with_ctx.context] == sorted((u.path for u in with_ctx.context), key=list(by_path).index)
    used = sum(u.tokens for u in with_ctx.context)
    assert len(with_ctx.ids) == len(plain.ids) + used and used <= (cap if cap is not None else 256)
    # The block sits right before the file's prefix tokens and nothing else moved.
    f = tok.fim
    if with_ctx.fim:
        p_ids, s_ids = tok.encode(plain.prefix), tok.encode(plain.suffix)
        expected = ([f.prefix, *block, *p_ids, f.suffix, *s_ids, f.middle] if fim_mode == "psm"
                    else [f.prefix, f.suffix, *s_ids, f.middle, *block, *p_ids])
        assert with_ctx.ids == expected
    else:
        assert with_ctx.ids == block + tok.encode(plain.prefix)


def test_context_fills_what_the_cursor_leaves_and_no_more():
    prefix = "".join(f"v{i} = {i}\n" for i in range(40))
    snippet = Snippet("lib.py", 1, 1, "def helper():\n    return 42\n")
    cost = len(_encode(render_snippet(snippet)))
    plain = build_prompt(_encode, prefix=prefix, suffix="", fim=None, n_positions=10_000, max_tokens=10)
    roomy = build_prompt(_encode, prefix=prefix, suffix="", fim=None, n_positions=len(plain.ids) + 10 + cost,
                         max_tokens=10, context=[snippet])
    assert [u.path for u in roomy.context] == ["lib.py"]
    tight = build_prompt(_encode, prefix=prefix, suffix="", fim=None, n_positions=len(plain.ids) + 10 + cost - 1,
                         max_tokens=10, context=[snippet])
    assert tight.context == () and tight.prefix == prefix  # the file's text wins; the snippet waits
    capped = build_prompt(_encode, prefix=prefix, suffix="", fim=None, n_positions=10_000, max_tokens=10,
                          context=[snippet], context_tokens=cost - 1)
    assert capped.context == ()


# -- ranking, dedup and stable order -------------------------------------------------------------


def test_select_finds_the_file_that_defines_what_the_cursor_uses(tmp_path):
    repo = git_repo(tmp_path / "r", {"shapes.py": SHAPES, "network.py": NETWORK, "main.py": MAIN_PREFIX + MAIN_SUFFIX})
    found = context.for_cursor(MAIN_PREFIX, MAIN_SUFFIX, target=repo / "main.py")
    assert [s.path for s in found] == ["shapes.py"]  # nothing shares an identifier with network.py
    assert found[0].text == SHAPES and found[0].comment == ("#", "") and found[0].rank == 0
    assert context.for_cursor(MAIN_PREFIX, MAIN_SUFFIX, target=repo / "main.py", repository=False) == ()


def test_select_drops_text_that_repeats_the_cursor_and_near_duplicates():
    cursor_text = "def total(items):\n    result = 0\n    for item in items:\n        result += item.price\n"
    prefix, suffix = cursor_text + "    return res", "ult\n"
    chunks = client_chunks([
        ("cart.py", cursor_text + "    return result\n"),  # the cursor's own function: dropped
        ("prices.py", "def price_of(item):\n    return item.price * item.count_items\n"),
        ("prices_copy.py", "def price_of(item):\n    return item.price * item.count_items\n"),  # a repeat
        ("other.py", "import logging\nlog = logging.getLogger(__name__)\n"),
    ])
    found = select(prefix, suffix, target="cart.py", client=chunks)
    assert [s.path for s in found] == ["prices.py", "other.py"]
    assert found[0].rank == 0  # the one sharing identifiers ranks first; unscored client chunks follow


def test_layout_order_is_stable_whatever_the_ranking(tmp_path):
    files = {f"m{i}.py": f"def shared_{i}(value):\n    return helper_{i}(value) + common_name\n" for i in range(5)}
    repo = git_repo(tmp_path / "r", {**files, "main.py": "x = 1\n"})
    index = repoindex.open_index(repo, git=True)
    first = select("common_name + helper_1(", ")\n", target="main.py", indexes=[index])
    second = select("common_name + helper_4(", ")\n", target="main.py", indexes=[index])
    assert [s.path for s in first] == [s.path for s in second] == sorted(files)  # layout: by path
    best = {s.rank: s.path for s in first}, {s.rank: s.path for s in second}
    assert (best[0][0], best[1][0]) == ("m1.py", "m4.py")  # ranks follow the cursor


def test_overlapping_windows_of_one_file_are_offered_once(tmp_path):
    body = "".join(f"def func_{i}(widget):\n    return widget.frobnicate({i})\n" for i in range(30))
    repo = git_repo(tmp_path / "r", {"lib.py": body, "main.py": ""})
    index = repoindex.open_index(repo, git=True)
    found = select("widget.frobnicate(", ")\n", target="main.py", indexes=[index])
    spans = sorted((s.start_line, s.end_line) for s in found)
    assert len(found) > 1 and all(a[1] < b[0] for a, b in itertools.pairwise(spans))


# -- the warm prompt cache reuses a stable block --------------------------------------------------


@pytest.fixture(scope="module")
def roomy_engine(tmp_path_factory, tokenizer):
    """The tiny model with 512 positions, so a context block fits beside the file's text."""
    from checkpoints import write_checkpoint
    from santacli.engine import Engine

    folder = write_checkpoint(tmp_path_factory.mktemp("roomy") / "model", tokenizer=tokenizer, n_positions=512)
    return Engine.load(str(folder), device="cpu", dtype="float32", attention="eager")


def test_a_stable_block_is_reused_across_cursor_texts(roomy_engine):
    engine = roomy_engine
    engine.prompt_cache.clear()
    snippets = select("make_square(", ")\n", target="main.py",
                      client=client_chunks([("shapes.py", SHAPES), ("network.py", NETWORK)]))
    assert len(snippets) == 2
    first = engine.infill("def f(a, b):\n    return make_square(", ")\n", max_tokens=4, context=snippets).result
    second = engine.infill("for i in range(10):\n    print(i)\nsq = make_square(", ")\n", max_tokens=4,
                           context=snippets).result
    block = sum(u.tokens for u in first.context)
    assert block > 0 and [u.path for u in first.context] == [u.path for u in second.context]
    # The sentinel and the whole block come from the cache; the new cursor text is computed.
    assert second.reused_prompt_tokens >= 1 + block
    assert second.reused_prompt_tokens < second.prompt_tokens
    assert first.to_dict()["context"] == [{"path": u.path, "start_line": u.start_line, "end_line": u.end_line,
                                           "tokens": u.tokens} for u in first.context]


# -- repositories: thousands of files, caps, unreadable and binary files, the disk cache ----------


def test_thousands_of_files_stay_within_the_caps(tmp_path, monkeypatch):
    monkeypatch.setattr(repoindex, "MAX_FILES", 1500)
    monkeypatch.setattr(repoindex, "MAX_TOTAL_BYTES", 400_000)
    root = tmp_path / "big"
    for d in range(30):
        folder = root / f"pkg{d}"
        folder.mkdir(parents=True)
        for f in range(100):
            (folder / f"mod{f}.py").write_text(f"def function_{d}_{f}(arg):\n    return arg + {f}\n" * 8)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    subprocess.run(["git", "-C", str(root), "add", "-A"], check=True)
    tracemalloc.start()
    try:
        index = Index(root.resolve(), git=True)
        stats = index.refresh()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert stats.listed == 3000
    assert stats.files <= 1500 and stats.bytes <= 400_000
    assert stats.files + stats.skipped == 3000
    assert stats.chunks == stats.files  # 16 lines: one window per file
    assert peak < 64 * 2**20
    found = select("function_3_7(", ")\n", target="main.py", indexes=[index])
    assert len(found) <= context.MAX_OFFERED


def test_unreadable_binary_generated_and_ignored_files_are_skipped(tmp_path):
    big = "value = 1\n" * (repoindex.MAX_FILE_BYTES // 10 + 1)
    repo = git_repo(tmp_path / "r", {
        "good.py": "def wanted_function(x):\n    return x\n",
        "binary.py": b"def wanted_function(x):\x00\x01\x02\n",
        "latin1.py": "def wanted_function(x):  # caf\xe9\n".encode("latin-1"),
        "generated_pb2.py": "def wanted_function(x):\n    return x\n",
        "gen.py": "# Code generated by protoc. DO NOT EDIT.\ndef wanted_function(x):\n    return x\n",
        "app.min.js": "function wanted_function(x){return x}\n",
        "minified.py": "wanted_function = 1; " * 400 + "\n",
        "huge.py": big + "def wanted_function(x):\n    return x\n",
        "image.png": b"\x89PNG\r\n\x1a\n\x00\x00",
        "ignored.py": "def wanted_function(x):\n    return x\n",
        "main.py": "wanted_function(",
    }, ignore="ignored.py\n")
    (repo / "untracked.py").write_text("def wanted_function(y):\n    return y * 2\n")  # new, not ignored: counts
    os.mkfifo(repo / "fifo.py")  # would block a reader
    (repo / "dangling.py").symlink_to(repo / "nowhere.py")  # listed by git, but nothing to read
    subprocess.run(["git", "-C", str(repo), "add", "dangling.py"], check=True)
    index = Index(repo.resolve(), git=True)
    stats = index.refresh()
    assert sorted(rel for rel, f in index.files.items() if f.spans) == ["good.py", "main.py", "untracked.py"]
    assert stats.files == 3
    found = select("wanted_function(", ")\n", target="main.py", indexes=[index], target_file=repo / "main.py")
    assert sorted(s.path for s in found) == ["good.py", "untracked.py"]  # main.py itself is left out


def test_the_disk_cache_reindexes_only_changed_files(tmp_path, monkeypatch):
    repo = git_repo(tmp_path / "r", {f"m{i}.py": f"def f{i}():\n    return {i}\n" for i in range(6)})
    first = repoindex.open_index(repo, git=True)
    cache = repoindex.cache_file(repo.resolve())
    assert first.stats.files == 6 and cache.is_file()
    saved = cache.read_text()
    repoindex.forget_indexes()  # a new CLI run: nothing warm in this process
    (repo / "m2.py").write_text("def f2():\n    return 'changed'\n")
    read: list[str] = []
    real = repoindex.read_source
    monkeypatch.setattr(repoindex, "read_source", lambda path, **kw: read.append(path.name) or real(path, **kw))
    second = repoindex.open_index(repo, git=True)
    assert read == ["m2.py"] and second.stats.files == 6
    assert cache.read_text() == saved  # one changed file: cheaper to re-read than to rewrite the cache
    assert second.chunk("m2.py", 0).text == "def f2():\n    return 'changed'\n"
    # A chunk whose file changed after indexing is not offered with stale text.
    (repo / "m3.py").write_text("x = 1\n")
    assert second.chunk("m3.py", 0) is None


def test_a_corrupt_cache_is_rebuilt(tmp_path):
    repo = git_repo(tmp_path / "r", {"a.py": "def a():\n    pass\n"})
    path = repoindex.cache_file(repo.resolve())
    path.parent.mkdir(parents=True)
    path.write_text('{"version": 1, "files": [')
    assert repoindex.open_index(repo, git=True).stats.files == 1


def test_plain_folders_are_walked_without_git(tmp_path):
    folder = tmp_path / "lib"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "tool.py").write_text("def tool_helper():\n    pass\n")
    (folder / "node_modules").mkdir()
    (folder / "node_modules" / "dep.js").write_text("function tool_helper() {}\n")
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "h.py").write_text("def tool_helper():\n    pass\n")
    index = repoindex.open_index(folder, git=False)
    assert sorted(index.files) == ["sub/tool.py"]
    found = context.for_cursor("tool_helper(", ")\n", target=None, files=[folder])
    assert [s.path for s in found] == [f"{context._shown_path(folder)}/sub/tool.py"]


def test_outside_a_repository_there_is_no_repository_context(tmp_path):
    (tmp_path / "lone.py").write_text("import os\n")
    (tmp_path / "helper.py").write_text("import os\ndef os_helper():\n    return os.getcwd()\n")
    assert context.for_cursor("import os\n", "", target=tmp_path / "lone.py") == ()


# -- the CLI ----------------------------------------------------------------------------------------


def _santa(args: list[str], capsys, stdin: str | None = None) -> dict:
    from santacli.cli import app as cli

    if stdin is not None:
        sys.stdin = _Stdin(stdin.encode())
    code = cli.main([*args, "--json", "--max-tokens", "4", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


class _Stdin(io.TextIOWrapper):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data), encoding="utf-8")

    def isatty(self) -> bool:
        return False


def test_cli_uses_repository_context_and_reports_it(tmp_path, roomy_engine, capsys, monkeypatch):
    monkeypatch.setenv("SANTA_NO_HINT", "1")
    monkeypatch.setenv("SANTA_CONFIG", "/nonexistent/santa.toml")
    monkeypatch.setattr(sys, "stdin", sys.stdin)  # restored after the infill run
    model = roomy_engine.info.folder
    repo = git_repo(tmp_path / "r", {"shapes.py": SHAPES, "main.py": MAIN_PREFIX + MAIN_SUFFIX})
    outside = tmp_path / "notes.py"
    outside.write_text("def make_square_report(side):\n    return f'square {side}'\n")
    monkeypatch.chdir(repo)
    line = MAIN_PREFIX.count("\n") + 1
    spec = f"main.py:{line}:{len(MAIN_PREFIX.rsplit(chr(10), 1)[1]) + 1}"
    base = ["complete", spec, "--model", str(model)]
    used = _santa(base, capsys)["context"]
    assert [c["path"] for c in used] == ["shapes.py"] and used[0]["tokens"] > 0
    assert (used[0]["start_line"], used[0]["end_line"]) == (1, 11)
    assert _santa([*base, "--no-context"], capsys)["context"] == []
    assert _santa([*base, "--context-tokens", "0"], capsys)["context"] == []
    both = _santa([*base, "--context", str(outside)], capsys)["context"]
    assert sorted(c["path"] for c in both) == sorted(["shapes.py", outside.as_posix()])
    only_named = _santa([*base, "--no-context", "--context", str(outside)], capsys)["context"]
    assert [c["path"] for c in only_named] == [outside.as_posix()]
    # santa infill --path: the same repository context for code on stdin.
    piped = _santa(["infill", "--path", "main.py", "--model", str(model)], capsys,
                   stdin=MAIN_PREFIX + "<CURSOR>" + MAIN_SUFFIX)
    assert [c["path"] for c in piped["context"]] == ["shapes.py"]
    assert _santa(["infill", "--model", str(model)], capsys, stdin=MAIN_PREFIX + "<CURSOR>")["context"] == []


def test_cli_refuses_a_missing_context_file(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from santacli.cli import app as cli

    monkeypatch.setenv("SANTA_NO_HINT", "1")
    monkeypatch.setenv("SANTA_CONFIG", "/nonexistent/santa.toml")
    (tmp_path / "a.py").write_text("x = 1\n")
    code = cli.main(["complete", f"{tmp_path / 'a.py'}:1", "--model", str(tiny_checkpoint),
                     "--context", str(tmp_path / "missing.py")])
    assert code == 2 and "missing.py: no such file" in capsys.readouterr().err
    code = cli.main(["complete", f"{tmp_path / 'a.py'}:1", "--model", str(tiny_checkpoint), "--context-tokens", "-1"])
    assert code == 2


def test_chunk_windows_overlap_by_half():
    text = "".join(f"name_{i} = {i}\n" for i in range(45))
    spans = [(c.start_line, c.end_line) for c in chunk_text("a.py", text)]
    assert spans == [(1, 20), (11, 30), (21, 40), (31, 45)]
