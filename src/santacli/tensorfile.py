"""Read safetensors files one tensor at a time into memory the process owns.

safetensors checks each file's header; this module then reads a tensor's bytes with plain file
reads instead of using a memory map. Pages of a mapped file count as resident for as long as
the mapping lives, so converting (fp32 file to bf16) or re-laying out mapped weights held the
whole file plus the converted copy at once. Reading tensor by tensor keeps the peak at the
weights kept plus the one tensor being converted.
"""

from __future__ import annotations

import ctypes
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from santacli.errors import CheckpointError

# safetensors dtype names (https://github.com/huggingface/safetensors, format section).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_READ_CHUNK = 1 << 30  # one read() call moves at most ~2 GiB on Linux


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: str  # the safetensors name, e.g. "F32"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int

    @property
    def is_float(self) -> bool:
        return self.dtype in ("F64", "F32", "F16", "BF16")


class TensorFiles:
    """The tensors of one or more safetensors files, by name."""

    def __init__(self, files: list[Path]) -> None:
        self.entries: dict[str, TensorEntry] = {}
        for file in files:
            self.entries.update(_index(file))

    def read(self, name: str, *, dtype: torch.dtype | None = None,
             device: torch.device | None = None) -> Tensor:
        """The tensor ``name`` converted to ``dtype`` on ``device``; only it is held while converting."""
        entry = self.entries[name]
        if entry.dtype not in _DTYPES:
            raise CheckpointError(f"{entry.file}: tensor {name} has unsupported dtype {entry.dtype}")
        raw = torch.empty(entry.shape, dtype=_DTYPES[entry.dtype])
        nbytes = entry.end - entry.start
        if raw.numel() * raw.element_size() != nbytes:
            raise CheckpointError(f"{entry.file}: tensor {name} is corrupted (its size does not match its shape)")
        done = 0
        if nbytes:
            # Read straight into torch's (uninitialised, 64-byte aligned) memory: no zero-fill,
            # no second copy.
            view = memoryview((ctypes.c_char * nbytes).from_address(raw.data_ptr())).cast("B")
            try:
                with open(entry.file, "rb") as handle:
                    handle.seek(entry.start)
                    while done < nbytes:
                        got = handle.readinto(view[done:done + _READ_CHUNK])
                        if not got:
                            break
                        done += got
            except OSError as exc:
                raise CheckpointError(f"{entry.file}: cannot read tensor {name} ({exc})") from None
        if done < nbytes:
            raise CheckpointError(f"{entry.file}: tensor {name} is corrupted (the file ends early)")
        target_dtype = dtype or raw.dtype
        target_device = device or raw.device
        if target_dtype == raw.dtype and target_device == raw.device:
            return raw
        return raw.to(device=target_device, dtype=target_dtype)


def _index(file: Path) -> dict[str, TensorEntry]:
    """Check ``file`` with safetensors, then list where each tensor's bytes are."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt"):
            pass  # validates the header: offsets, sizes, dtypes, file length
        with open(file, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_len))
    except (SafetensorError, OSError, ValueError, struct.error) as exc:
        raise CheckpointError(f"{file}: not a valid safetensors file ({exc})") from None
    base = 8 + header_len
    entries = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        entries[name] = TensorEntry(file, meta["dtype"], tuple(meta["shape"]), base + begin, base + end)
    return entries
