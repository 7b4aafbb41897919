"""Load a model folder's safetensors into a GPTBigCode; choose the device and dtype.

Loading is strict: every expected tensor must be present with the right shape, and nothing
unknown may be left over. Finding the folder is hub.py's job, reading the files tensorfile.py's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

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


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or None).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Give freed heap memory back to the OS. Converting layer by layer frees a float copy
    after each layer; the holes it leaves between the kept tensors are not returned by
    themselves, and peak RSS of an int8 load varied by 0.3 GB between identical runs."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


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


class _SkipInit(TorchFunctionMode):
    """Module constructors fill new weights with random values (``nn.init``). On the meta
    device that only costs time (seconds of one-time dispatch setup at every start), and the
    checkpoint overwrites the weights anyway: skip it."""

    _INIT = frozenset({nn.init.normal_, nn.init.uniform_, nn.init.kaiming_uniform_, nn.init.trunc_normal_,
                       nn.init.zeros_, nn.init.ones_, Tensor.normal_, Tensor.uniform_, Tensor.zero_, Tensor.fill_})

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        if func in self._INIT:
            return args[0] if args else (kwargs or {})["tensor"]
        return func(*args, **(kwargs or {}))


def load_model(folder: Path, config: ModelConfig, *, device: torch.device, dtype: torch.dtype, backend: str,
               convert_linear: Callable[[nn.Linear], nn.Module] | None = None,
               tied_embedding: Callable[[nn.Module], nn.Module] | None = None) -> GPTBigCode:
    """Build the model on the meta device and fill it tensor by tensor from safetensors.

    Names and shapes are checked against the config before any weights are read. Tensors kept
    as stored are views of the file's memory map; converted ones are read and converted one at
    a time (see tensorfile.py). ``convert_linear`` (e.g. int8 quantization) replaces each linear
    layer, the tied lm_head included, right after its weights are read, so the float copy of
    the whole model never exists; it gets each weight as stored in the file (fp32, bf16 or fp16)
    and must not keep it: its memory is reused for the next layer's.
    ``tied_embedding(converted_head)`` then gives the module that serves as wte from the
    converted head's storage, so no float vocabulary matrix is kept.

    Raises:
        CheckpointError: missing, unexpected, mis-shaped, non-float or corrupted tensors.
    """
    files = hub.weight_files(folder)
    with torch.device("meta"), _SkipInit():
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

    def fetch(key: str, *, to_convert: bool = False, scratch: bool = False) -> Tensor:
        if converted:
            return converted.pop(key).to(device=device, dtype=dtype)
        # When layers are converted, everything is read into owned memory (a mapped view would
        # keep the file's pages resident after the conversion); what is converted and then
        # dropped is read into transient memory, a weight matrix into the reader's one reused
        # region (valid until the next such read: each is converted before the next is read),
        # as stored: the converter takes 16-bit weights as they are, with no fp32 copy.
        return source.read(names[key], dtype=None if scratch else dtype, device=device,
                           mapped=convert_linear is None, transient=to_convert, scratch=scratch)

    if convert_linear is not None:
        # The tied head first: the largest matrix is converted while little else is resident.
        converting_wte = tied_embedding is not None
        wte = fetch("transformer.wte.weight", to_convert=converting_wte, scratch=converting_wte)
        head = nn.Linear(config.n_embd, config.vocab_size, bias=False, device="meta")
        head.weight = nn.Parameter(wte, requires_grad=False)
        model.lm_head = convert_linear(head)
        if tied_embedding is not None:
            model.transformer["wte"] = tied_embedding(model.lm_head)
        else:
            model.wte.weight = nn.Parameter(wte, requires_grad=False)
        del head, wte
        source.release_scratch()  # the vocabulary matrix's region: far larger than any layer's
        _load_converting_linears(model, functools.partial(fetch, to_convert=True), convert_linear)
    for key, param in list(model.named_parameters()):
        if param.is_meta:  # not read yet (converted layers were read above)
            module_path, _, attr = key.rpartition(".")
            setattr(model.get_submodule(module_path), attr, nn.Parameter(fetch(key), requires_grad=False))
    if convert_linear is None:
        model.tie_weights()
    model.eval().requires_grad_(False)
    return model


def _load_converting_linears(model: GPTBigCode, fetch: Callable[..., Tensor],
                             convert: Callable[[nn.Linear], nn.Module]) -> None:
    """Read each linear layer of the blocks and replace it with ``convert(layer)`` at once."""
    # Names only: a list of the modules themselves would keep every float layer alive.
    sites = [(prefix, name) for prefix, parent in model.named_modules()
             for name, child in parent.named_children()
             if type(child) is nn.Linear and child is not model.lm_head]
    for prefix, name in sites:
        parent = model.get_submodule(prefix)
        layer = cast(nn.Linear, getattr(parent, name))
        key = f"{prefix}.{name}" if prefix else name
        layer.weight = nn.Parameter(fetch(f"{key}.weight", scratch=True), requires_grad=False)
        if layer.bias is not None:
            layer.bias = nn.Parameter(fetch(f"{key}.bias"), requires_grad=False)
        setattr(parent, name, convert(layer))  # before the next scratch read reuses the weight's memory
        del layer
        _trim_heap()
