"""Sampling and the prefill + decode loop. Works on token ids only; knows nothing of text."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from santacli.errors import ContextLengthError, UsageError
from santacli.model import GPTBigCode, KVCache
from santacli.sampling import SamplingParams

__all__ = ["SamplingParams", "TokenStream", "sample"]


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


class TokenStream:
    """Prefill once, then decode step by step for ``n`` rows that share the prompt.

    Iterating yields, per step, one id per row (``None`` for rows already finished). A row
    finishes at a stop id, at ``max_new_tokens``, or when the caller calls :meth:`stop_row`
    (text-level stop rules live above this layer).
    """

    def __init__(self, model: GPTBigCode, prompt_ids: list[int], *, max_new_tokens: int,
                 sampling: SamplingParams, stop_ids: frozenset[int] | set[int] = frozenset(),
                 valid_vocab: int | None = None, n: int = 1, cache: KVCache | None = None,
                 reuse: int = 0) -> None:
        """
        Args:
            cache: a cache to fill (batch >= n); a fresh one is made when None.
            reuse: leading prompt positions already valid in ``cache`` (a warm prefix).
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
        if cache is None or cache.batch < n or cache.max_len < len(prompt_ids) + max_new_tokens:
            cache, reuse = model.new_cache(batch=n, max_len=len(prompt_ids) + max_new_tokens), 0
        self.cache = cache
        self.reused = min(reuse, len(prompt_ids) - 1)  # at least one token must be fed
        self.generated = 0
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
        if self.valid_vocab is not None:
            logits[:, self.valid_vocab:] = float("-inf")  # padding rows of the embedding
        return sample(logits, self.sampling, self._generator).tolist()

    @torch.inference_mode()
    def __iter__(self) -> Iterator[list[int | None]]:
        model, cache, device = self.model, self.cache, self.model.device
        start = self.reused
        tail = torch.tensor([self.prompt_ids[start:]], dtype=torch.long, device=device)
        logits = model(tail, start_pos=start, cache=cache, last_only=True)
        cache.length = len(self.prompt_ids)
        if self.n > 1:
            cache.broadcast_first_row()
            logits = logits.expand(self.n, -1, -1)
        step_ids = torch.empty((self.n, 1), dtype=torch.long, device=device)
        while True:
            ids = self._pick(logits)
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
            if self.finished:
                return
            step_ids[:, 0] = torch.as_tensor(ids, device=device)
            logits = model(step_ids, start_pos=cache.length, cache=cache, last_only=True)
            cache.length += 1
