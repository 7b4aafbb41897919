"""GPTBigCode in plain PyTorch: modules, the KV cache and the attention backends.

Pure compute: no I/O, no tokenizer, no hub. Module names copy the checkpoint's keys
(``transformer.h.{i}.attn.c_attn`` ...) so loading is a name-for-name copy.

Shapes: B batch, T new tokens, S attended positions (cache + new), nh query heads, kvh key/value
heads (1 for multi-query), g = nh // kvh query heads per key/value head, hd head size.
"""

from __future__ import annotations

import importlib.util
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from santacli.config import ModelConfig
from santacli.errors import BackendError, ContextLengthError

BACKENDS = ("auto", "flash", "sdpa", "eager")


def _gelu_tanh_formula(x: Tensor) -> Tensor:
    # gelu_new / gelu_fast in HF spell the tanh approximation out; keep their exact arithmetic.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _gelu_fast(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": _gelu_tanh_formula,
    "gelu_fast": _gelu_fast,
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "tanh": torch.tanh,
}


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated key/value buffers, written in place at the decoding position.

    Keeps ``kvh`` heads (one for multi-query): the query heads broadcast over it, so no per-head
    copies exist. Buffers never change shape, so a compiled decode step stays valid.
    """

    def __init__(self, config: ModelConfig, *, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        shape = (config.n_layer, batch, config.kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions [0, length) hold valid keys/values for every row

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def broadcast_first_row(self) -> None:
        """Copy row 0's filled positions to every other row (n candidates share one prefill)."""
        n = self.length
        self.k[:, 1:, :, :n] = self.k[:, :1, :, :n]
        self.v[:, 1:, :, :n] = self.v[:, :1, :, :n]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


# ---------------------------------------------------------------------------------------------
# Attention backends. Each takes q (B, nh, T, hd), k/v (B, kvh, S, hd) where the new queries sit
# at positions [q_start, q_start + T) and keys cover [0, S); each returns (B, nh, T, hd).


@dataclass(frozen=True)
class AttentionMath:
    """The config's softmax rules for one layer."""

    scale: float  # 1/sqrt(hd) when scale_attn_weights, else 1
    softmax_in_fp32: bool
    unscale: float  # layer_idx + 1 when scale_attention_softmax_in_fp32, else 1


def _causal_mask(T: int, S: int, q_start: int, device: torch.device) -> Tensor:
    """(T, S) bool, True where query t (at position q_start + t) may attend key s."""
    rows = torch.arange(q_start, q_start + T, device=device).unsqueeze(1)
    return torch.arange(S, device=device).unsqueeze(0) <= rows


def _fold_heads(q: Tensor, kvh: int) -> Tensor:
    """(B, nh, T, hd) -> (B, kvh, g*T, hd): the g query heads that share a K/V head become rows."""
    B, nh, T, hd = q.shape
    return q.reshape(B, kvh, (nh // kvh) * T, hd)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, q_start: int, m: AttentionMath) -> Tensor:
    """The reference math, following GPTBigCode's softmax-in-fp32 scaling rules."""
    B, nh, T, hd = q.shape
    kvh, S = k.shape[1], k.shape[2]
    dtype = q.dtype
    upcast = m.softmax_in_fp32 and dtype != torch.float32
    unscale = m.unscale if upcast else 1.0
    softmax_dtype = torch.float32 if m.softmax_in_fp32 else dtype
    scores = torch.matmul(_fold_heads(q, kvh), k.transpose(-1, -2)) * (m.scale / unscale)
    scores = scores.to(softmax_dtype) * unscale  # (B, kvh, g*T, S)
    if T > 1 or q_start + T != S:
        mask = _causal_mask(T, S, q_start, q.device)
        scores = scores.view(B, kvh, nh // kvh, T, S).masked_fill(~mask, torch.finfo(softmax_dtype).min)
        scores = scores.view(B, kvh, -1, S)
    probs = torch.softmax(scores, dim=-1).to(dtype)
    return torch.matmul(probs, v).view(B, nh, T, hd)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, q_start: int, m: AttentionMath) -> Tensor:
    """torch's scaled_dot_product_attention; K/V heads are never copied per query head."""
    B, nh, T, hd = q.shape
    kvh, S = k.shape[1], k.shape[2]
    if T == 1 and q_start + 1 == S:
        # Decode step: every query head sees every cached position, so no mask at all; folding
        # the heads into rows of one matmul measured 3x faster than enable_gqa here.
        out = F.scaled_dot_product_attention(_fold_heads(q, kvh), k, v, scale=m.scale)
        return out.view(B, nh, T, hd)
    if q_start == 0 and S == T:
        # A fresh prompt: the causal kernel with K/V broadcast over heads (no copies, no mask)
        # measured 2x faster than folded heads with an explicit mask at 1,024 tokens.
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=m.scale, enable_gqa=kvh < nh)
    g = nh // kvh
    mask = _causal_mask(T, S, q_start, q.device).repeat(g, 1)  # (g*T, S)
    out = F.scaled_dot_product_attention(_fold_heads(q, kvh), k, v, attn_mask=mask, scale=m.scale)
    return out.view(B, nh, T, hd)


def flash_attention(q: Tensor, k: Tensor, v: Tensor, q_start: int, m: AttentionMath) -> Tensor:
    """flash-attn (CUDA, fp16/bf16). It handles kvh < nh natively; causal is bottom-right aligned."""
    from flash_attn import flash_attn_func  # imported lazily: optional, CUDA only

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                          softmax_scale=m.scale, causal=q.shape[2] > 1)
    return out.transpose(1, 2)


AttentionFn = Callable[[Tensor, Tensor, Tensor, int, AttentionMath], Tensor]
_BACKEND_FNS: dict[str, AttentionFn] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "flash": flash_attention,
}


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Choose the attention backend once, at load time.

    ``auto`` picks flash on CUDA with a 16-bit dtype when flash-attn is importable, else SDPA.
    Asking for flash where it cannot run is an error, never a silent fallback.
    """
    if requested not in BACKENDS:
        raise BackendError(f"unknown attention backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    half = dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        return "flash" if device.type == "cuda" and half and flash_available() else "sdpa"
    if requested == "flash":
        if device.type != "cuda":
            raise BackendError("--attention flash needs a CUDA device; use --attention sdpa on this machine")
        if not half:
            raise BackendError("--attention flash needs --dtype bfloat16 or float16")
        if not flash_available():
            raise BackendError("flash-attn is not installed; run: pip install 'santacli[flash]'")
    return requested


# ---------------------------------------------------------------------------------------------
# Modules

# CPUs without fast 16-bit matrix units run bf16/fp16 GEMMs slower than fp32 (1.6x at 512 x 2048
# x 8192 even with AVX512-BF16 here, ~7x without), so a prompt-sized pass of a 16-bit model on
# the CPU runs with fp32 activations and widens each weight for its product; K/V are still
# stored 16-bit. One-token decode steps stay 16-bit (memory-bound: half the bytes, twice the
# speed).
UPCAST_MIN_TOKENS = 8
_HALF = (torch.bfloat16, torch.float16)


_scratch = threading.local()


def _widen(weight: Tensor) -> Tensor:
    """``weight`` as fp32 in a reused per-thread buffer. A fresh tensor per call spent most of
    its time in page faults: 21 ms against 3.6 ms for an 8192 x 2048 bf16 matrix (2-core CPU)."""
    n = weight.numel()
    buf: Tensor | None = getattr(_scratch, "buffer", None)
    if buf is None or buf.numel() < n:
        buf = _scratch.buffer = torch.empty(n, dtype=torch.float32)
    return buf[:n].view(weight.shape).copy_(weight)


def project(layer: nn.Module, x: Tensor) -> Tensor:
    """Apply a linear layer; fp32 activations meet 16-bit weights in a CPU prompt pass."""
    weight = getattr(layer, "weight", None)
    if not (isinstance(weight, Tensor) and weight.dtype in _HALF and x.dtype == torch.float32):
        return layer(x)
    if x.shape[-2] < UPCAST_MIN_TOKENS:  # e.g. the prompt's last position through lm_head
        return cast(Tensor, layer(x.to(weight.dtype))).float()
    bias = getattr(layer, "bias", None)
    return F.linear(x, _widen(weight), bias.float() if isinstance(bias, Tensor) else None)


def norm(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm that also takes fp32 activations with 16-bit parameters (a CPU prompt pass)."""
    if ln.weight.dtype == x.dtype:
        return cast(Tensor, ln(x))
    return F.layer_norm(x, ln.normalized_shape, ln.weight.to(x.dtype), ln.bias.to(x.dtype), ln.eps)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.kv_heads = config.n_head, config.head_dim, config.kv_heads
        self.multi_query = config.multi_query
        d = config.n_embd
        self.c_attn = nn.Linear(d, d + 2 * self.kv_heads * self.head_dim)
        self.c_proj = nn.Linear(d, d)
        self.math = AttentionMath(
            scale=self.head_dim**-0.5 if config.scale_attn_weights else 1.0,
            softmax_in_fp32=config.attention_softmax_in_fp32,
            unscale=float(layer_idx + 1)
            if config.scale_attention_softmax_in_fp32 and config.attention_softmax_in_fp32 else 1.0,
        )

    def forward(self, x: Tensor, q_start: int, attend: AttentionFn,
                cache: tuple[Tensor, Tensor] | None) -> Tensor:
        B, T, d = x.shape
        nh, hd = self.n_head, self.head_dim
        qkv = project(self.c_attn, x)
        if self.multi_query:
            # Columns: [query (nh*hd) | key (hd) | value (hd)].
            q, k, v = qkv.split((d, hd, hd), dim=-1)
            q = q.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)
            k = k.view(B, 1, T, hd)  # T and the single head swap freely
            v = v.view(B, 1, T, hd)
        else:
            # Columns laid out per head as (nh, 3, hd), unlike GPT-2's (3, nh, hd).
            q, k, v = qkv.view(B, T, nh, 3 * hd).transpose(1, 2).split(hd, dim=-1)
        if cache is not None:
            cache_k, cache_v = cache  # (B, kvh, max_len, hd) views into the KVCache
            cache_k[:, :, q_start:q_start + T] = k
            cache_v[:, :, q_start:q_start + T] = v
            k = cache_k[:, :, : q_start + T].to(q.dtype)  # a copy only in a 16-bit prompt pass
            v = cache_v[:, :, : q_start + T].to(q.dtype)
        y = attend(q, k, v, q_start, self.math)  # (B, nh, T, hd)
        return project(self.c_proj, y.transpose(1, 2).reshape(B, T, d))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]

    def forward(self, x: Tensor) -> Tensor:
        return project(self.c_proj, self.act(project(self.c_fc, x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, q_start: int, attend: AttentionFn,
                cache: tuple[Tensor, Tensor] | None) -> Tensor:
        x = x + self.attn(norm(self.ln_1, x), q_start, attend, cache)
        return x + self.mlp(norm(self.ln_2, x))


class GPTBigCode(nn.Module):
    """GPTBigCodeForCausalLM: learned positions, pre-LN blocks, final ln_f, lm_head tied to wte."""

    def __init__(self, config: ModelConfig, *, backend: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        # Tied to wte. int8 loading quantizes this head and makes wte a view of its int8 rows
        # (quantize.Int8Embedding), so the tie survives quantization.
        self.lm_head: nn.Module = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.backend = backend
        # Cached decode steps may run elsewhere (native.NativeDecoder); set at load time. It takes
        # ids (B, T) at start_pos and returns fp32 logits (B, T, vocab).
        self.decoder: Callable[[Tensor, int, KVCache], Tensor] | None = None

    # Typed views of the checkpoint-named submodules (ModuleDict access is untyped).
    @property
    def wte(self) -> nn.Module:
        """nn.Embedding, or quantize.Int8Embedding in an int8 model; either has ``weight``."""
        return cast(nn.Module, self.transformer["wte"])

    @property
    def wpe(self) -> nn.Embedding:
        return cast(nn.Embedding, self.transformer["wpe"])

    @property
    def blocks(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.transformer["h"])

    @property
    def ln_f(self) -> nn.LayerNorm:
        return cast(nn.LayerNorm, self.transformer["ln_f"])

    @property
    def device(self) -> torch.device:
        return self.wpe.weight.device

    @property
    def compute_dtype(self) -> torch.dtype:
        """The activations' and KV cache's dtype (wpe is never quantized)."""
        return self.wpe.weight.dtype

    def tie_weights(self) -> None:
        self.lm_head.weight = self.wte.weight

    def step_bytes(self) -> int:
        """Bytes of weights a decode step reads: every parameter and buffer once (tied ones
        once), but only one row of wpe."""
        seen: set[int] = set()
        total = 0
        for t in [*self.parameters(), *self.buffers()]:
            if t.data_ptr() not in seen and t is not self.wpe.weight:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        if name not in _BACKEND_FNS:
            raise BackendError(f"unknown attention backend {name!r}; choose one of {', '.join(_BACKEND_FNS)}")
        self._backend = name
        self._attend = _BACKEND_FNS[name]

    def new_cache(self, *, batch: int = 1, max_len: int | None = None) -> KVCache:
        length = self.config.n_positions if max_len is None else min(max_len, self.config.n_positions)
        return KVCache(self.config, batch=batch, max_len=length, dtype=self.compute_dtype, device=self.device)

    def forward(self, input_ids: Tensor, *, start_pos: int = 0, cache: KVCache | None = None,
                last_only: bool = False, step: bool = False) -> Tensor:
        """Logits for ``input_ids`` (B, T) placed at positions [start_pos, start_pos + T).

        With a cache, keys/values are written into it (rows [0, B)) and earlier positions are
        attended; the caller advances ``cache.length`` (rolling back rejected positions is just
        advancing it less: later steps overwrite them before anything reads them). ``last_only``
        computes the vocabulary projection for the final position only, as decoding needs.
        ``step`` (with a cache) marks the T tokens as one decode step, a speculative draft being
        verified: they run like one-token steps (the native step when attached, 16-bit
        activations kept on the CPU), not like a prompt chunk.
        """
        B, T = input_ids.shape
        end = start_pos + T
        limit = cache.max_len if cache is not None else self.config.n_positions
        if end > limit:
            raise ContextLengthError(
                f"{end} tokens exceed the context length of this model ({limit} positions)"
            )
        if cache is not None and self.decoder is not None and (step or (T == 1 and last_only)):
            logits = self.decoder(input_ids, start_pos, cache)
            return logits[:, -1:] if last_only else logits
        # Learned positions: a slice of wpe, so no position tensor is built per step.
        x = self.wte(input_ids) + self.wpe.weight[start_pos:end]
        if x.dtype in _HALF and x.device.type == "cpu" and T >= UPCAST_MIN_TOKENS and not step:
            x = x.float()  # a prompt pass in fp32 activations (see UPCAST_MIN_TOKENS)
        for i, block in enumerate(self.blocks):
            layer_cache = (cache.k[i, :B], cache.v[i, :B]) if cache is not None else None
            x = block(x, start_pos, self._attend, layer_cache)
        if last_only:
            x = x[:, -1:]
        return project(self.lm_head, norm(self.ln_f, x))
