"""Cross-file context: which snippets of other files a completion should see.

Candidates come from three places: the other files of the repository the target file lives in
(what ``git ls-files`` lists, so ``.gitignore`` holds; a plain folder is walked instead), files
the caller names, and chunks a client sends (llama.cpp's ``input_extra``). Files are cut into
windows of :data:`WINDOW` lines (half overlapping); binary, generated, minified and oversized
files are skipped, and the indexing work is capped (:data:`MAX_FILES`, :data:`MAX_FILE_BYTES`,
:data:`MAX_TOTAL_BYTES`).

Ranking is Okapi BM25 over identifiers, the query being the identifiers around the cursor;
windows that repeat the text around the cursor are dropped (models copy such text back), and so
are windows overlapping or near-repeating a better one. The result is a tuple of
:class:`~santacli.fim.Snippet` in a stable layout order with their ranks: :func:`santacli.fim.build_prompt`
fits them into the room the cursor's text leaves, and lays them out as comments before it.

A repository's index is built once: kept in this process (the server, the REPL) and on disk
under the user cache folder (the CLI), keyed by the repository's path and refreshed per file by
modification time and size. Pure text and files: no torch.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from santacli.bm25 import Bm25, Postings, bm25_scores
from santacli.errors import UsageError
from santacli.files import read_text_file
from santacli.fim import Snippet
from santacli.repoindex import (
    DOCS,
    IDENT,
    WARM_LOCK,
    Chunk,
    Index,
    chunk_text,
    comment_syntax,
    find_repository,
    identifiers,
    language,
    open_index,
)

MAX_OFFERED = 24  # snippets offered to the prompt (it takes those that fit)
QUERY_LINES_BEFORE = 12  # the query: identifiers of these lines before the cursor ...
QUERY_LINES_AFTER = 4  # ... and after it (a near query beat 24 + 8 on rich and requests)
QUERY_TERMS = 48  # the rarest query identifiers are kept (common ones add time, not signal)
DUPLICATE = 0.5  # a chunk with this share of its lines in the text around the cursor is a repeat
SIMILAR = 0.8  # line-set Jaccard above which two chunks are one
NEAR_CHARS = (16_000, 8_000)  # the text around the cursor checked for repeats: before, after

# ---------------------------------------------------------------------------------------------
# Choosing snippets for a cursor


def query_text(prefix: str, suffix: str) -> str:
    """The text around the cursor that the ranking asks about."""
    before = prefix[-NEAR_CHARS[0]:].split("\n")[-QUERY_LINES_BEFORE:]
    after = suffix[:NEAR_CHARS[1]].split("\n")[:QUERY_LINES_AFTER]
    return "\n".join(before) + "\n".join(after)


def _lines(text: str) -> set[str]:
    """A text's distinct lines worth comparing (stripped, with an identifier)."""
    return {s for s in (line.strip() for line in text.split("\n")) if len(s) > 3 and IDENT.search(s)}


@dataclass
class _Candidate:
    chunk: Chunk
    score: float
    order: tuple[int, str, int, int]  # the layout order: (group, path, client index, first line)


def _named_chunks(paths: Sequence[Path], target: Path | None) -> list[Chunk]:
    """Chunks of the files the caller names (the target itself is left out).

    Raises:
        InputError: a named file is missing, unreadable, binary or not UTF-8.
    """
    out: list[Chunk] = []
    for path in paths:
        if target is not None and _same_file(path, target):
            continue
        out += chunk_text(_shown_path(path), read_text_file(path))
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _shown_path(path: Path) -> str:
    """A path as the prompt shows it: relative to the working folder when inside it."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except (ValueError, OSError):
        return path.as_posix()


def client_chunks(items: Sequence[tuple[str, str]]) -> list[Chunk]:
    """Chunks a client sent as ``(filename, text)``; long ones are cut into windows (their
    lines count from 1 within each chunk)."""
    out: list[Chunk] = []
    for name, text in items:
        if text.strip():
            out += chunk_text(name or "(untitled)", text)
    return out


def select(prefix: str, suffix: str, *, target: str | None = None, indexes: Sequence[Index] = (),
           target_file: Path | None = None, named: Sequence[Chunk] = (), client: Sequence[Chunk] = (),
           limit: int = MAX_OFFERED) -> tuple[Snippet, ...]:
    """The snippets to offer a prompt for this cursor, ranked, in a stable layout order.

    Args:
        target: the name of the file being completed: its extension picks the comment syntax
            and the language that repository snippets must share (docs go with any).
        indexes: repository or folder indexes to search; ``target_file`` (on disk) is left out.
        named: chunks of files the caller named; ``client``: chunks a client sent, in its order.
            Both are offered even without a shared identifier, after those with one.
        limit: the most snippets offered (the prompt takes those that fit its budget).

    Layout order: indexed and named snippets by path and line, then client chunks in the
    client's order; so a block changes only where its snippets change.
    """
    comment = comment_syntax(target)
    if comment is None or not (indexes or named or client):
        return ()
    query = identifiers(query_text(prefix, suffix))
    extra = [*named, *client]
    extra_bm25 = Bm25()
    extra_bm25.add("", Postings.of([Counter(identifiers(c.text)) for c in extra]))
    lang = language(target)
    only: list[Iterable[str] | None] = []
    for index in indexes:
        exclude = index.relative(target_file) if target_file is not None else None
        only.append([rel for rel in index.files
                     if rel != exclude and (lang is None or language(rel) in (lang, DOCS))])
    scores = bm25_scores(query, [*(ix.bm25 for ix in indexes), extra_bm25], only=only, max_terms=QUERY_TERMS)
    # (score, source, unit, chunk number): an index's chunk is read only when its turn comes.
    pool: list[tuple[float, int, str, int]] = []
    for source in range(len(indexes)):
        hits = sorted(scores[source].items(), key=lambda h: (-h[1], h[0]))[:4 * limit]
        pool += [(score, source, rel, number) for (rel, number), score in hits]
    extra_scores = {number: score for (_, number), score in scores[-1].items()}
    pool += [(score, len(indexes), "", i) for i, score in extra_scores.items()]
    pool.sort(key=lambda p: (-p[0], p[1], p[2], p[3]))
    # Then what the caller named or a client sent without a shared identifier: named files in
    # order, client chunks newest (last) first.
    unscored = [i for i in range(len(extra)) if i not in extra_scores]
    unscored.sort(key=lambda i: (i >= len(named), i if i < len(named) else -i))
    pool += [(0.0, len(indexes), "", i) for i in unscored]

    near = _lines(prefix[-NEAR_CHARS[0]:] + "\n" + suffix[:NEAR_CHARS[1]])
    chosen: list[tuple[_Candidate, set[str]]] = []
    texts: list[dict[str, str | None]] = [{} for _ in indexes]  # files read for this request
    for score, source, rel, number in pool:
        if len(chosen) >= limit:
            break
        if source < len(indexes):
            found = indexes[source].chunk(rel, number, texts=texts[source])
            if found is None:
                continue
            chunk = found
            candidate = _Candidate(chunk, score, (0, chunk.path, 0, chunk.start_line))
        else:
            chunk = extra[number]
            group, position = (0, 0) if number < len(named) else (1, number - len(named))
            candidate = _Candidate(chunk, score, (group, chunk.path if group == 0 else "", position,
                                                  chunk.start_line))
        lines = _lines(chunk.text)
        if _redundant(candidate, lines, near, chosen):
            continue
        chosen.append((candidate, lines))
    layout = sorted(range(len(chosen)), key=lambda r: chosen[r][0].order)
    return tuple(Snippet(c.path, c.start_line, c.end_line, c.text, comment, rank)
                 for rank in layout for c in (chosen[rank][0].chunk,))


def _redundant(candidate: _Candidate, lines: set[str], near: set[str],
               chosen: Sequence[tuple[_Candidate, set[str]]]) -> bool:
    """A chunk that repeats the text around the cursor (models copy it back), overlaps a better
    window of the same file, or nearly repeats a better chunk."""
    if not lines or len(lines & near) >= DUPLICATE * len(lines):
        return True
    a = candidate.chunk
    for other, other_lines in chosen:
        b = other.chunk
        if candidate.order[0] == other.order[0] == 0 and a.path == b.path \
                and a.start_line <= b.end_line and b.start_line <= a.end_line:
            return True
        if len(lines & other_lines) >= SIMILAR * len(lines | other_lines):
            return True
    return False


def for_cursor(prefix: str, suffix: str, *, target: Path | str | None, repository: bool = True,
               files: Sequence[Path] = (), chunks: Sequence[tuple[str, str]] = (),
               disk_cache: bool = True) -> tuple[Snippet, ...]:
    """The snippets for a cursor in ``target`` (a path on disk, or only a name): from its git
    repository (with ``repository``; none outside one), the named ``files`` (a folder is
    indexed and searched like a repository) and a client's ``chunks`` (``(filename, text)``).

    Raises:
        UsageError: a named path does not exist.
        InputError: a named file cannot be read (binary, not UTF-8, unreadable).
    """
    for path in files:
        if not path.exists():
            raise UsageError(f"--context {path}: no such file or folder")
    with WARM_LOCK:  # the indexes are shared by this process's threads
        return _for_cursor(prefix, suffix, target=Path(target) if target is not None else None,
                           repository=repository, files=files, chunks=chunks, disk_cache=disk_cache)


def _for_cursor(prefix: str, suffix: str, *, target: Path | None, repository: bool, files: Sequence[Path],
                chunks: Sequence[tuple[str, str]], disk_cache: bool) -> tuple[Snippet, ...]:
    indexes: list[Index] = []
    shown = target.name if target is not None else None
    if repository and target is not None:
        root = find_repository(target.absolute())
        if root is not None:
            repo = open_index(root, git=True, disk_cache=disk_cache)
            indexes.append(repo)
            shown = repo.relative(target) or shown
    for folder in (p for p in files if p.is_dir()):
        index = open_index(folder, git=False, disk_cache=disk_cache)
        shown_folder = _shown_path(folder)
        index.shown = "" if shown_folder == "." else shown_folder.rstrip("/") + "/"
        indexes.append(index)
    named = _named_chunks([p for p in files if not p.is_dir()], target)
    return select(prefix, suffix, target=shown, indexes=indexes, target_file=target, named=named,
                  client=client_chunks(chunks))
