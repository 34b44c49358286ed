"""The Gradio app, one module per concern: pool (the model copies, their batchers and their card), checks (request
limits and value checks), streaming (running the model), generate_tab and train_tab (the two tabs, only the page),
visitors (every visitor's job, model and choice of model, by session), training_job (one training run in a child
process), server (the page and launch). The CPU share is model/cpus.py.

Importing the package loads none of them, so it stays free of gradio until app.py's names are used: they load their
module on first use."""

from __future__ import annotations

import importlib
import os
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the app never calls home; set before any module imports gradio

_EXPORTS = {"ModelPool": "pool", "launch": "server"}  # what app.py imports from model.webapp
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
