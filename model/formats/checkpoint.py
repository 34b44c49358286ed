"""Checkpoint I/O: fp32 weights as safetensors, config and metrics as JSON, training state via weights_only.

A checkpoint directory holds:
  model.safetensors  the (best) weights; the tied lm_head is stored once, as transformer.wte.weight
  config.json        {"kind": "fp32", "model": GPTConfig, "tokenizer": spec, "train": args}
  metrics.json       validation figures of those weights
  train_state.pt     what --resume needs: current weights, optimizer, step, RNG states (plain tensors/dicts)
Every file is written atomically (the next save removes what a killed one left), with the mode open() gives; nothing
is ever unpickled beyond plain tensors and containers, and weights that are not finite floats are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from model import atomic
from model.config import GPTConfig
from model.gpt import GPT

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SERVED_CKPT = Path("out") / "int8"  # what the app serves by default: quantize.py's default output
CKPT_ENV = "SMALLGPT_CKPT"  # names another checkpoint to serve
METRICS = "metrics.json"
TRAIN_STATE = "train_state.pt"
LOG = "log.jsonl"  # the trainer's records, one JSON object a line (read_log)
PLOT = "loss.png"  # the trainer's loss curves
TIED_KEY = "lm_head.weight"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or of the wrong kind; the message says what to do."""



def default_checkpoint() -> Path:
    """The checkpoint to serve when no --ckpt is given: $SMALLGPT_CKPT, else quantize.py's default output."""
    return Path(os.environ.get(CKPT_ENV) or SERVED_CKPT)

def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write a JSON file of a checkpoint folder, whose sole writer this process is (stale temps go)."""
    with atomic.atomic_path(path, sole_writer=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: the directory is not a complete checkpoint; train one with python train.py.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); the checkpoint is damaged, train or copy it again.") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a JSON object; the checkpoint is damaged, train or copy it again.")
    return obj


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write tensors as a safetensors file of a checkpoint folder (sole writer: stale temps go).

    Serialized in memory and written here: safetensors' save_file writes owner-only temp files of its own beside the
    target (mode 0600 after the rename; left behind by a kill under a name no cleanup can recognise)."""
    data = serialize(tensors, metadata=metadata)
    with atomic.atomic_path(path, sole_writer=True) as tmp:
        tmp.write_bytes(data)


def save_weights(path: str | Path, model: GPT) -> None:
    """Atomically save a GPT's weights (tied head once) as safetensors."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED_KEY}
    save_tensors(path, state, {"format": "pt"})


def save_config(out_dir: str | Path, config: GPTConfig, tokenizer_spec: dict[str, Any],
                train_args: dict[str, Any] | None = None, kind: str = "fp32") -> None:
    write_json(Path(out_dir) / CONFIG, {"kind": kind, "model": config.to_dict(),
                                         "tokenizer": tokenizer_spec, "train": train_args or {}})


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, with a clear error when the path is not one."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists() and atomic.aside_path(ckpt_dir).is_dir():
        raise CheckpointError(f"No checkpoint at {ckpt_dir}: a rewrite of it was interrupted, leaving the previous one at "
                              f"{atomic.aside_path(ckpt_dir)}; run python quantize.py again, which restores or replaces it.")
    if not ckpt_dir.exists():
        raise CheckpointError(f"No checkpoint at {ckpt_dir}: train one with python train.py (or pass --ckpt DIR).")
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir} is a file, not a checkpoint directory: pass the directory train.py wrote (e.g. out).")
    cfg = read_json(ckpt_dir / CONFIG)
    if "model" not in cfg or "tokenizer" not in cfg:
        raise CheckpointError(f"{ckpt_dir / CONFIG} lacks a model or tokenizer section: it is not a checkpoint of this kit.")
    return cfg


def read_model_config(ckpt_dir: str | Path) -> tuple[dict[str, Any], GPTConfig]:
    """config.json of a checkpoint directory and the GPTConfig of its model section, with a clear error for either."""
    cfg = read_config(ckpt_dir)
    try:
        return cfg, GPTConfig.from_dict(cfg["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(ckpt_dir) / CONFIG} has an invalid model config: {e}") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with a clear error when it is missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint is incomplete; train one with python train.py.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({e}); the checkpoint is damaged, train or copy it again."
        ) from None


def check_floats(state: Mapping[str, torch.Tensor], where: str, fix: str = "train or copy it again") -> None:
    """Refuse tensors that are not floating point or hold NaN/inf: load_state_dict would cast or load them silently."""
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            kind = str(t.dtype).removeprefix("torch.") if isinstance(t, torch.Tensor) else type(t).__name__
            raise CheckpointError(f"{where} holds {key} as {kind}, not floating point; the checkpoint is damaged, {fix}.")
        if not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{where} holds NaN or infinite values in {key}; the checkpoint is damaged, {fix}.")


def load_weights(model: GPT, state: dict[str, torch.Tensor], where: str) -> GPT:
    """Copy a saved state (the tied head stored once) into model; a CheckpointError if the tensors do not fit it
    or are not finite floats."""
    check_floats(state, where)
    state = dict(state)
    state.setdefault(TIED_KEY, state.get("transformer.wte.weight"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"The weights in {where} do not match its config ({first[-1].strip() if first else e}); "
                              "the checkpoint is damaged or mixed from two runs.") from None
    return model


def build_model(config: GPTConfig, state: dict[str, torch.Tensor], where: str) -> GPT:
    """A GPT of `config` holding `state`, or a CheckpointError if the tensors do not fit the shape."""
    return load_weights(GPT(config, init_weights=False), state, where)


def load_fp32(ckpt_dir: str | Path) -> tuple[GPT, dict[str, Any]]:
    """The GPT saved in a fp32 checkpoint directory (eval mode, CPU) and its config.json."""
    ckpt_dir = Path(ckpt_dir)
    cfg, config = read_model_config(ckpt_dir)
    model = build_model(config, load_state_dict(ckpt_dir / WEIGHTS), str(ckpt_dir / WEIGHTS))
    return model.eval(), cfg


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically save the resume state (plain tensors, numbers, strings, dicts and lists only); stale temps go."""
    with atomic.atomic_path(path, sole_writer=True) as tmp:
        torch.save(state, tmp)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The resume state, loaded with weights_only=True so no arbitrary object is ever unpickled."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Cannot resume: {path} does not exist; train without --resume first (same --out-dir).")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, disallowed global: all mean "not ours"
        raise CheckpointError(f"Cannot resume: {path} is damaged or not a training state of this kit ({type(e).__name__}).") from None


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run's log.jsonl (none if it is missing; a torn line is skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records
