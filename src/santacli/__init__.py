"""santa: code completion and fill-in-the-middle with BigCode's GPTBigCode models."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

# torch warns on every import when NumPy is absent, which santa does not need: not on stderr.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

__version__ = "0.1.0"
__all__ = ["Engine", "__version__"]

if TYPE_CHECKING:
    from santacli.engine import Engine


def __getattr__(name: str) -> object:
    # Lazy: `import santacli` (and `santa --help`) must not import torch.
    if name == "Engine":
        from santacli.engine import Engine

        return Engine
    raise AttributeError(name)
