"""Prompt-lookup drafting for speculative decoding: pure Python on token ids, no torch.

Code completions copy a lot from their context: an identifier, an argument list, the line
above, the start of the suffix. :class:`PromptLookup` finds the last few tokens of the sequence
(prompt, then the tokens generated so far) where they occurred before and proposes the tokens
that followed them there. The decode loop (:mod:`santacli.generate`) verifies a whole draft in
one model step and keeps the longest prefix that the model itself would have produced, so the
output is unchanged; only the number of steps shrinks.

A lookup costs a few dictionary probes (the n-grams are indexed as tokens arrive), noise next
to a model step. The draft length adapts: it grows while drafts are accepted whole and halves
when one misses from its first token; after several such misses in a row drafting pauses for a
while (longer after each further miss), so output that never repeats its context costs almost
nothing.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from santacli.errors import UsageError

SPECULATE_MODES = ("auto", "off")  # or a number: the most drafted tokens per step
MAX_DRAFT_LIMIT = 32  # a larger N only makes missed drafts costlier
# Whole misses in a row before drafting pauses (1, 2, 4 ... 16 steps). A miss costs a step that
# feeds one or more extra tokens (4-30% of a step at SantaCoder's shape, int8 ... fp32);
# pausing after the first miss gave up 5-10% of the speed-up on real FIM tasks, pausing after
# the third keeps the worst case (a match at every step, every draft wrong) at 0.99x for int8
# and bf16, 0.96x for fp32 (a replay priced with measured step costs, benchmarks/speculate.py).
PAUSE_AFTER = 3


def parse_speculate(value: str) -> int | None:
    """Validate a ``speculate`` option: None for ``auto``, 0 for ``off``, else N >= 1, the
    most tokens drafted per step.

    Raises:
        UsageError: anything else.
    """
    text = str(value).strip().lower()
    if text == "auto":
        return None
    if text in ("off", "0"):
        return 0
    if text.isascii() and text.isdigit() and 1 <= int(text) <= MAX_DRAFT_LIMIT:
        return int(text)
    raise UsageError(f"speculate must be {', '.join(SPECULATE_MODES)} or a draft length from 1 to "
                     f"{MAX_DRAFT_LIMIT}, got {value!r}")


class PromptLookup:
    """n-gram drafter over a growing token sequence.

    For each n from ``max_ngram`` down to ``min_ngram`` it looks up the sequence's last n
    tokens; the most recent earlier occurrence of the longest one found gives the draft: the
    tokens that followed it. A draft may overlap the sequence's end (a repeating run copies
    itself, as in LZ77). It never contains a token of ``never`` (stop tokens: drafting past
    them is wasted work).

    Args:
        ids: the sequence so far (the prompt).
        max_draft: the most tokens one draft may hold.
        start: the first draft length.

    The defaults (4-grams down to single tokens, a first draft of 1) did best in a replay of
    santa-tiny's greedy output on HumanEval infilling and held-out standard-library files
    (see benchmarks/speculate.py), ahead of drafting the most frequent continuation.
    """

    def __init__(self, ids: Iterable[int], *, max_draft: int, max_ngram: int = 4, min_ngram: int = 1,
                 start: int = 1, never: Collection[int] = ()) -> None:
        if max_draft < 1 or not 1 <= min_ngram <= max_ngram:
            raise ValueError("need max_draft >= 1 and 1 <= min_ngram <= max_ngram")
        self.max_draft = max_draft
        self.length = max(1, min(start, max_draft))  # the next draft's length
        self._ngrams = range(max_ngram, min_ngram - 1, -1)
        self._never = frozenset(never)
        self._seq: list[int] = []
        # n -> {n-gram: where the tokens after its latest occurrence start}. An n-gram enters
        # only once a token follows it, so a lookup never finds the sequence's own end.
        self._index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self._ngrams}
        self._pause = 0  # drafts still to skip
        self._misses = 0  # drafts in a row that missed entirely
        self.extend(ids)

    def __len__(self) -> int:
        return len(self._seq)

    def extend(self, ids: Iterable[int]) -> None:
        """Append tokens (the prompt, then each step's output)."""
        seq = self._seq
        for tok in ids:
            end = len(seq)
            for n, table in self._index.items():
                if end >= n:
                    table[tuple(seq[end - n:end])] = end
            seq.append(tok)

    def propose(self, limit: int | None = None) -> list[int]:
        """A draft of at most ``min(self.length, limit)`` tokens to follow the sequence (may be
        empty: no match, drafting paused, or no room)."""
        k = self.length if limit is None else min(self.length, limit)
        if k <= 0:
            return []
        if self._pause:
            self._pause -= 1
            return []
        seq = self._seq
        start = None
        for n in self._ngrams:
            if len(seq) >= n:
                start = self._index[n].get(tuple(seq[len(seq) - n:]))
                if start is not None:
                    break
        if start is None:
            return []
        draft: list[int] = []
        for j in range(k):
            at = start + j
            tok = seq[at] if at < len(seq) else draft[at - len(seq)]
            if tok in self._never:
                break
            draft.append(tok)
        return draft

    def update(self, drafted: int, accepted: int) -> None:
        """Adapt to a verified draft: ``accepted`` of its ``drafted`` tokens were right."""
        if drafted <= 0:
            return
        if accepted >= drafted:
            self.length = min(self.max_draft, self.length + 2)
            self._misses = 0
        elif accepted > 0:
            self._misses = 0  # right for a while: the next copy may run as long
        else:
            self.length = max(1, self.length // 2)
            self._misses += 1
            if self._misses >= PAUSE_AFTER:
                self._pause = min(16, 1 << (self._misses - PAUSE_AFTER))
