"""Weight quantization for CPU inference.

``int8``: every linear layer stores int8 weights with one fp32 scale per output channel
(symmetric, absmax/127); the tied lm_head is quantized too and the token embedding reads its
rows (Int8Embedding); the position embedding stays fp32.
One copy of those weights serves both phases:

* prompts (compute-bound) quantize their activations per token to int8 (absmax/127, round half
  to even) and multiply with an int8 GEMM; which one (santa's native kernel, PyTorch's
  ``torch._int_mm`` or the BLAS GEMM on the int8 values) is measured per CPU by
  prompt_gemm.py. Every one computes the same exact int32 sums;
* one-token decode steps (memory-bound, a quarter of fp32's bytes) run in the native kernel
  (native.py), which quantizes each token's activations the same way, so its int32 sums equal
  the prompt path's. Without the native kernel, decode steps take the prompt path too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from santacli.errors import BackendError

QUANTIZATIONS = ("none", "int8")
# Quantize ~2 MB of fp32 rows at a time: the temporaries stay small and are reused, where
# tens of MB each fragmented the malloc heap and left hundreds of MB of peak RSS behind.
_CHUNK_BYTES = 2 << 20


def check_quantization(mode: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """Validate a ``--quantize`` request before any weights are loaded."""
    mode = mode or "none"
    if mode not in QUANTIZATIONS:
        raise BackendError(f"unknown quantization {mode!r}; choose {' or '.join(QUANTIZATIONS)}")
    if mode == "int8":
        if device.type != "cpu":
            raise BackendError("--quantize int8 runs on the CPU; on CUDA use --dtype bfloat16")
        if dtype != torch.float32:
            raise BackendError("--quantize int8 keeps float32 activations; drop --dtype (or use --dtype float32)")
    return mode


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(int8 weight, fp32 scale per row, int32 sum of each int8 row) with
    ``weight ≈ q * scale[:, None]``. The row sums serve the native kernel (see Int8Linear)."""
    rows = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    row_sum = torch.empty(rows, dtype=torch.int32)
    step = max(1, _CHUNK_BYTES // (4 * max(1, weight.shape[1])))
    for start in range(0, rows, step):
        end = start + step
        chunk = weight[start:end].float()
        s = chunk.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q[start:end] = torch.round(chunk / s[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[start:end] = s
        row_sum[start:end] = q[start:end].sum(dim=1, dtype=torch.int32)
    return q, scale, row_sum


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 rows, fp32 scale per row (M, 1)) of fp32 ``x`` (M, K): absmax/127 per row, round half
    to even; all-zero rows get a harmless scale. The native kernel's quantize_row does the same."""
    x_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return (x / x_scale).round_().to(torch.int8), x_scale


def _finish(sums: Tensor, x_scale: Tensor, layer: Int8Linear) -> Tensor:
    """fp32 outputs from exact sums, in place and in the native kernel's order
    ((sum * x_scale) * scale + bias): prompt-sized temporaries are tens of MB each."""
    y = sums.float().mul_(x_scale).mul_(layer.scale)
    if layer.bias is not None:
        y.add_(layer.bias)
    return y


def torch_int_mm_gemm(layer: Int8Linear, x: Tensor) -> Tensor:
    """``torch._int_mm`` (oneDNN): fast on CPUs with VNNI. Without VNNI PyTorch may run a slow
    reference loop, or oneDNN's AVX2 kernel, whose 16-bit pair sums saturate: prompt_gemm.py
    checks exactness before it ever picks this."""
    xq, x_scale = quantize_activations(x)
    return _finish(torch._int_mm(xq, layer.weight.t()), x_scale, layer)


# fp32 holds every integer up to 2^24 exactly: K-chunks of 1,024 products of |q| <= 127 stay
# below it (1024 * 127^2 < 2^24), so each chunk's sums from the BLAS GEMM are exact.
_EXACT_CHUNK = 1024
_TILE_ROWS = 1024  # weight rows widened at a time: 4 MB of fp32 per chunk


def blas_gemm(layer: Int8Linear, x: Tensor) -> Tensor:
    """The int8 values as fp32 through the BLAS GEMM, in K-chunks short enough to stay exact
    (chunk sums added in fp64, exact too): needs no VNNI and no compiler."""
    xq, x_scale = quantize_activations(x)
    xf = xq.float()
    K, N = layer.in_features, layer.out_features
    sums = torch.zeros((x.shape[0], N), dtype=torch.float64)
    buf = torch.empty((min(N, _TILE_ROWS), min(K, _EXACT_CHUNK)), dtype=torch.float32)
    for n0 in range(0, N, _TILE_ROWS):
        n1 = min(N, n0 + _TILE_ROWS)
        for k0 in range(0, K, _EXACT_CHUNK):
            k1 = min(K, k0 + _EXACT_CHUNK)
            w = buf[: n1 - n0, : k1 - k0]
            w.copy_(layer.weight[n0:n1, k0:k1])
            sums[:, n0:n1] += xf[:, k0:k1] @ w.t()
    return _finish(sums, x_scale, layer)


Int8Gemm = Callable[["Int8Linear", Tensor], Tensor]
RowQuantizer = Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
GEMMS: dict[str, Int8Gemm] = {"torch": torch_int_mm_gemm, "blas": blas_gemm}


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (rows = output channels) and per-row fp32 scales."""

    weight: Tensor  # (out, in) int8
    scale: Tensor  # (out,) fp32
    row_sum: Tensor  # (out,) int32: the VNNI kernel feeds activations offset by +128 and subtracts 128 * this
    bias: Tensor | None  # (out,) fp32
    gemm: Int8Gemm  # how prompt passes multiply (prompt_gemm.py chooses one per CPU at load)

    def __init__(self, weight: Tensor, scale: Tensor, row_sum: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.gemm = blas_gemm
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)
        self.register_buffer("row_sum", row_sum)
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, quantizer: RowQuantizer | None = None) -> Int8Linear:
        q, scale, row_sum = (quantizer or quantize_rows)(linear.weight.detach())
        bias = None if linear.bias is None else linear.bias.detach().float().clone()
        return cls(q, scale, row_sum, bias)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = self.gemm(self, x.reshape(-1, self.in_features).float())
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row scales"


class Int8Embedding(nn.Module):
    """The embedding of an int8 model: the rows of its tied int8 lm_head (``q[id] * scale[id]``).

    Tied like the float model's wte/lm_head, so no float copy of the vocabulary matrix is kept
    (SantaCoder: 0.4 GB of fp32 saved, a quarter of the int8 model)."""

    weight: Tensor
    scale: Tensor

    def __init__(self, head: Int8Linear) -> None:
        super().__init__()
        self.register_buffer("weight", head.weight)
        self.register_buffer("scale", head.scale)

    def forward(self, ids: Tensor) -> Tensor:
        return self.weight[ids].float() * self.scale[ids].unsqueeze(-1)


def int8_linear(linear: nn.Linear, quantizer: RowQuantizer | None = None) -> nn.Module:
    """``linear`` with int8 weights and per-output-channel scales (``quantizer``: another
    implementation of :func:`quantize_rows`, e.g. native.quantize_rows)."""
    return Int8Linear.from_linear(linear, quantizer)


def int8_embedding(head: nn.Module) -> nn.Module:
    """The token embedding that reads the rows of ``head`` (an :class:`Int8Linear` lm_head)."""
    if not isinstance(head, Int8Linear):
        raise TypeError(f"expected an Int8Linear head, got {type(head).__name__}")
    return Int8Embedding(head)
