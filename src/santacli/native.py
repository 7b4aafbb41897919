"""The native CPU decode step (``kernels/decode.c``): build it, load it, bind a model to it.

The C source ships with the package and is compiled on first use with the machine's C compiler
(``$CC``, else ``cc``/``gcc``) for the CPU it runs on (``-march=native``), into the user cache
folder, keyed by the source, the flags and the CPU. Where no compiler works, or with
``SANTA_NATIVE=0``, santa decodes with PyTorch alone; :func:`status` says which and why.

A :class:`NativeDecoder` is bound to one loaded model: it keeps fp32 copies of the small vectors
(biases, LayerNorm parameters) and pointers to the weights PyTorch owns, and runs one decode
step per call for every row of a KV cache: one new token per row, or several (a speculative
draft to verify), each computed bit for bit as one-token steps would compute it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from santacli import quantize
from santacli.errors import BackendError
from santacli.model import Block, GPTBigCode, KVCache
from santacli.quantize import Int8Linear

DECODE_MODES = ("auto", "native", "pytorch")

SOURCE = Path(__file__).parent / "kernels" / "decode.c"
FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC", "-std=c11")
# The instruction set the kernel is built for: this CPU's (``native``), or a lower one so that one
# machine can run the code paths of others (``SANTA_NATIVE_ISA=avx2``: x86-64-v3, i.e. AVX2 + FMA
# + F16C without AVX-512 or VNNI, what most laptops and cloud VMs have; ``avx512``: x86-64-v4,
# AVX-512 without VNNI; ``generic``: plain C).
ISA_FLAGS = {"native": ("-march=native",), "avx512": ("-march=x86-64-v4", "-mtune=native"),
             "avx2": ("-march=x86-64-v3", "-mtune=native"), "generic": ("-march=x86-64", "-mtune=native")}
# The /proc/cpuinfo flags each forced level needs (x86-64-v3 and -v4): a kernel built for more
# than the CPU has would die of an illegal instruction, so santa refuses to load it.
_ISA_CPU_FLAGS = {"avx2": ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm"),
                  "avx512": ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm",
                             "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")}
# What a forced-AVX2 run also sets for PyTorch (before it is imported): its ATen kernels, oneDNN
# and MKL then stay within AVX2 too (benchmarks/decode.py --isa avx2, the tests).
TORCH_ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                          "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
                 "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
                            "MKL_ENABLE_INSTRUCTIONS": "AVX512"},
                 "generic": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41",
                             "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}}


def forced_isa_env(isa: str) -> dict[str, str]:
    """Environment variables that make a fresh process run as on a CPU with only ``isa``."""
    if isa not in ISA_FLAGS:
        raise ValueError(f"unknown instruction set {isa!r}; choose one of {', '.join(ISA_FLAGS)}")
    return {"SANTA_NATIVE_ISA": isa, **TORCH_ISA_ENV.get(isa, {})}


def env_choice(variable: str, choices: tuple[str, ...]) -> str:
    """The value of environment ``variable`` among ``choices`` (unset or empty: the first).

    Raises:
        BackendError: any other value.
    """
    value = os.environ.get(variable, "").strip().lower() or choices[0]
    if value not in choices:
        raise BackendError(f"{variable}={value!r} is not one of {', '.join(choices)}")
    return value


def requested_isa() -> str:
    """``SANTA_NATIVE_ISA`` (default ``native``).

    Raises:
        BackendError: an unknown value.
    """
    return env_choice("SANTA_NATIVE_ISA", tuple(ISA_FLAGS))


_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}
_ACTIVATIONS = {"gelu_pytorch_tanh": 0, "gelu_new": 0, "gelu_fast": 1, "gelu": 2, "relu": 3, "silu": 4, "tanh": 5}

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


class _Linear(ctypes.Structure):
    _fields_ = [("weight", _P), ("scale", _P), ("wsum", _P), ("bias", _P), ("rows", _I64), ("cols", _I64),
                ("wtype", ctypes.c_int32), ("pad_", ctypes.c_int32)]


class _Layer(ctypes.Structure):
    _fields_ = [("ln_1_w", _P), ("ln_1_b", _P), ("ln_2_w", _P), ("ln_2_b", _P),
                ("c_attn", _Linear), ("attn_proj", _Linear), ("c_fc", _Linear), ("mlp_proj", _Linear)]


class _Model(ctypes.Structure):
    _fields_ = [("n_embd", _I64), ("n_head", _I64), ("kv_heads", _I64), ("head_dim", _I64), ("inner", _I64),
                ("n_layer", _I64), ("vocab", _I64), ("cache_batch", _I64), ("cache_len", _I64),
                ("multi_query", ctypes.c_int32), ("activation", ctypes.c_int32), ("cache_type", ctypes.c_int32),
                ("wte_type", ctypes.c_int32), ("wpe_type", ctypes.c_int32), ("pad_", ctypes.c_int32),
                ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float),
                ("wte", _P), ("wpe", _P), ("wte_scale", _P), ("ln_f_w", _P), ("ln_f_b", _P),
                ("k_cache", _P), ("v_cache", _P),
                ("layers", ctypes.POINTER(_Layer)), ("lm_head", _Linear)]


@dataclass(frozen=True)
class NativeStatus:
    available: bool
    detail: str  # "avx512 (16 lanes), /path/to/lib.so", or why it is unavailable


_lock = threading.Lock()
_loaded: tuple[ctypes.CDLL | None, NativeStatus] | None = None


def missing_cpu_flags(isa: str) -> list[str]:
    """The CPU features a build for ``isa`` needs that this CPU lacks (none known: [])."""
    needed = _ISA_CPU_FLAGS.get(isa, ())
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return []  # not Linux: trust the request
    flags = set()
    for line in info.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return [f for f in needed if f not in flags] if flags else []


def cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def cache_dir() -> Path:
    import platformdirs

    return platformdirs.user_cache_path("santacli") / "kernels"


def _build(cc: str, flags: tuple[str, ...]) -> Path:
    """Compile decode.c unless a build for this source, compiler, flags and CPU is cached."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, *flags, cpu_signature()]).encode())
    target = cache_dir() / f"decode-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            first = (proc.stderr.strip().splitlines() or ["no output"])[0]
            raise OSError(f"{cc} failed: {first}")
        os.replace(tmp, target)  # atomic: concurrent builds of the same key are harmless
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load() -> tuple[ctypes.CDLL | None, NativeStatus]:
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _try_load()
        return _loaded


def _try_load() -> tuple[ctypes.CDLL | None, NativeStatus]:
    if os.environ.get("SANTA_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, NativeStatus(False, "disabled by SANTA_NATIVE=0")
    try:
        lib, path = load_library()
    except (OSError, subprocess.SubprocessError, BackendError) as exc:
        return None, NativeStatus(False, str(exc))
    lanes = lib.santa_simd_width()
    isa = cast(bytes, lib.santa_prompt_isa()).decode()  # names VNNI too: the int8 kernels use it
    return lib, NativeStatus(True, f"{isa} ({lanes} lane{'s' if lanes > 1 else ''}), {path}")


def load_library(extra_flags: tuple[str, ...] = (), isa: str | None = None) -> tuple[ctypes.CDLL, Path]:
    """Build (or find in the cache) and load the kernel for ``isa`` (default: ``SANTA_NATIVE_ISA``,
    else this CPU's); ``extra_flags`` (e.g. ``-mno-avx512f``) narrow it further, which the tests
    use to check every code path.

    Raises:
        OSError: no compiler, or the build failed.
        BackendError: an unknown ``SANTA_NATIVE_ISA``.
    """
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found; set CC")
    isa = isa or requested_isa()
    missing = missing_cpu_flags(isa)
    if missing:
        raise OSError(f"a kernel for {isa} needs CPU features this CPU lacks: {', '.join(missing)}")
    path = _build(cc, FLAGS + ISA_FLAGS[isa] + extra_flags)
    lib = ctypes.CDLL(str(path))
    lib.santa_decode.argtypes = [ctypes.POINTER(_Model), _P, _I64, _I64, _I64, _P, _P, ctypes.c_int32]
    lib.santa_decode.restype = None
    lib.santa_workspace_floats.argtypes = [ctypes.POINTER(_Model), _I64]
    lib.santa_workspace_floats.restype = _I64
    lib.santa_simd_width.restype = ctypes.c_int32
    lib.santa_linear_i8_prompt.argtypes = [ctypes.POINTER(_Linear), _P, _I64, _P, _P, ctypes.c_int32]
    lib.santa_linear_i8_prompt.restype = ctypes.c_int32
    lib.santa_prompt_workspace_bytes.argtypes = [_I64, _I64]
    lib.santa_prompt_workspace_bytes.restype = _I64
    lib.santa_prompt_isa.restype = ctypes.c_char_p
    lib.santa_quantize_rows.argtypes = [_P, ctypes.c_int32, _I64, _I64, _P, _P, _P, ctypes.c_int32]
    lib.santa_quantize_rows.restype = None
    return lib, path


def status() -> NativeStatus:
    """Whether the native decode step is usable here (builds it on first call)."""
    return _load()[1]


def supports(model: GPTBigCode) -> str | None:
    """None when ``model`` can decode natively, else the reason it cannot."""
    if model.device.type != "cpu":
        return "the native decode step runs on the CPU only"
    if model.compute_dtype not in _TYPES or model.compute_dtype == torch.int8:
        return f"activations of dtype {model.compute_dtype} are not supported"
    return None


class NativeDecoder:
    """One decode step of ``model`` in C for every row of a KV cache (one or more new tokens)."""

    def __init__(self, model: GPTBigCode, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._keep: list[Tensor] = []  # every tensor a pointer refers to stays alive
        c = model.config
        wte = cast(Tensor, model.wte.weight)
        wte_scale = getattr(model.wte, "scale", None)  # an int8 embedding (quantize.Int8Embedding)
        dtype = model.compute_dtype
        self._vocab = c.vocab_size
        self._layers = (_Layer * c.n_layer)()
        for i, module in enumerate(model.blocks):
            block = cast(Block, module)
            attn, mlp = block.attn, block.mlp
            self._layers[i] = _Layer(
                self._vec(block.ln_1.weight), self._vec(block.ln_1.bias),
                self._vec(block.ln_2.weight), self._vec(block.ln_2.bias),
                self._linear(attn.c_attn), self._linear(attn.c_proj), self._linear(mlp.c_fc), self._linear(mlp.c_proj),
            )
        self._model = _Model(
            n_embd=c.n_embd, n_head=c.n_head, kv_heads=c.kv_heads, head_dim=c.head_dim, inner=c.inner_dim,
            n_layer=c.n_layer, vocab=c.vocab_size, cache_batch=0, cache_len=0,
            multi_query=int(c.multi_query), activation=_ACTIVATIONS[c.activation_function],
            cache_type=_TYPES[dtype], wte_type=_TYPES[wte.dtype], wpe_type=_TYPES[dtype], pad_=0,
            eps=c.layer_norm_epsilon, attn_scale=c.head_dim**-0.5 if c.scale_attn_weights else 1.0,
            wte=self._ptr(wte), wpe=self._ptr(model.wpe.weight), wte_scale=self._vec(wte_scale),
            ln_f_w=self._vec(model.ln_f.weight), ln_f_b=self._vec(model.ln_f.bias),
            k_cache=None, v_cache=None, layers=self._layers, lm_head=self._linear(model.lm_head),
        )
        self._cache_dtype = dtype

    def _ptr(self, t: Tensor) -> int:
        if not t.is_contiguous():
            t = t.contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _vec(self, t: Tensor | None) -> int | None:
        return None if t is None else self._ptr(t.detach().float())

    def _linear(self, layer: nn.Module) -> _Linear:
        weight = cast(Tensor, layer.weight)
        scale = getattr(layer, "scale", None)
        int8 = weight.dtype == torch.int8
        if weight.dtype not in _TYPES or int8 != isinstance(scale, Tensor) or int8 != hasattr(layer, "row_sum"):
            raise TypeError(f"unsupported linear layer {type(layer).__name__} ({weight.dtype})")
        bias = getattr(layer, "bias", None)
        rows, cols = weight.shape
        row_sum = getattr(layer, "row_sum", None)  # int8 only (quantize.Int8Linear)
        wsum = self._ptr(row_sum) if isinstance(row_sum, Tensor) else None
        return _Linear(self._ptr(weight.detach()), self._vec(scale), wsum, self._vec(bias), rows, cols,
                       _TYPES[weight.dtype], 0)

    def __call__(self, ids: Tensor, start_pos: int, cache: KVCache) -> Tensor:
        """Logits (B, T, vocab) fp32 for ``ids`` (B, T): T new tokens per row at positions
        [start_pos, start_pos + T), causal. Their keys/values go into the cache; the caller
        advances ``cache.length`` (by fewer than T when it rejects drafted tokens)."""
        B, T = ids.shape
        if cache.k.dtype != self._cache_dtype:
            raise TypeError(f"KV cache dtype {cache.k.dtype} does not match the model")
        if cache.batch < B or start_pos + T > cache.max_len:  # C would write out of bounds
            raise IndexError(f"{B} rows x positions [{start_pos}, {start_pos + T}) exceed the KV cache "
                             f"({cache.batch} x {cache.max_len})")
        ids64 = ids.reshape(B * T).to(torch.int64).contiguous()
        if int(ids64.min()) < 0 or int(ids64.max()) >= self._vocab:  # C would read out of bounds
            raise IndexError(f"token id out of range [0, {self._vocab})")
        # A per-call copy of the descriptor and a fresh work space (~100 KB a token): calls from
        # several threads on different caches stay independent.
        m = _Model.from_buffer_copy(self._model)
        m.k_cache, m.v_cache = cache.k.data_ptr(), cache.v.data_ptr()
        m.cache_batch, m.cache_len = cache.batch, cache.max_len
        work = torch.empty(self._lib.santa_workspace_floats(ctypes.byref(m), B * T), dtype=torch.float32)
        logits = torch.empty((B, T, self._vocab), dtype=torch.float32)
        self._lib.santa_decode(ctypes.byref(m), ids64.data_ptr(), B, T, start_pos, logits.data_ptr(),
                               work.data_ptr(), torch.get_num_threads())
        return logits


class NativeInt8Gemm:
    """The prompt passes of an int8 model in C (``santa_linear_i8_prompt``): a quantize.Int8Gemm."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self.isa = cast(bytes, lib.santa_prompt_isa()).decode()

    def __call__(self, layer: Int8Linear, x: Tensor) -> Tensor:
        M, K = x.shape
        x = x.contiguous()
        bias = layer.bias.data_ptr() if layer.bias is not None else None
        desc = _Linear(layer.weight.data_ptr(), layer.scale.data_ptr(), layer.row_sum.data_ptr(), bias,
                       layer.out_features, K, _TYPES[torch.int8], 0)
        y = torch.empty((M, layer.out_features), dtype=torch.float32)
        work = torch.empty(self._lib.santa_prompt_workspace_bytes(M, K), dtype=torch.uint8)
        if self._lib.santa_linear_i8_prompt(ctypes.byref(desc), x.data_ptr(), M, y.data_ptr(), work.data_ptr(),
                                            torch.get_num_threads()) != 0:
            raise MemoryError("the native int8 GEMM could not allocate its weight buffers")
        return y


def int8_gemm() -> NativeInt8Gemm | None:
    """The native prompt GEMM for int8 models, or None where the kernel does not build."""
    lib, _ = _load()
    return None if lib is None else NativeInt8Gemm(lib)


def quantize_rows(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """quantize.quantize_rows in one pass per row in C (the same values, bit for bit); falls back
    to PyTorch where the kernel does not build."""
    lib, _ = _load()
    if lib is None or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16) or weight.dim() != 2:
        return quantize.quantize_rows(weight)
    weight = weight.detach().contiguous()
    rows, cols = weight.shape
    q = torch.empty((rows, cols), dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    row_sum = torch.empty(rows, dtype=torch.int32)
    lib.santa_quantize_rows(weight.data_ptr(), _TYPES[weight.dtype], rows, cols, q.data_ptr(), scale.data_ptr(),
                            row_sum.data_ptr(), torch.get_num_threads())
    return q, scale, row_sum


def describe(device: torch.device) -> str:
    """How one-token steps would run on ``device`` with ``decode="auto"`` (``santa info``)."""
    if device.type != "cpu":
        return "pytorch"
    state = status()
    return f"native {state.detail}" if state.available else f"pytorch (native step unavailable: {state.detail})"


def check_decode(mode: str, device: torch.device) -> None:
    """Validate a ``--decode`` / ``decode=`` request before any weights are loaded."""
    if mode not in DECODE_MODES:
        raise BackendError(f"unknown decode mode {mode!r}; choose one of {', '.join(DECODE_MODES)}")
    if mode == "native":
        if device.type != "cpu":
            raise BackendError("--decode native runs on the CPU; drop it (or use --decode pytorch) on CUDA")
        state = status()
        if not state.available:
            raise BackendError(f"--decode native is unavailable here ({state.detail}); use --decode pytorch")


def attach(model: GPTBigCode, mode: str) -> str:
    """Choose how ``model`` runs one-token steps (once, at load time); describe the choice."""
    model.decoder = None
    if mode == "pytorch":
        return "pytorch"
    reason = supports(model)
    if reason is not None:
        if mode == "native":
            raise BackendError(f"--decode native: {reason}")
        return f"pytorch ({reason})"
    lib, state = _load()
    if lib is None:
        return f"pytorch (native step unavailable: {state.detail})"
    model.decoder = NativeDecoder(model, lib)
    return "native " + state.detail.split(",")[0]
