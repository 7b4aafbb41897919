"""Engine: load a model once, then score, generate and complete with it.

The one API that every front end (cli, repl, server) calls.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from santacli import fim, hub, native, weights
from santacli.completion import CompletionOptions, CompletionResult, ResultStream
from santacli.config import ModelConfig
from santacli.errors import CheckpointError, UsageError
from santacli.generate import SamplingParams, TokenStream
from santacli.model import GPTBigCode, KVCache, select_backend
from santacli.promptcache import PromptCache
from santacli.quantize import check_quantization, int8_embedding, int8_linear
from santacli.tokenizer import Tokenizer


@dataclass(frozen=True)
class LoadInfo:
    """What was loaded and how."""

    name: str
    folder: Path
    device: str
    dtype: str
    attention: str
    quantize: str
    decode: str  # "native (avx512 ...)" or "pytorch (...why)"
    load_seconds: float


class Engine:
    """A loaded model and its tokenizer."""

    def __init__(self, model: GPTBigCode, tokenizer: Tokenizer, info: LoadInfo) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.config: ModelConfig = model.config
        self.prompt_cache = PromptCache()

    @classmethod
    def load(cls, model: str, *, device: str | None = None, dtype: str | None = None,
             attention: str = "auto", quantize: str | None = None, decode: str = "auto",
             allow_download: bool = True) -> Engine:
        """Load a model by folder, alias or hub id.

        Args:
            model: a folder with config.json + safetensors + tokenizer.json, an alias from
                ``santa models`` or a hub id such as ``bigcode/gpt_bigcode-santacoder``.
            device: ``cpu``, ``cuda``, ``cuda:N`` or None/``auto``.
            dtype: ``float32``, ``bfloat16``, ``float16`` or None/``auto`` (fp32 on CPU, bf16 on CUDA).
            attention: ``auto``, ``flash``, ``sdpa`` or ``eager``.
            quantize: None/``none`` or ``int8`` (CPU: int8 weights, per-channel scales).
            decode: ``auto`` (the native CPU step where it builds, else PyTorch), ``native`` (an
                error where it cannot run) or ``pytorch``.

        Raises:
            ModelNotFoundError, ConfigError, CheckpointError, BackendError.
        """
        started = time.perf_counter()
        dev = weights.choose_device(device)
        torch_dtype = weights.choose_dtype(dtype, dev)
        backend = select_backend(attention, dev, torch_dtype)
        quant = check_quantization(quantize, dev, torch_dtype)
        native.check_decode(decode, dev)
        folder = hub.resolve_model(model, allow_download=allow_download)
        config = ModelConfig.from_file(folder / "config.json")
        tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
        if tokenizer.vocab_size > config.vocab_size:
            raise CheckpointError(
                f"{folder}: tokenizer has {tokenizer.vocab_size} tokens but the model only "
                f"{config.vocab_size} embeddings; tokenizer.json does not belong to this model"
            )
        int8 = quant == "int8"
        net = weights.load_model(folder, config, device=dev, dtype=torch_dtype, backend=backend,
                                 convert_linear=int8_linear if int8 else None,
                                 tied_embedding=int8_embedding if int8 else None)
        decode_desc = native.attach(net, decode)
        info = LoadInfo(name=model, folder=folder, device=str(dev), dtype=str(torch_dtype).removeprefix("torch."),
                        attention=backend, quantize=quant, decode=decode_desc,
                        load_seconds=time.perf_counter() - started)
        return cls(net, tokenizer, info)

    @property
    def device(self) -> torch.device:
        return self.model.device

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
                   n: int = 1, stop_ids: frozenset[int] | None = None,
                   use_prompt_cache: bool = False) -> TokenStream:
        """A KV-cached token stream for ``n`` candidates sharing one prefill.

        With ``use_prompt_cache`` the stream starts from the warm cache entry that shares the
        longest token prefix with ``ids``; hand it back with :meth:`keep_prompt` when done.
        """
        self._check_ids(ids)
        stops = self.tokenizer.sentinel_ids if stop_ids is None else stop_ids
        needed = len(ids) + max_new_tokens
        cache, reuse = None, 0
        if use_prompt_cache and needed <= self.config.n_positions:
            cache, reuse = self.prompt_cache.take(ids, batch=n, max_len=needed)
            if cache is None:
                cache = self.new_cache(batch=n, needed=needed)
        return TokenStream(self.model, ids, max_new_tokens=max_new_tokens, sampling=sampling,
                           stop_ids=stops, valid_vocab=self.tokenizer.vocab_size, n=n, cache=cache, reuse=reuse)

    def keep_prompt(self, stream: TokenStream) -> None:
        """Offer a stream's KV cache to the warm prompt cache (its prompt positions stay valid)."""
        self.prompt_cache.put(stream.prompt_ids, stream.cache)

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

    # -- text level ---------------------------------------------------------------------------

    def build_prompt(self, prefix: str, suffix: str, opts: CompletionOptions) -> fim.Prompt:
        """The token-exact, budgeted prompt for ``prefix``/``suffix`` (see :mod:`santacli.fim`)."""
        tok = self.tokenizer
        use_name = opts.use_filename and tok.filename_id is not None and bool(opts.filename)
        return fim.build_prompt(
            tok.encode, prefix=prefix, suffix=suffix, fim=tok.fim, fim_mode=opts.fim_mode,
            n_positions=self.config.n_positions, max_tokens=opts.max_tokens,
            filename_id=tok.filename_id if use_name else None, filename=opts.filename if use_name else None,
        )

    def infill(self, prefix: str, suffix: str, options: CompletionOptions | None = None,
               **overrides: object) -> CompletionStream:
        """Fill in the middle between ``prefix`` and ``suffix``.

        Iterate the returned stream for text chunks of the first candidate as they arrive; its
        ``result`` holds every candidate and the stats. Options come from ``options`` and/or
        keyword overrides (``max_tokens=32, mode="line"`` ...).

        Raises:
            UsageError, ContextLengthError: invalid options or no room for the prompt.
        """
        opts = replace(options or CompletionOptions(), **overrides)  # type: ignore[arg-type]
        mode = fim.choose_mode(opts.mode, prefix, suffix)
        prompt = self.build_prompt(prefix, suffix, opts)
        return CompletionStream(self, prompt, mode, opts)

    def complete(self, prefix: str, options: CompletionOptions | None = None,
                 **overrides: object) -> CompletionStream:
        """Continue ``prefix`` left to right (an infill with an empty suffix)."""
        return self.infill(prefix, "", options, **overrides)

    def new_cache(self, *, batch: int, needed: int) -> KVCache:
        """A KV cache for ``batch`` rows. It spans the whole context when that is cheap, so a
        later, longer request can reuse it; otherwise exactly what this request needs."""
        per_position = self.model.new_cache(batch=batch, max_len=1).nbytes()
        whole = per_position * self.config.n_positions <= 256 * 2**20
        return self.model.new_cache(batch=batch, max_len=self.config.n_positions if whole else needed)


def describe_model(model: str, *, device: str | None = None, dtype: str | None = None,
                   attention: str = "auto") -> dict[str, str]:
    """Facts about a model without loading its weights (``santa info``)."""
    folder = hub.resolve_model(model, allow_download=False)
    config = ModelConfig.from_file(folder / "config.json")
    tok = Tokenizer.from_file(folder / "tokenizer.json")
    dev = weights.choose_device(device)
    torch_dtype = weights.choose_dtype(dtype, dev)
    fim_desc = "none (left-to-right completion only)"
    if tok.fim is not None:
        fim_desc = (f"{tok.fim.family} (prefix {tok.fim.prefix}, middle {tok.fim.middle}, "
                    f"suffix {tok.fim.suffix}, pad {tok.fim.pad})")
    params = config.num_parameters
    return {
        "model": model,
        "folder": str(folder),
        "architecture": (f"gpt_bigcode, {'multi-query' if config.multi_query else 'multi-head'} attention"
                         + (" (original santacoder layout)" if config.original_santacoder_layout else "")),
        "layers": str(config.n_layer),
        "hidden size": f"{config.n_embd} (MLP {config.inner_dim}, {config.activation_function})",
        "heads": f"{config.n_head} x {config.head_dim}",
        "parameters": f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M",
        "context": f"{config.n_positions} tokens",
        "vocabulary": f"{tok.vocab_size} tokens ({config.vocab_size} embedding rows)",
        "eos": str(tok.eos_id),
        "fim sentinels": fim_desc,
        "filename metadata": "yes (<filename>)" if tok.filename_id is not None else "no",
        "weights on disk": f"{hub.weights_size(folder) / 1e6:.1f} MB",
        "device": str(dev),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "attention": select_backend(attention, dev, torch_dtype),
        "decode": native.describe(dev),
    }


# ---------------------------------------------------------------------------------------------
# Text completion


class CompletionStream(ResultStream):
    """A completion computed by a local :class:`Engine`."""

    def __init__(self, engine: Engine, prompt: fim.Prompt, mode: str, opts: CompletionOptions) -> None:
        super().__init__()
        self._engine = engine
        self._prompt = prompt
        self._mode = mode
        self._opts = opts

    def __iter__(self) -> Iterator[str]:
        if self._result is not None:
            return
        engine, prompt, opts = self._engine, self._prompt, self._opts
        started = time.perf_counter()
        tok = engine.tokenizer
        sampling = SamplingParams(opts.temperature, opts.top_k, opts.top_p, opts.seed)
        stream = engine.stream_ids(prompt.ids, max_new_tokens=opts.max_tokens, sampling=sampling, n=opts.n,
                                   use_prompt_cache=True)
        suffix = prompt.suffix if prompt.fim else ""
        filters = [fim.CompletionFilter(self._mode, prefix=prompt.prefix, suffix=suffix, stops=opts.stop)
                   for _ in range(opts.n)]
        decoders = [tok.stream() for _ in range(opts.n)]
        reasons: list[str | None] = [None] * opts.n
        first_token_at: float | None = None
        try:
            for step in stream:
                if first_token_at is None:
                    first_token_at = time.perf_counter()
                for row, token in enumerate(step):
                    if token is None or reasons[row]:
                        continue
                    if token in tok.sentinel_ids:
                        reasons[row] = "eos"
                        piece = filters[row].feed(decoders[row].flush())
                    else:
                        piece = filters[row].feed(decoders[row].push(token))
                    if filters[row].stopped:
                        reasons[row] = filters[row].stopped
                        stream.stop_row(row)
                    if row == 0 and piece:
                        yield piece
                if self.cancelled:
                    reasons = [r or "cancelled" for r in reasons]
                    break
        finally:
            engine.keep_prompt(stream)
        texts = []
        for row in range(opts.n):
            if reasons[row] is None:
                reasons[row] = "max_tokens"
                piece = filters[row].feed(decoders[row].flush())
                if row == 0 and piece:
                    yield piece
                if filters[row].stopped:
                    reasons[row] = filters[row].stopped
            rest = filters[row].finish(ended_by_rule=reasons[row] != "eos")
            if row == 0 and rest:
                yield rest
            texts.append(filters[row].text)
        done = time.perf_counter()
        first = first_token_at or done
        generated = stream.generated
        self._result = CompletionResult(
            text=texts[0], candidates=texts, stop_reasons=[r or "max_tokens" for r in reasons],
            mode=self._mode, fim=prompt.fim, fim_mode=opts.fim_mode, prompt_tokens=len(prompt.ids),
            reused_prompt_tokens=stream.reused, generated_tokens=generated,
            time_to_first_token=first - started,
            tokens_per_second=(generated - 1) / (done - first) if generated > 1 and done > first else 0.0,
            elapsed=done - started, truncation=prompt.truncation, model=engine.info.name,
        )

