"""Load a model folder's safetensors into a GPTBigCode; choose the device and dtype.

Loading is strict: every expected tensor must be present with the right shape, and nothing
unknown may be left over. Finding the folder is hub.py's job, reading the files tensorfile.py's.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

from santacli import hub
from santacli.config import ModelConfig
from santacli.errors import BackendError, CheckpointError
from santacli.model import GPTBigCode
from santacli.tensorfile import TensorFiles

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Buffers that old GPT-2 style checkpoints carry; they hold no weights.
_IGNORED_KEY = re.compile(r"\.attn\.(masked_bias|bias)$")


# ---------------------------------------------------------------------------------------------
# Reading tensors


def _convert_original_santacoder(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """bigcode/santacoder's layout: Conv1D (in, out) weights and split q_attn / kv_attn."""
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        if ".attn.q_attn." in key or ".attn.kv_attn." in key:
            continue
        transposed = key.endswith(("attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))
        out[key] = t.t().contiguous() if transposed else t
    prefixes = {k.rsplit(".q_attn.", 1)[0] for k in tensors if ".attn.q_attn." in k}
    for p in sorted(prefixes):
        try:
            q_w, kv_w = tensors[f"{p}.q_attn.weight"], tensors[f"{p}.kv_attn.weight"]
            q_b, kv_b = tensors[f"{p}.q_attn.bias"], tensors[f"{p}.kv_attn.bias"]
        except KeyError as exc:
            raise CheckpointError(f"original santacoder checkpoint is missing {exc.args[0]}") from None
        out[f"{p}.c_attn.weight"] = torch.cat([q_w.t(), kv_w.t()], dim=0)
        out[f"{p}.c_attn.bias"] = torch.cat([q_b, kv_b], dim=0)
    return out


def _describe(keys: list[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


# ---------------------------------------------------------------------------------------------
# Device and dtype


def choose_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise BackendError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("--device cuda was asked for, but no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise BackendError(f"device {device!r} is not supported; use cpu or cuda")
    return dev


def choose_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: fp32 on CPU (no fast 16-bit matmul there), bf16 on CUDA where supported."""
    if dtype in (None, "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


# ---------------------------------------------------------------------------------------------
# Loading


def _check_names_and_shapes(folder: Path, expected: dict[str, tuple[int, ...]],
                            shapes: dict[str, tuple[int, ...]]) -> None:
    """One error listing every missing, unexpected and mis-shaped tensor."""
    shapes = dict(shapes)
    head_shape = shapes.pop("lm_head.weight", None)  # tied to wte: checked, never loaded
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    misshaped = sorted(f"{k} {shapes[k]} != {expected[k]}"
                       for k in set(shapes) & set(expected) if shapes[k] != expected[k])
    if head_shape is not None and head_shape != expected["transformer.wte.weight"]:
        misshaped.append(f"lm_head.weight {head_shape} != {expected['transformer.wte.weight']}")
    problems = [f"{label}: {_describe(keys)}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped)) if keys]
    if problems:
        raise CheckpointError(f"{folder}: checkpoint does not match config.json; " + "; ".join(problems))


def load_model(folder: Path, config: ModelConfig, *, device: torch.device, dtype: torch.dtype,
               backend: str) -> GPTBigCode:
    """Build the model on the meta device and fill it tensor by tensor from safetensors.

    Names and shapes are checked against the config before any weights are read. Each tensor
    is then read into owned memory and converted to ``dtype`` on ``device`` before the next one
    is read, so the peak is the loaded model plus one tensor (see tensorfile.py).

    Raises:
        CheckpointError: missing, unexpected, mis-shaped, non-float or corrupted tensors.
    """
    files = hub.weight_files(folder)
    with torch.device("meta"):
        model = GPTBigCode(config, backend=backend)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    source = TensorFiles(files)
    names = {k: k for k in source.entries if not _IGNORED_KEY.search(k)}
    if names and not any(k.startswith("transformer.") for k in names):
        names = {f"transformer.{k}": k for k in names}  # saved from the base model
    non_float = sorted(k for k, v in names.items() if not source.entries[v].is_float)
    if non_float:
        raise CheckpointError(f"{folder}: tensors must be floating point: {_describe(non_float)}")
    converted: dict[str, Tensor] = {}
    if config.original_santacoder_layout:
        # Rare and small: convert in memory, then check the converted names.
        converted = _convert_original_santacoder({k: source.read(v) for k, v in names.items()})
        shapes = {k: tuple(v.shape) for k, v in converted.items()}
    else:
        shapes = {k: source.entries[v].shape for k, v in names.items()}
    _check_names_and_shapes(folder, expected, shapes)
    state = {}
    for key in expected:
        if converted:
            state[key] = converted.pop(key).to(device=device, dtype=dtype)
        else:
            state[key] = source.read(names[key], dtype=dtype, device=device)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.eval().requires_grad_(False)
    return model
