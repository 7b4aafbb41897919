"""Find a model: a local folder, an alias of the catalog, or a hub id (cached or downloaded).

The only module that talks to huggingface_hub. It needs no torch, so front ends that only
talk to a server (``--endpoint``) start without loading it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from santacli import catalog
from santacli.errors import CheckpointError, ModelNotFoundError

HUB_FILES = ["config.json", "tokenizer.json", "*.safetensors", "model.safetensors.index.json"]
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
    if offline:
        raise ModelNotFoundError(
            f"model {repo_id} is not in the local cache and HF_HUB_OFFLINE is set, so nothing is downloaded: "
            f"unset it and run `santa pull {repo_id}`, or {_OFFLINE_HINT}"
        )
    if not allow_download:
        raise ModelNotFoundError(f"model {repo_id} is not in the local cache; run `santa pull {repo_id}` first")
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
        if any(word in first for word in _NO_NETWORK):
            raise ModelNotFoundError(
                f"model {repo_id} is not cached and the hub cannot be reached (this machine seems offline: "
                f"{first}); run `santa pull {repo_id}` once online, or {_OFFLINE_HINT}"
            ) from None
        raise ModelNotFoundError(
            f"model {repo_id} is not cached and could not be downloaded ({first}); "
            f"run `santa pull {repo_id}` when online, or pass a local folder"
        ) from None


_NO_NETWORK = ("Name or service not known", "Temporary failure in name resolution", "ConnectError",
               "Network is unreachable", "Connection refused", "timed out", "ConnectTimeout")
_OFFLINE_HINT = ("pass a local model folder (config.json, model.safetensors, tokenizer.json) with --model, or copy "
                 "the hub cache (~/.cache/huggingface/hub) from a machine that is online; `santa models` lists "
                 "what is here, and the bundled model always works")


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
    return sum(f.stat().st_size for f in weight_files(folder))


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
# Weight files


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder (one file, or the shards its index lists)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: malformed shard index ({exc})") from None
        names = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        # Entries name files of this folder; a path that leaves it ("../x", "/etc/y") is refused.
        bad = [n for n in names if not isinstance(n, str) or not n.endswith(".safetensors")
               or Path(n).is_absolute() or ".." in Path(n).parts]
        if bad or not names:
            raise CheckpointError(f"{index}: shard index entries must be .safetensors files inside the model "
                                  f"folder, got {bad[:3] or 'none'}")
        files = [folder / n for n in names]
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
