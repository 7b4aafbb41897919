"""Find a checkpoint (folder, alias or hub id) and load its safetensors into a GPTBigCode.

The only module that touches huggingface_hub (tensorfile.py reads the safetensors). Loading is strict: every expected
tensor must be present with the right shape, and nothing unknown may be left over.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import Tensor

from santacli import catalog
from santacli.config import ModelConfig
from santacli.errors import BackendError, CheckpointError, ModelNotFoundError
from santacli.model import GPTBigCode
from santacli.tensorfile import TensorFiles

HUB_FILES = ["config.json", "tokenizer.json", "*.safetensors", "model.safetensors.index.json"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Buffers that old GPT-2 style checkpoints carry; they hold no weights.
_IGNORED_KEY = re.compile(r"\.attn\.(masked_bias|bias)$")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# ---------------------------------------------------------------------------------------------
# Resolving a model name to a local folder


def resolve_model(name: str, *, allow_download: bool = True) -> Path:
    """Return the local folder for a model folder, an alias or a hub id.

    Hub ids are looked up in the local cache first; the network is used only when the files
    are not cached, ``allow_download`` is true and HF_HUB_OFFLINE is not set.

    Raises:
        ModelNotFoundError: not a folder, alias or cached/downloadable hub id.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    alias = catalog.lookup(name)
    if alias is not None and not alias.repo_id:
        if not (catalog.BUNDLED_DIR / "config.json").is_file():
            raise ModelNotFoundError(
                f"the bundled model {name!r} is missing from this installation; reinstall santacli "
                "or pass --model with a folder or hub id"
            )
        return catalog.BUNDLED_DIR
    repo_id = alias.repo_id if alias else name
    if not _REPO_ID.match(repo_id) or path.exists() or name.startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"unknown model {name!r}: not a folder, an alias (see `santa models`) or a hub id "
            "like bigcode/gpt_bigcode-santacoder"
        )
    return _snapshot(repo_id, allow_download=allow_download)


def _snapshot(repo_id: str, *, allow_download: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if not allow_download or offline:
        raise ModelNotFoundError(
            f"model {repo_id} is not in the local cache; run `santa pull {repo_id}` while online"
        )
    try:
        return Path(download(repo_id))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its license on the hub, then `huggingface-cli login`"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"no model {repo_id} on the hub (check the spelling)") from None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelNotFoundError(
            f"model {repo_id} is not cached and could not be downloaded ({first}); "
            f"run `santa pull {repo_id}` when online, or pass a local folder"
        ) from None


def download_model(name: str) -> Path:
    """Download an alias or hub id into the local cache (``santa pull``).

    Raises:
        ModelNotFoundError: a folder or the bundled model (nothing to pull), or the download failed.
    """
    alias = catalog.lookup(name)
    if alias is not None and not alias.repo_id:
        raise ModelNotFoundError(f"{name!r} is bundled with santa: nothing to pull")
    if Path(name).expanduser().is_dir():
        raise ModelNotFoundError(f"{name!r} is a local folder: nothing to pull")
    repo_id = alias.repo_id if alias else name
    if not _REPO_ID.match(repo_id):
        raise ModelNotFoundError(f"unknown model {name!r}: not an alias (see `santa models`) or a hub id")
    return _snapshot(repo_id, allow_download=True)


def weights_size(folder: Path) -> int:
    """Bytes of safetensors weights in a model folder."""
    return sum(f.stat().st_size for f in _weight_files(folder))


def download(repo_id: str) -> str:
    """Download only the files santa needs (progress bars go to stderr)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, allow_patterns=HUB_FILES)


def cached_models() -> list[tuple[str, int]]:
    """(repo id, bytes on disk) for every model in the local hub cache."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir()
    except CacheNotFound:
        return []
    return sorted((r.repo_id, r.size_on_disk) for r in info.repos if r.repo_type == "model")


# ---------------------------------------------------------------------------------------------
# Reading tensors


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed shard index ({exc})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) listed in the index are missing: {', '.join(missing)}")
        return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    others = sorted(folder.glob("*.safetensors"))
    if others:
        return others
    if (folder / "pytorch_model.bin").is_file() or list(folder.glob("pytorch_model-*.bin")):
        raise CheckpointError(
            f"{folder} has only pytorch_model.bin (pickle), which santa does not load because "
            "pickles can run code. Convert it once: python -c \"from transformers import "
            "AutoModelForCausalLM as M; M.from_pretrained('MODEL').save_pretrained('OUT')\" "
            "and pass --model OUT"
        )
    raise CheckpointError(f"{folder}: no model.safetensors or shard index found")


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
    files = _weight_files(folder)
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
