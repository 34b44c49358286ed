"""A checkpoint folder's plain files read without torch, and the error every checkpoint reader raises: the NumPy
forward (model/numpy_gpt.py) reads checkpoints through here as model/formats/checkpoint.py does."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from model.paths import what_is


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or of the wrong kind; the message says what to do."""


def check_file(path: Path) -> None:
    """A CheckpointError unless path is a file: missing (an incomplete checkpoint), or something else (a damaged one)."""
    problem = what_is(path)
    if problem == "does not exist":
        raise CheckpointError(f"{path} is missing: the directory is not a complete checkpoint; train one with python train.py.")
    if problem:
        raise CheckpointError(f"{path} {problem}; the checkpoint is damaged, train or copy it again.")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object of a checkpoint folder, or a CheckpointError saying what is wrong with the file."""
    path = Path(path)
    check_file(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged, train or copy it again.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the checkpoint is damaged, train or copy it again.")
    return obj
