"""Sampling and the prefill + decode loop, with speculative decoding from the prompt (drafts from
:mod:`santacli.speculate`, verified several tokens per model step). Works on token ids only;
knows nothing of text."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from santacli.errors import CheckpointError, ContextLengthError, UsageError
from santacli.model import GPTBigCode, KVCache
from santacli.sampling import SamplingParams
from santacli.speculate import PromptLookup, parse_speculate

__all__ = ["SamplingParams", "TokenStream", "describe_speculation", "draft_cap", "sample"]


def sample(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Pick one id per row from float32 logits (B, V)."""
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest set whose mass reaches top_p (the first token always stays).
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# The most tokens "auto" drafts per step: benchmarks/speculate.py measured a step of 1 + 8 tokens
# at 1.3-2.5x the time of a one-token step (SantaCoder shape, native int8, bf16, fp32; more where
# the machine has more memory bandwidth to spare); longer drafts pay off rarely and cost more
# when they miss.
AUTO_MAX_DRAFT = 8
# "auto" needs a step bound by reading weights from memory, so that k tokens cost about one:
# santa-tiny (5-40 MB, in the CPU caches) computes k tokens in nearly k times one token's time,
# and measured 0.89-1.06x with speculation; SantaCoder (1.1-4.5 GB) is far past this.
AUTO_MIN_STEP_BYTES = 128 * 2**20


def _check_finite(logits: Tensor) -> None:
    """A NaN or infinity in the logits means broken weights (or a dtype that overflows): say so
    rather than let greedy decoding pick token 0 forever or sampling fail obscurely."""
    if not bool(torch.isfinite(logits).all()):
        raise CheckpointError("the model computed NaN or infinite values: its weights are broken (or overflow "
                              "this dtype; try --dtype float32)")


def draft_cap(speculate: str, model: GPTBigCode, sampling: SamplingParams, n: int) -> int:
    """The most tokens drafted per step (0: speculation off) for a ``speculate`` option.

    Speculation is greedy-only and single-candidate. For sampling it stays off: the standard
    speculative-sampling acceptance rule would keep the output distribution but not a seed's
    exact output. n > 1 candidates decode plainly. ``auto`` turns it on where verification is
    exact and measured faster: the native CPU step, whose k-token step computes every token bit
    for bit as one-token steps do, with a model big enough that steps are memory-bound
    (:data:`AUTO_MIN_STEP_BYTES`). PyTorch's batched products round differently from its
    one-row products (fp32: ~1e-6 relative; bf16: by a bf16 ulp, which changed 4 of 42
    santa-tiny infills), so there (and on CUDA) a number N must ask for it: the output then
    equals plain greedy decoding except where two top logits tie within that rounding.

    Raises:
        UsageError: an invalid ``speculate`` value.
    """
    requested = parse_speculate(speculate)
    if requested == 0 or not sampling.greedy or n > 1:
        return 0
    if requested is None:
        fast = model.decoder is not None and model.step_bytes() >= AUTO_MIN_STEP_BYTES
        return AUTO_MAX_DRAFT if fast else 0
    return requested


def describe_speculation(speculate: str, model: GPTBigCode) -> str:
    """What ``speculate`` does for greedy single-candidate decoding on ``model`` (``santa info``).

    Raises:
        UsageError: an invalid ``speculate`` value.
    """
    cap = draft_cap(speculate, model, SamplingParams(), 1)
    step = "native" if model.decoder is not None else "pytorch"
    if cap:
        exact = "bit-exact" if model.decoder is not None else "exact up to float rounding"
        return f"on: prompt-lookup drafts of up to {cap} tokens, verified in one {step} step ({exact})"
    if parse_speculate(speculate) == 0:
        return "off"
    if model.decoder is None:
        return "off (auto: only with the native CPU step; ask for a draft length N to use it here)"
    return (f"off (auto: {model.step_bytes() / 2**20:.0f} MiB of weights per step fit the CPU caches, so "
            "verifying k tokens costs about k steps)")


class TokenStream:
    """Prefill once, then decode step by step for ``n`` rows that share the prompt.

    Iterating yields, per token, one id per row (``None`` for rows already finished). A row
    finishes at a stop id, at ``max_new_tokens``, or when the caller calls :meth:`stop_row`
    (text-level stop rules live above this layer).

    With speculation (see :func:`draft_cap`; greedy, one row) a model step verifies a draft
    from :class:`~santacli.speculate.PromptLookup` and may produce several tokens; they are
    still yielded one at a time, and a stop id, :meth:`stop_row` or ``max_new_tokens`` cuts
    between them exactly where plain decoding would stop. ``drafted`` and ``accepted`` count
    drafted tokens and those the model confirmed (and that were yielded).
    """

    def __init__(self, model: GPTBigCode, prompt_ids: list[int], *, max_new_tokens: int,
                 sampling: SamplingParams, stop_ids: frozenset[int] | set[int] = frozenset(),
                 valid_vocab: int | None = None, n: int = 1, cache: KVCache | None = None,
                 reuse: int = 0, speculate: str = "off") -> None:
        """
        Args:
            cache: a cache to fill (batch >= n); a fresh one is made when None.
            reuse: leading prompt positions already valid in ``cache`` (a warm prefix).
            speculate: ``auto``, ``off`` or N, the most drafted tokens per step.
        """
        if not prompt_ids:
            raise UsageError("the prompt is empty")
        if n < 1:
            raise UsageError(f"the number of candidates must be >= 1, got {n}")
        if max_new_tokens < 1:
            raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        limit = model.config.n_positions
        if len(prompt_ids) + max_new_tokens > limit:
            raise ContextLengthError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"context length of this model ({limit}); lower --max-tokens or shorten the input"
            )
        self.model = model
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampling = sampling
        self.stop_ids = frozenset(stop_ids)
        self.n = n
        self.valid_vocab = valid_vocab if valid_vocab and valid_vocab < model.config.vocab_size else None
        self.max_draft = draft_cap(speculate, model, sampling, n)
        if cache is None or cache.batch < n or cache.max_len < len(prompt_ids) + max_new_tokens:
            cache, reuse = model.new_cache(batch=n, max_len=len(prompt_ids) + max_new_tokens), 0
        self.cache = cache
        self.reused = min(reuse, len(prompt_ids) - 1)  # at least one token must be fed
        self.generated = 0
        self.drafted = 0
        self.accepted = 0
        self._done = [False] * n
        self._generator: torch.Generator | None = None
        if not sampling.greedy:
            self._generator = torch.Generator(device=model.device)
            if sampling.seed is not None:
                self._generator.manual_seed(sampling.seed)
            else:
                self._generator.seed()

    def stop_row(self, row: int) -> None:
        self._done[row] = True

    @property
    def finished(self) -> bool:
        return all(self._done)

    def _pick(self, logits: Tensor) -> list[int]:
        logits = logits[:, -1].float()
        _check_finite(logits)
        if self.valid_vocab is not None:
            logits[:, self.valid_vocab:] = float("-inf")  # padding rows of the embedding
        return sample(logits, self.sampling, self._generator).tolist()

    def _greedy_all(self, logits: Tensor) -> list[int]:
        """Row 0's greedy pick at every position of ``logits`` (1, T, V): the same argmax
        over the same values as :meth:`_pick` takes one position at a time."""
        scores = logits[0].float()
        _check_finite(scores)
        if self.valid_vocab is not None:
            scores[:, self.valid_vocab:] = float("-inf")
        ids: list[int] = scores.argmax(dim=-1).tolist()
        return ids

    def _emit(self, ids: list[int]) -> Iterator[list[int | None]]:
        """Yield this step's tokens (one id per row each) and mark rows that end."""
        self.generated += 1
        out: list[int | None] = []
        for row, tok in enumerate(ids):
            if self._done[row]:
                out.append(None)
                continue
            out.append(tok)
            if tok in self.stop_ids:
                self._done[row] = True
        yield out
        if self.generated >= self.max_new_tokens:
            self._done = [True] * self.n

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        model, cache, device = self.model, self.cache, self.model.device
        start = self.reused
        tail = torch.tensor([self.prompt_ids[start:]], dtype=torch.long, device=device)
        logits = model(tail, start_pos=start, cache=cache, last_only=True)
        cache.length = len(self.prompt_ids)
        if self.max_draft:
            yield from self._speculative(self._pick(logits)[0])
            return
        if self.n > 1:
            cache.broadcast_first_row()
            logits = logits.expand(self.n, -1, -1)
        step_ids = torch.empty((self.n, 1), dtype=torch.long, device=device)
        while True:
            ids = self._pick(logits)
            yield from self._emit(ids)
            if self.finished:
                return
            step_ids[:, 0] = torch.as_tensor(ids, device=device)
            logits = model(step_ids, start_pos=cache.length, cache=cache, last_only=True)
            cache.length += 1

    def _speculative(self, first: int) -> Iterator[list[int | None]]:
        """Greedy decoding of row 0 that verifies a prompt-lookup draft in each step.

        Invariant: positions [0, cache.length) hold the keys/values of the prompt and of every
        yielded token but the last, which the next step feeds along with its draft. A step
        writes positions [length, length + 1 + drafted); keeping the accepted ones is advancing
        ``length`` past them, and the rejected ones above it are overwritten before anything
        reads them (attention never looks past a query's own position). So the prompt's
        positions, which the warm prompt cache keeps, are never touched.
        """
        model, cache, device = self.model, self.cache, self.model.device
        drafter = PromptLookup(self.prompt_ids, max_draft=self.max_draft, never=self.stop_ids)
        tokens, accepted = [first], 0
        while True:
            for i, tok in enumerate(tokens):
                yield from self._emit([tok])
                if i < accepted:
                    self.accepted += 1
                if self.finished:
                    return
            drafter.extend(tokens)
            # Every token of this step is yielded at most: the draft never runs past
            # max_new_tokens (nor, since prompt + max_new_tokens fits, past the context).
            draft = drafter.propose(self.max_new_tokens - self.generated - 1)
            step = torch.tensor([[tokens[-1], *draft]], dtype=torch.long, device=device)
            if draft:
                logits = model(step, start_pos=cache.length, cache=cache, step=True)
            else:
                logits = model(step, start_pos=cache.length, cache=cache, last_only=True)
            picks = self._greedy_all(logits)
            accepted = 0
            while accepted < len(draft) and picks[accepted] == draft[accepted]:
                accepted += 1
            drafter.update(len(draft), accepted)
            self.drafted += len(draft)
            cache.length += 1 + accepted  # roll back the rejected positions
            tokens = picks[:accepted + 1]
