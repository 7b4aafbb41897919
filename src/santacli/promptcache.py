"""Warm prompt cache: KV caches of recent prompts, reused for the longest common token prefix.

A request for the same file after a small edit near the cursor recomputes only the new tail.
With multi-query attention an entry is small (SantaCoder: 24 KiB per token in fp32).

Entries belong to a scope (the server's client identity): a request only ever reuses entries of
its own scope, so neither its reuse count nor its speed tells anything about another client's
prompts. The byte and entry caps are shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from santacli.model import KVCache


@dataclass
class _Entry:
    ids: list[int]
    cache: KVCache
    scope: str


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """Least-recently-used KV caches under a byte cap. Not thread-safe: one model worker uses it."""

    def __init__(self, *, max_bytes: int = 512 * 2**20, max_entries: int = 8) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: list[_Entry] = []  # oldest first
        self.hits = 0
        self.reused_tokens = 0
        self.scope = ""  # whose prompts take and put see (see :meth:`scoped`)

    @contextmanager
    def scoped(self, scope: str) -> Iterator[None]:
        """Within the block, take and put see only ``scope``'s entries."""
        previous, self.scope = self.scope, scope
        try:
            yield
        finally:
            self.scope = previous

    def take(self, ids: list[int], *, batch: int, max_len: int) -> tuple[KVCache | None, int]:
        """Remove and return the usable cache sharing the longest prefix with ``ids``."""
        best, best_len = None, 0
        for entry in self._entries:
            if entry.scope != self.scope or entry.cache.batch < batch or entry.cache.max_len < max_len:
                continue
            shared = common_prefix(entry.ids, ids)
            if best is None or shared > best_len:
                best, best_len = entry, shared
        if best is None:
            return None, 0
        self._entries.remove(best)
        if best_len:
            self.hits += 1
            self.reused_tokens += best_len
        return best.cache, best_len

    def put(self, ids: list[int], cache: KVCache) -> None:
        """Keep ``cache`` whose positions [0, len(ids)) hold ``ids``' keys and values (row 0)."""
        if cache.nbytes() > self.max_bytes:
            return
        self._entries.append(_Entry(list(ids), cache, self.scope))
        while len(self._entries) > self.max_entries or self.nbytes() > self.max_bytes:
            self._entries.pop(0)

    def nbytes(self) -> int:
        return sum(e.cache.nbytes() for e in self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
