"""User settings: a TOML file in the platform config dir, overridden by env and flags.

Precedence: command-line flag > environment (SANTA_MODEL) > config file > built-in default.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from santacli.catalog import BUNDLED_ALIAS
from santacli.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def config_path() -> Path:
    """SANTA_CONFIG, else e.g. ~/.config/santa/config.toml."""
    env = os.environ.get("SANTA_CONFIG")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("santa")) / "config.toml"


@dataclass(frozen=True)
class Settings:
    """Defaults for every command; each may be set in config.toml under the same name.

    The one place santa's defaults are written: completion options and the server start here.
    """

    model: str | None = None  # None: nothing configured (the bundled model, with a hint)
    device: str | None = None
    dtype: str | None = None
    attention: str = "auto"
    quantize: str | None = None
    decode: str = "auto"
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    mode: str = "auto"
    fim_mode: str = "psm"
    use_filename: bool = True
    speculate: str = "auto"  # speculative decoding from the prompt: "auto", "off" or a draft length "N"
    context_tokens: int = 512  # most prompt tokens for snippets of other files (0: none); see santacli.context
    hint: bool = True  # the one-line hint about real models when the bundled one is used
    max_queue: int = 16  # santa serve: requests that may wait while one runs (more get 503)
    daemon: str = "use"  # the per-user daemon: "use" it when running, "auto"-start it, or "off"
    daemon_idle_minutes: float = 30.0  # a daemon started by santa exits after this long unused

    @property
    def resolved_model(self) -> str:
        return self.model or BUNDLED_ALIAS


DAEMON_MODES = ("use", "auto", "off")

# Accepted TOML value types per field annotation ("str | None" counts as str).
_TOML_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "bool": (bool,)}


def load_settings(path: Path | None = None) -> Settings:
    """Read the config file (missing is fine) and SANTA_MODEL.

    Raises:
        UsageError: the file is not valid TOML or has unknown keys / wrong types.
    """
    path = path or config_path()
    values: dict[str, Any] = {}
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"{path}: cannot read config ({exc})") from None
        known = {f.name: f for f in fields(Settings)}
        for key, value in data.items():
            if key not in known:
                raise UsageError(f"{path}: unknown setting {key!r}; known: {', '.join(known)}")
            expected = _TOML_TYPES.get(str(known[key].type).split(" ")[0], (str,))
            if not isinstance(value, expected) or (int in expected and isinstance(value, bool)):
                raise UsageError(f"{path}: setting {key!r} has the wrong type ({value!r})")
            values[key] = value
    env_model = os.environ.get("SANTA_MODEL")
    if env_model:
        values["model"] = env_model
    if os.environ.get("SANTA_DAEMON"):
        values["daemon"] = os.environ["SANTA_DAEMON"]
    if values.get("daemon", "use") not in DAEMON_MODES:
        raise UsageError(f"daemon must be one of {', '.join(DAEMON_MODES)}, got {values['daemon']!r}")
    if os.environ.get("SANTA_NO_HINT"):
        values["hint"] = False
    return Settings(**values)
