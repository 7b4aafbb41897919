"""Which int8 GEMM runs the prompt passes of an int8 model on this CPU: measured, never guessed.

Candidates, each computing the same exact int32 sums (so the choice changes speed only):

* ``native``: santa's kernel (kernels/decode.c ``santa_linear_i8_prompt``), built for this CPU
  (VNNI, AVX-512, AVX2 or plain C);
* ``torch``: ``torch._int_mm`` (oneDNN). Fast where PyTorch finds VNNI; elsewhere it ran a
  128-token prompt 15x slower than fp32 on an AVX2 EPYC, and oneDNN's AVX2 kernel saturates
  16-bit pair sums, so it is checked for exactness first;
* ``blas``: the int8 values as fp32 through the BLAS GEMM in K-chunks short enough to stay exact;
  needs neither VNNI nor a compiler.

The first int8 load on a machine (or ``santa info --quantize int8``) checks each candidate against
exact integer sums on adversarial values, times the exact ones on a layer of the model's MLP
shape with a 128-token prompt, and keeps the fastest. The result is cached beside the compiled
kernel (``int8-gemm.json``), keyed by CPU, kernel build, PyTorch version, instruction-set
overrides, thread count and shape. ``SANTA_INT8_GEMM=native|torch|blas`` forces one;
``SANTA_INT8_GEMM=measure`` measures again (a first measurement made while the machine was busy
would otherwise stay).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from santacli import native
from santacli.errors import BackendError
from santacli.quantize import GEMMS, Int8Gemm, Int8Linear

CHOICES = ("auto", "measure", "native", "torch", "blas")  # measure: ignore the cache, measure again
SAMPLE_TOKENS = 128  # the prompt length the choice is measured at
_REPEATS = 3
_GIVE_UP = 4.0  # stop timing a candidate this many times slower than the best so far
_MAX_SAMPLE_ROWS = 8192
_ENV_KEYS = ("SANTA_NATIVE_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
             "MKL_DEBUG_CPU_TYPE")


@dataclass(frozen=True)
class Choice:
    name: str  # "native", "torch" or "blas"
    description: str  # for LoadInfo.prompt and ``santa info``


def requested() -> str:
    """``SANTA_INT8_GEMM`` (default ``auto``).

    Raises:
        BackendError: an unknown value.
    """
    return native.env_choice("SANTA_INT8_GEMM", CHOICES)


def candidates() -> dict[str, Int8Gemm]:
    """Every int8 GEMM usable here, by name."""
    found: dict[str, Int8Gemm] = {}
    gemm = native.int8_gemm()
    if gemm is not None:
        found["native"] = gemm
    found.update(GEMMS)
    return found


def _label(name: str, gemms: dict[str, Int8Gemm]) -> str:
    gemm = gemms[name]
    if isinstance(gemm, native.NativeInt8Gemm):
        return f"native {gemm.isa}"
    return {"torch": "torch._int_mm"}.get(name, name)


def describe_float(device: torch.device, dtype: torch.dtype) -> str:
    """How prompt passes of an unquantized model multiply (``santa info``, LoadInfo.prompt)."""
    if device.type != "cpu":
        return "pytorch"
    if dtype == torch.float32:
        return "pytorch fp32 GEMM"
    return f"pytorch fp32 GEMM ({str(dtype).removeprefix('torch.')} weights widened a layer at a time)"


def choose_for_model(model: nn.Module) -> str:
    """Give every int8 layer of ``model`` the prompt GEMM chosen for this CPU; describe it."""
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    if not layers:
        return "none"
    # The widest layer but the vocabulary head, which a prompt pass runs for its last row only.
    head = getattr(model, "lm_head", None)
    mlp = max([m for m in layers if m is not head] or layers, key=lambda m: m.in_features * m.out_features)
    gemms = candidates()
    choice = choose(mlp.in_features, mlp.out_features, gemms)
    for layer in layers:
        layer.gemm = gemms[choice.name]
    return choice.description


def choose(in_features: int, out_features: int, gemms: dict[str, Int8Gemm] | None = None) -> Choice:
    """The int8 GEMM for prompts through a layer of this shape: forced, cached or measured now."""
    gemms = gemms if gemms is not None else candidates()
    forced = requested()
    if forced not in ("auto", "measure"):
        if forced not in gemms:
            raise BackendError(f"SANTA_INT8_GEMM={forced}: the native kernel is unavailable here "
                               f"({native.status().detail})")
        return Choice(forced, f"{_label(forced, gemms)} (SANTA_INT8_GEMM)")
    threads = torch.get_num_threads()
    key = _cache_key(in_features, out_features, threads, sorted(gemms))
    cached = _read_cache().get(key) if forced == "auto" else None
    if isinstance(cached, dict) and cached.get("name") in gemms and isinstance(cached.get("description"), str):
        return Choice(cached["name"], cached["description"])
    choice = _measure(in_features, out_features, gemms, threads)
    _write_cache(key, {"name": choice.name, "description": choice.description})
    return choice


def _measure(in_features: int, out_features: int, gemms: dict[str, Int8Gemm], threads: int) -> Choice:
    exact = {name for name, gemm in gemms.items() if _is_exact(gemm, in_features)}
    layer = _random_layer(in_features, out_features, seed=1)
    x = torch.randn((SAMPLE_TOKENS, in_features), generator=torch.Generator().manual_seed(2))
    times = _time_interleaved({name: gemms[name] for name in exact}, layer, x)
    if not times:  # cannot happen while blas (exact by construction) is a candidate
        raise BackendError("no exact int8 GEMM found on this machine")
    best = min(times, key=lambda n: times[n])
    shape = f"{SAMPLE_TOKENS}x{in_features}x{min(out_features, _MAX_SAMPLE_ROWS)}, {threads} threads"
    measured = ", ".join(f"{_label(n, gemms)} {times[n] * 1e3:.1f} ms" for n in sorted(times, key=times.__getitem__))
    inexact = sorted(set(gemms) - exact)
    note = f"; {', '.join(_label(n, gemms) for n in inexact)} inexact here" if inexact else ""
    return Choice(best, f"{_label(best, gemms)} (measured at {shape}: {measured}{note})")


def _time_interleaved(gemms: dict[str, Int8Gemm], layer: Int8Linear, x: Tensor) -> dict[str, float]:
    """Best time of each GEMM over rounds that run every one in turn, so a burst of other load
    on the machine hits them all alike. The first call of each warms caches and thread pools and
    drops any candidate ``_GIVE_UP`` times slower than the best warm-up (a PyTorch reference loop
    can take seconds)."""
    warm: dict[str, float] = {}
    for name in sorted(gemms, key=lambda n: n != "native"):  # the likely winner first sets the bar
        start = time.perf_counter()
        gemms[name](layer, x)
        warm[name] = time.perf_counter() - start
    bar = min(warm.values(), default=math.inf)
    best = {name: took for name, took in warm.items() if took <= _GIVE_UP * bar}
    for _ in range(_REPEATS):
        for name in list(best):
            start = time.perf_counter()
            gemms[name](layer, x)
            best[name] = min(best[name], time.perf_counter() - start)
    return {**warm, **best}


def _random_layer(in_features: int, out_features: int, *, seed: int) -> Int8Linear:
    """Int8 weights drawn directly (no float matrix: StarCoder's MLP would need 600 MB of it),
    at most _MAX_SAMPLE_ROWS rows: time grows with rows alike for every candidate."""
    g = torch.Generator().manual_seed(seed)
    rows = min(out_features, _MAX_SAMPLE_ROWS)
    q = torch.randint(-127, 128, (rows, in_features), generator=g, dtype=torch.int8)
    scale = torch.rand(rows, generator=g) / 127.0
    return Int8Linear(q, scale, q.sum(dim=1, dtype=torch.int32), torch.randn(rows, generator=g))


def _is_exact(gemm: Int8Gemm, in_features: int) -> bool:
    """Whether ``gemm`` reproduces exact integer sums where 16-bit pair sums would saturate:
    activations and weights at the extremes of int8 (|x| = 127 gives x_scale 1, so x is its own
    quantization)."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randint(-127, 128, (64, in_features), generator=g, dtype=torch.int8)
    weight[:, : in_features // 2] = 127  # every pair maximal: (127 + 128) * 127 * 2 > 2^15
    layer = Int8Linear(weight, torch.ones(64), weight.sum(dim=1, dtype=torch.int32), None)
    x = torch.randint(-127, 128, (16, in_features), generator=g).float()
    x[:, : in_features // 2] = 127.0
    expected = (x.long() @ weight.long().t()).float()
    try:
        return torch.equal(gemm(layer, x), expected)
    except (RuntimeError, MemoryError):
        return False


def _cache_file() -> Path:
    return native.cache_dir() / "int8-gemm.json"


def _cache_key(in_features: int, out_features: int, threads: int, names: list[str]) -> str:
    parts = [native.cpu_signature(), native.status().detail, torch.__version__, str(threads),
             f"{in_features}x{out_features}", ",".join(names), *(f"{k}={os.environ.get(k, '')}" for k in _ENV_KEYS)]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:24]


def _read_cache() -> dict[str, object]:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(key: str, entry: dict[str, str]) -> None:
    """Add ``entry`` atomically; a cache that cannot be written only costs a later re-measure."""
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**_read_cache(), key: entry}
        fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except OSError:
        pass
