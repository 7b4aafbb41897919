"""Read safetensors files one tensor at a time.

A tensor used as stored (same dtype, on the CPU) is a zero-copy view of safetensors' memory
map: loading is instant and the weights are resident once. A tensor that is converted (fp32
file to bf16, to CUDA, to int8) is instead read with plain file reads into owned memory and
converted before the next one is read: pages of a mapped file stay resident as long as the
mapping lives, so converting mapped tensors held the whole file plus the converted copy at once
(3.15x the bf16 weights at the SantaCoder shape); reading tensor by tensor keeps the peak at the
converted weights plus one tensor.

Such transient copies live in their own anonymous memory maps, returned to the OS when the copy
is dropped: from the malloc heap, freed 17-67 MB buffers between the converted tensors left
holes that were not given back, and peak RSS of an int8 load varied 1.6-2.5 GB between
identical runs at the SantaCoder shape.
"""

from __future__ import annotations

import ctypes
import io
import json
import math
import mmap
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

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
_CONVERT_CHUNK = 16 << 20  # bytes of a stored tensor read and converted at a time


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
        self._mapped: dict[Path, Any] = {}  # safetensors handles, opened on first mapped read
        self._scratch: Tensor | None = None  # the reused read buffer of converting reads
        self._region: mmap.mmap | None = None  # the reused region of scratch reads
        for file in files:
            self.entries.update(_index(file))

    def read(self, name: str, *, dtype: torch.dtype | None = None, device: torch.device | None = None,
             mapped: bool = True, transient: bool = False, scratch: bool = False) -> Tensor:
        """The tensor ``name`` as ``dtype`` on ``device``.

        Used as stored (and ``mapped``), it is a view of the file's memory map; otherwise it is
        read into owned memory and converted, and only it is held while converting. ``transient``
        says the caller converts the result itself and drops it (int8 quantization). ``scratch``
        (as stored, on the CPU) reads into this reader's one reused region instead: the result is
        valid only until the next scratch read, and no fresh pages are faulted in per tensor
        (4.5 GB of them for the SantaCoder-shape fp32 file).
        """
        entry = self.entries[name]
        if entry.dtype not in _DTYPES:
            raise CheckpointError(f"{entry.file}: tensor {name} has unsupported dtype {entry.dtype}")
        stored = _DTYPES[entry.dtype]
        if mapped and (dtype in (None, stored)) and (device is None or device.type == "cpu"):
            return self._read_mapped(entry, name)
        target_dtype = dtype or stored
        target_device = device or torch.device("cpu")
        if scratch and target_device.type == "cpu" and target_dtype == stored:
            return self._read_into_region(entry, name)
        if target_device.type == "cpu" and target_dtype != stored:
            return self._read_converted(entry, name, target_dtype)
        converting = target_dtype != stored or target_device.type != "cpu"
        raw = self._read_owned(entry, name, transient=transient or converting)
        if not converting:
            return raw
        return raw.to(device=target_device, dtype=target_dtype)

    def _read_mapped(self, entry: TensorEntry, name: str) -> Tensor:
        from safetensors import SafetensorError, safe_open

        try:
            handle = self._mapped.get(entry.file)
            if handle is None:
                handle = self._mapped[entry.file] = safe_open(str(entry.file), framework="pt")
            return cast(Tensor, handle.get_tensor(name))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise CheckpointError(f"{entry.file}: tensor {name} is corrupted ({exc})") from None

    def _read_converted(self, entry: TensorEntry, name: str, dtype: torch.dtype) -> Tensor:
        """Convert on the CPU while reading, through one small reused buffer: reading a whole
        tensor first faulted in fresh pages for every byte of it (3.9 s of a 7.2 s bf16 load of
        the SantaCoder-shape fp32 file) and held it beside its converted copy."""
        stored = _DTYPES[entry.dtype]
        nbytes = self._checked_size(entry, name)
        out = torch.empty(entry.shape, dtype=dtype)
        flat = out.view(-1)
        step = max(1, _CONVERT_CHUNK // stored.itemsize) * stored.itemsize
        if self._scratch is None or self._scratch.numel() < step:
            self._scratch = torch.empty(step, dtype=torch.uint8)
        view = memoryview((ctypes.c_char * step).from_address(self._scratch.data_ptr())).cast("B")
        with _opened(entry, name) as handle:  # one handle: the kernel's read-ahead carries on
            for done in range(0, nbytes, step):
                want = min(step, nbytes - done)
                _read_exactly(handle, entry, name, view[:want])
                first = done // stored.itemsize
                flat[first:first + want // stored.itemsize].copy_(self._scratch[:want].view(stored))
        return out

    def release_scratch(self) -> None:
        """Give the scratch region back (e.g. once the vocabulary matrix, much the largest, is
        converted: the layers after it need a region an eighth of its size)."""
        self._region = None

    def _read_into_region(self, entry: TensorEntry, name: str) -> Tensor:
        nbytes = self._checked_size(entry, name)
        dtype = _DTYPES[entry.dtype]
        if not nbytes:
            return torch.empty(entry.shape, dtype=dtype)
        if self._region is None or len(self._region) < nbytes:
            # A tensor still using the old region keeps it alive (frombuffer holds a reference).
            self._region = mmap.mmap(-1, nbytes)
        raw = torch.frombuffer(self._region, dtype=dtype, count=nbytes // dtype.itemsize).view(entry.shape)
        self._fill(entry, name, memoryview(self._region)[:nbytes])
        return raw

    @staticmethod
    def _checked_size(entry: TensorEntry, name: str) -> int:
        nbytes = entry.end - entry.start
        if math.prod(entry.shape) * _DTYPES[entry.dtype].itemsize != nbytes:
            raise CheckpointError(f"{entry.file}: tensor {name} is corrupted (its size does not match its shape)")
        return nbytes

    def _read_owned(self, entry: TensorEntry, name: str, *, transient: bool = False) -> Tensor:
        dtype = _DTYPES[entry.dtype]
        nbytes = self._checked_size(entry, name)
        if transient and nbytes:
            region = mmap.mmap(-1, nbytes)  # anonymous; unmapped when the tensor is dropped
            raw = torch.frombuffer(region, dtype=dtype).view(entry.shape)
            view = memoryview(region)
        else:
            raw = torch.empty(entry.shape, dtype=dtype)
            # Read straight into torch's (uninitialised, 64-byte aligned) memory: no zero-fill,
            # no second copy.
            view = memoryview((ctypes.c_char * nbytes).from_address(raw.data_ptr())).cast("B")
        self._fill(entry, name, view)
        return raw

    @staticmethod
    def _fill(entry: TensorEntry, name: str, view: memoryview) -> None:
        """Read the tensor's bytes from its file into ``view`` (exactly its size)."""
        if len(view):
            with _opened(entry, name) as handle:
                _read_exactly(handle, entry, name, view)


@contextmanager
def _opened(entry: TensorEntry, name: str) -> Iterator[io.BufferedReader]:
    """The tensor's file, positioned at its first byte; I/O errors become CheckpointError."""
    try:
        with open(entry.file, "rb") as handle:
            handle.seek(entry.start)
            yield handle
    except OSError as exc:
        raise CheckpointError(f"{entry.file}: cannot read tensor {name} ({exc})") from None


def _read_exactly(handle: io.BufferedReader, entry: TensorEntry, name: str, view: memoryview) -> None:
    done = 0
    while done < len(view):
        got = handle.readinto(view[done:done + _READ_CHUNK])
        if not got:
            raise CheckpointError(f"{entry.file}: tensor {name} is corrupted (the file ends early)")
        done += got


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
