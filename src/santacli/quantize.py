"""Weight quantization for CPU inference.

``int8``: every linear layer (the tied lm_head included, as its own int8 copy; the embedding
stays float) gets int8 weights with per-output-channel scales, and its activations are quantized
per call (PyTorch's dynamic int8 Linear on fbgemm). On a memory-bound decode step that reads a
quarter of fp32's bytes, and its int8 GEMM is also faster than fp32 for prompts.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from santacli.errors import BackendError

QUANTIZATIONS = ("none", "int8")


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
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            raise BackendError("this PyTorch build has no fbgemm int8 kernels; --quantize int8 is unavailable")
    return mode


def int8_linear(linear: nn.Linear) -> nn.Module:
    """``linear`` as a dynamic int8 Linear: int8 weights with per-output-channel scales."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    torch.backends.quantized.engine = "fbgemm"
    linear.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]
    with warnings.catch_warnings():
        # torch.ao's eager quantization is deprecated in favour of torchao, yet it is the only
        # int8 CPU matmul in core PyTorch; silence the notice rather than the user's terminal.
        warnings.simplefilter("ignore")
        return DynamicInt8Linear.from_float(linear)
