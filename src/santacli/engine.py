"""Engine: load a model once, then score, generate and complete with it.

The one API that every front end (cli, repl, server) calls.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from santacli import weights
from santacli.config import ModelConfig
from santacli.errors import CheckpointError, UsageError
from santacli.generate import SamplingParams, TokenStream
from santacli.model import GPTBigCode, select_backend
from santacli.tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadInfo:
    """What was loaded and how."""

    name: str
    folder: Path
    device: str
    dtype: str
    attention: str
    load_seconds: float


class Engine:
    """A loaded model and its tokenizer."""

    def __init__(self, model: GPTBigCode, tokenizer: Tokenizer, info: LoadInfo) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.config: ModelConfig = model.config

    @classmethod
    def load(cls, model: str, *, device: str | None = None, dtype: str | None = None,
             attention: str = "auto", allow_download: bool = True) -> Engine:
        """Load a model by folder, alias or hub id.

        Args:
            model: a folder with config.json + safetensors + tokenizer.json, an alias from
                ``santa models`` or a hub id such as ``bigcode/gpt_bigcode-santacoder``.
            device: ``cpu``, ``cuda``, ``cuda:N`` or None/``auto``.
            dtype: ``float32``, ``bfloat16``, ``float16`` or None/``auto`` (fp32 on CPU, bf16 on CUDA).
            attention: ``auto``, ``flash``, ``sdpa`` or ``eager``.

        Raises:
            ModelNotFoundError, ConfigError, CheckpointError, BackendError.
        """
        started = time.perf_counter()
        dev = weights.choose_device(device)
        torch_dtype = weights.choose_dtype(dtype, dev)
        backend = select_backend(attention, dev, torch_dtype)
        folder = weights.resolve_model(model, allow_download=allow_download)
        config = ModelConfig.from_file(folder / "config.json")
        tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
        if tokenizer.vocab_size > config.vocab_size:
            raise CheckpointError(
                f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                f"{config.vocab_size} embeddings; tokenizer.json does not belong to this model"
            )
        net = weights.load_model(folder, config, device=dev, dtype=torch_dtype, backend=backend)
        info = LoadInfo(name=model, folder=folder, device=str(dev), dtype=str(torch_dtype).removeprefix("torch."),
                        attention=backend, load_seconds=time.perf_counter() - started)
        return cls(net, tokenizer, info)

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    def _check_ids(self, ids: list[int]) -> None:
        if not ids:
            raise UsageError("no token ids given")
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise UsageError(f"token ids out of range [0, {self.config.vocab_size}): {bad[:5]}")

    @torch.inference_mode()
    def logits(self, ids: list[int]) -> Tensor:
        """Float32 logits [len(ids), vocab_size] from one full (uncached) forward pass."""
        self._check_ids(ids)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        return self.model(x)[0].float()

    def stream_ids(self, ids: list[int], *, max_new_tokens: int, sampling: SamplingParams,
                   n: int = 1, stop_ids: frozenset[int] | None = None) -> TokenStream:
        """A KV-cached token stream for ``n`` candidates sharing one prefill."""
        self._check_ids(ids)
        stops = self.tokenizer.sentinel_ids if stop_ids is None else stop_ids
        return TokenStream(self.model, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_ids=stops, valid_vocab=self.tokenizer.vocab_size, n=n)

    def generate(self, ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0, *,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = True) -> list[int]:
        """New token ids after ``ids`` with KV-cached decoding (greedy when temperature is 0).

        Generation ends at a special token (EOS, a FIM sentinel) unless ``stop_at_eos`` is false;
        the stop token is included in the result.
        """
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stream = self.stream_ids(ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                 stop_ids=None if stop_at_eos else frozenset())
        return [step[0] for step in stream if step[0] is not None]
