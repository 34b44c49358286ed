"""A small GPT kit: model, tokenizer, data, training, quantization and generation for one text file.

The names below are imported on first use (PEP 562), not with the package: importing one submodule, such as the
NumPy forward pass (model.numpy_gpt) or the config (model.config), then imports only what that submodule needs, and
no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports them
    from model.config import GPTConfig
    from model.formats.load import Loaded, load
    from model.gpt import GPT
    from model.tokenizer import Tokenizer, load_tokenizer
    from model.training.settings import PRESETS

_HOMES = {"GPT": "model.gpt", "GPTConfig": "model.config", "PRESETS": "model.training.settings", "Loaded": "model.formats.load",
          "load": "model.formats.load", "Tokenizer": "model.tokenizer", "load_tokenizer": "model.tokenizer"}
__all__ = ["GPT", "GPTConfig", "PRESETS", "Loaded", "load", "Tokenizer", "load_tokenizer"]


def __getattr__(name: str) -> Any:
    """model.GPT and the other names of __all__, imported from their module the first time one is asked for."""
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")
