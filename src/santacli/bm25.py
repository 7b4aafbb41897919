"""Okapi BM25 over identifier terms (k1 1.2, b 0.75, Lucene's idf), exact and incremental:
postings are kept per file, so a changed file is swapped out and in and the statistics stay
exact, and several corpora (a repository, named files, a client's chunks) score together as
their union would. Pure Python.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

# ---------------------------------------------------------------------------------------------
# BM25


K1, B = 1.2, 0.75
COMMON = 0.2  # in a large corpus, query terms found in more than this share of chunks are left out


class Postings:
    """The chunks of one unit (a file, or the chunks a request brought): their lengths in terms
    and, per term, the chunks that hold it, flattened as ``(chunk, count, chunk, count, ...)``."""

    __slots__ = ("lengths", "terms")

    def __init__(self, lengths: list[int], terms: dict[str, tuple[int, ...]]) -> None:
        self.lengths = lengths
        self.terms = terms

    @classmethod
    def of(cls, chunk_terms: Sequence[Mapping[str, int]]) -> Postings:
        postings: dict[str, list[int]] = {}
        for i, terms in enumerate(chunk_terms):
            for term, count in terms.items():
                postings.setdefault(term, []).extend((i, count))
        return cls([sum(t.values()) for t in chunk_terms], {t: tuple(p) for t, p in postings.items()})


class Bm25:
    """Okapi BM25 with Lucene's always-positive idf ``ln(1 + (N - df + 0.5) / (df + 0.5))``,
    over chunks grouped in units (one per file). Postings are kept per unit, so a changed file
    is swapped in and out on its own and the statistics (N, df, average length) stay exact."""

    def __init__(self) -> None:
        self.units: dict[str, Postings] = {}
        self.df: Counter[str] = Counter()
        self.chunks = 0
        self.total_length = 0

    def add(self, key: str, postings: Postings) -> None:
        self.remove(key)
        self.units[key] = postings
        for term, posting in postings.terms.items():
            self.df[term] += len(posting) // 2
        self.chunks += len(postings.lengths)
        self.total_length += sum(postings.lengths)

    def remove(self, key: str) -> None:
        postings = self.units.pop(key, None)
        if postings is None:
            return
        for term, posting in postings.terms.items():
            left = self.df[term] - len(posting) // 2
            if left:
                self.df[term] = left
            else:
                del self.df[term]
        self.chunks -= len(postings.lengths)
        self.total_length -= sum(postings.lengths)


def bm25_scores(query: Iterable[str], corpora: Sequence[Bm25], *, only: Sequence[Iterable[str] | None] = (),
                max_terms: int | None = None) -> list[dict[tuple[str, int], float]]:
    """Per corpus, the scores of its chunks (``(unit, chunk)``) for the distinct terms of
    ``query``, with N, document frequencies and the average length pooled over all ``corpora``
    as if they were one. ``only[i]``: the units of corpus i to score (None: all). With
    ``max_terms``, only that many of the rarest query terms count; in a corpus of over 1000
    chunks, terms in more than :data:`COMMON` of them are left out (they cost the most time
    and move the ranking least)."""
    n = sum(c.chunks for c in corpora)
    if n == 0:
        return [{} for _ in corpora]
    average = max(sum(c.total_length for c in corpora) / n, 1e-9)
    common = max(COMMON * n, 1000)
    terms = sorted((df, t) for t in set(query) if 0 < (df := sum(c.df.get(t, 0) for c in corpora)) <= common)
    if max_terms is not None:
        terms = terms[:max_terms]
    weights = [(t, math.log(1 + (n - df + 0.5) / (df + 0.5))) for df, t in terms]
    out: list[dict[tuple[str, int], float]] = []
    for i, corpus in enumerate(corpora):
        scores: dict[tuple[str, int], float] = {}
        keys = only[i] if i < len(only) else None
        for key in corpus.units if keys is None else keys:
            unit = corpus.units[key]
            postings, lengths = unit.terms, unit.lengths
            for term, idf in weights:
                posting = postings.get(term)
                if posting is None:
                    continue
                for j in range(0, len(posting), 2):
                    chunk, tf = posting[j], posting[j + 1]
                    norm = K1 * (1 - B + B * lengths[chunk] / average)
                    doc = (key, chunk)
                    scores[doc] = scores.get(doc, 0.0) + idf * tf * (K1 + 1) / (tf + norm)
        out.append(scores)
    return out
