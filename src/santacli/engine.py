"""Engine: load a model once, then score, generate and complete with it.

It is the local :class:`~santacli.completion.CompletionEngine`: completions go through the text
loop of :mod:`santacli.completion`, fed by a token source over the model that also keeps the
warm prompt cache.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import replace

import torch
from torch import Tensor

from santacli import fim, hub, native, prompt_gemm, weights
from santacli.completion import (
    CompletionOptions,
    CompletionRun,
    LoadInfo,
    TokenEvent,
    layout_prompt,
    raw_prompt,
)
from santacli.config import ModelConfig
from santacli.cores import CoreMeter
from santacli.errors import CheckpointError, UsageError
from santacli.generate import AUTO_MIN_STEP_BYTES, TokenStream, describe_speculation
from santacli.model import GPTBigCode, KVCache, select_backend
from santacli.promptcache import PromptCache
from santacli.quantize import check_quantization, int8_embedding, int8_linear
from santacli.sampling import SamplingParams
from santacli.speculate import parse_speculate
from santacli.tokenizer import Tokenizer


class Engine:
    """A loaded model and its tokenizer."""

    def __init__(self, model: GPTBigCode, tokenizer: Tokenizer, info: LoadInfo, *,
                 cores: CoreMeter | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.info = info
        self.config: ModelConfig = model.config
        self.prompt_cache = PromptCache()
        # Decoding threads: None counts the cores other processes leave free before each
        # completion (at most torch's own count), so a busy core never stalls every step.
        self.threads: int | None = None
        self._max_threads = torch.get_num_threads()
        self._cores = cores or CoreMeter()

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
        cores = CoreMeter()
        cores.start()  # the first completion compares against this count: no wait for a sample
        dev = weights.choose_device(device)
        torch_dtype = weights.choose_dtype(dtype, dev)
        backend = select_backend(attention, dev, torch_dtype)
        quant = check_quantization(quantize, dev, torch_dtype)
        if quant == "int8":
            prompt_gemm.requested()  # a bad SANTA_INT8_GEMM fails before any weights are read
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
                                 convert_linear=functools.partial(int8_linear, quantizer=native.quantize_rows)
                                 if int8 else None,
                                 tied_embedding=int8_embedding if int8 else None)
        decode_desc = native.attach(net, decode)
        prompt_desc = prompt_gemm.choose_for_model(net) if int8 else prompt_gemm.describe_float(dev, torch_dtype)
        info = LoadInfo(name=model, folder=folder, device=str(dev), dtype=str(torch_dtype).removeprefix("torch."),
                        attention=backend, quantize=quant, decode=decode_desc,
                        load_seconds=time.perf_counter() - started, context_length=config.n_positions,
                        prompt=prompt_desc)
        return cls(net, tokenizer, info, cores=cores)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def name(self) -> str:
        return self.info.name

    def decode_threads(self) -> int:
        """How many threads the next completion decodes with (see :attr:`threads`)."""
        if self.threads is not None:
            return max(1, self.threads)
        return max(1, min(self._max_threads, self._cores.free()))

    def prompt_scope(self, scope: str) -> AbstractContextManager[None]:
        """Completions run within this block reuse only warm prompts of ``scope`` (the server's
        client identity), so no client learns anything of another's text."""
        return self.prompt_cache.scoped(scope)

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
        logits: Tensor = self.model(x)[0]
        return logits.float()

    def stream_ids(self, ids: list[int], *, max_new_tokens: int, sampling: SamplingParams,
                   n: int = 1, stop_ids: frozenset[int] | None = None,
                   use_prompt_cache: bool = False, speculate: str = "off") -> TokenStream:
        """A KV-cached token stream for ``n`` candidates sharing one prefill.

        With ``use_prompt_cache`` the stream starts from the warm cache entry that shares the
        longest token prefix with ``ids``; :class:`_ModelTokens` hands it back when done.
        ``speculate`` (``auto``, ``off`` or N) verifies prompt-lookup drafts, several tokens per
        model step, with the same output (see :func:`santacli.generate.draft_cap`); off by
        default here, so that token-level callers measure plain steps.
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
                           stop_ids=stops, valid_vocab=self.tokenizer.vocab_size, n=n, cache=cache, reuse=reuse,
                           speculate=speculate)

    def generate(self, ids: list[int], max_new_tokens: int = 32, temperature: float = 0.0, *,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop_at_eos: bool = True, speculate: str = "off") -> list[int]:
        """New token ids after ``ids`` with KV-cached decoding (greedy when temperature is 0).

        Generation ends at a special token (EOS, a FIM sentinel) unless ``stop_at_eos`` is false;
        the stop token is included in the result. ``speculate`` as in :meth:`stream_ids`.
        """
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        stream = self.stream_ids(ids, max_new_tokens=max_new_tokens, sampling=sampling,
                                 stop_ids=None if stop_at_eos else frozenset(), speculate=speculate)
        return [step[0] for step in stream if step[0] is not None]

    def describe_speculation(self, speculate: str = "auto") -> str:
        """Whether greedy completions speculate with this ``speculate`` value, and why
        (``santa info``). Raises UsageError for an invalid value."""
        return describe_speculation(speculate, self.model)

    # -- text level ---------------------------------------------------------------------------

    def build_prompt(self, prefix: str, suffix: str, opts: CompletionOptions) -> fim.Prompt:
        """The token-exact, budgeted prompt for ``prefix``/``suffix`` (see :mod:`santacli.fim`)."""
        return layout_prompt(self.tokenizer, self.config.n_positions, prefix, suffix, opts)

    def infill(self, prefix: str, suffix: str, options: CompletionOptions | None = None,
               **overrides: object) -> CompletionRun:
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
        return CompletionRun(lambda: _ModelTokens(self, prompt.ids, opts), prompt=prompt, mode=mode,
                             options=opts, model=self.name, tokenizer=self.tokenizer)

    def complete(self, prefix: str, options: CompletionOptions | None = None,
                 **overrides: object) -> CompletionRun:
        """Continue ``prefix`` left to right (an infill with an empty suffix)."""
        return self.infill(prefix, "", options, **overrides)

    def generate_text(self, text: str, options: CompletionOptions, *, include_stop: bool = False,
                      truncate: int | None = None) -> CompletionRun:
        """Continue a raw prompt as TGI/OpenAI clients send it: spelled-out control tokens
        (``<fim-prefix>``...) count as such, only ``options.stop`` strings end the text, and
        nothing is post-processed. ``truncate`` keeps the prompt's last tokens.

        Raises:
            UsageError, ContextLengthError: an empty prompt or no room for it.
        """
        ids = self.tokenizer.encode_raw(text)
        if truncate is not None and len(ids) > truncate:
            ids = ids[-truncate:]
        if not ids:
            raise UsageError("the prompt is empty")
        prompt = raw_prompt(ids, text)
        return CompletionRun(lambda: _ModelTokens(self, ids, options), prompt=prompt, mode="raw",
                             options=options, model=self.name, tokenizer=self.tokenizer,
                             include_stop=include_stop)

    def new_cache(self, *, batch: int, needed: int) -> KVCache:
        """A KV cache for ``batch`` rows. It spans the whole context when that is cheap, so a
        later, longer request can reuse it; otherwise exactly what this request needs."""
        per_position = self.model.new_cache(batch=batch, max_len=1).nbytes()
        whole = per_position * self.config.n_positions <= 256 * 2**20
        return self.model.new_cache(batch=batch, max_len=self.config.n_positions if whole else needed)


def describe_model(model: str, *, device: str | None = None, dtype: str | None = None,
                   attention: str = "auto", quantize: str | None = None, speculate: str = "auto") -> dict[str, str]:
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
        "prompt": (prompt_gemm.choose(config.n_embd, config.inner_dim).description
                   if quantize == "int8" and dev.type == "cpu" else prompt_gemm.describe_float(dev, torch_dtype)),
        "decode": native.describe(dev),
        "speculation": _describe_speculation(speculate, config, dev, torch_dtype, quantize),
    }


def _describe_speculation(speculate: str, config: ModelConfig, dev: torch.device, dtype: torch.dtype,
                          quantize: str | None) -> str:
    """What ``speculate`` would do for greedy completions, from the config alone (see
    :func:`santacli.generate.draft_cap`, which decides with the loaded model)."""
    requested = parse_speculate(speculate)
    if requested == 0:
        return "off"
    if requested is not None:
        return f"on for greedy single-candidate completions: prompt-lookup drafts of up to {requested} tokens"
    per_param = 1 if quantize == "int8" else torch.finfo(dtype).bits // 8
    step = config.num_parameters * per_param
    if dev.type != "cpu" or not native.status().available:
        return "off (auto: only the native CPU step verifies drafts bit-exactly; ask with a number)"
    if step < AUTO_MIN_STEP_BYTES:
        return (f"off (auto: {step / 2**20:.0f} MiB of weights per step fit the CPU caches, so drafts would "
                "not pay; ask with a number)")
    return f"on for greedy single-candidate completions (auto: {step / 2**20:.0f} MiB of weights per step)"


# ---------------------------------------------------------------------------------------------
# The model as the text loop's token source


class _ModelTokens:
    """A :class:`~santacli.completion.TokenSource` over the engine's model. It starts from the
    warm prompt cache and gives its KV cache back to it when closed, so callers never do."""

    def __init__(self, engine: Engine, ids: list[int], opts: CompletionOptions) -> None:
        self._engine = engine
        if engine.device.type == "cpu":
            torch.set_num_threads(engine.decode_threads())
        self._stream = engine.stream_ids(ids, max_new_tokens=opts.max_tokens, sampling=opts.sampling, n=opts.n,
                                         use_prompt_cache=True, speculate=opts.speculate)
        self._prefilled = False

    def __iter__(self) -> Iterator[TokenEvent]:
        for step in self._stream:
            self._prefilled = True
            for row, token in enumerate(step):
                if token is not None:
                    yield row, token, None

    def stop_row(self, row: int) -> None:
        self._stream.stop_row(row)

    @property
    def reused_prompt_tokens(self) -> int:
        return self._stream.reused

    @property
    def drafted_tokens(self) -> int:
        """Tokens proposed by speculative drafting (read by the text loop for its result)."""
        return self._stream.drafted

    @property
    def accepted_tokens(self) -> int:
        """Drafted tokens the model confirmed and the stream yielded."""
        return self._stream.accepted

    def close(self) -> None:
        # Only a finished prefill leaves the prompt's positions valid for the next request.
        if self._prefilled:
            self._engine.prompt_cache.put(self._stream.prompt_ids, self._stream.cache)
