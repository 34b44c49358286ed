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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from model import atomic
from model.config import GPTConfig
from model.formats.files import CheckpointError, check_file, read_json  # noqa: F401  (re-exported: every reader uses them)
from model.gpt import GPT
from model.paths import what_is

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SERVED_CKPT = Path("out") / "int8"  # what the app serves by default: quantize.py's default output
CKPT_ENV = "SMALLGPT_CKPT"  # names another checkpoint to serve
METRICS = "metrics.json"
TRAIN_STATE = "train_state.pt"
LOG = "log.jsonl"  # the trainer's records, one JSON object a line (read_log)
PLOT = "loss.png"  # the trainer's loss curves
TIED_KEY = "lm_head.weight"
STEP_KEY = "step"  # in model.safetensors' metadata: the training step of the weights (matched with metrics.json's best_step)


def default_checkpoint() -> Path:
    """The checkpoint to serve when no --ckpt is given: $SMALLGPT_CKPT, else quantize.py's default output."""
    return Path(os.environ.get(CKPT_ENV) or SERVED_CKPT)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write a JSON file of a checkpoint folder, whose sole writer this process is (stale temps go)."""
    with atomic.atomic_path(path, sole_writer=True) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Atomically write tensors as a safetensors file of a checkpoint folder (sole writer: stale temps go).

    Serialized in memory and written here: safetensors' save_file writes owner-only temp files of its own beside the
    target (mode 0600 after the rename; left behind by a kill under a name no cleanup can recognise)."""
    data = serialize(tensors, metadata=metadata)
    with atomic.atomic_path(path, sole_writer=True) as tmp:
        tmp.write_bytes(data)


def save_weights(path: str | Path, model: GPT, step: int | None = None) -> None:
    """Atomically save a GPT's weights (tied head once) as safetensors; step (of training) goes in its metadata.

    The folder's metrics.json, which describes the weights this replaces, is removed first."""
    (Path(path).parent / METRICS).unlink(missing_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k != TIED_KEY}
    save_tensors(path, state, {"format": "pt", **({} if step is None else {STEP_KEY: str(step)})})


def config_json(config: GPTConfig, tokenizer_spec: dict[str, Any], train_args: dict[str, Any] | None = None,
                kind: str = "fp32") -> dict[str, Any]:
    """What config.json holds: the kind, the model's shape, its tokenizer and how it was trained."""
    return {"kind": kind, "model": config.to_dict(), "tokenizer": tokenizer_spec, "train": train_args or {}}


def save_config(out_dir: str | Path, config: GPTConfig, tokenizer_spec: dict[str, Any],
                train_args: dict[str, Any] | None = None, kind: str = "fp32") -> None:
    write_json(Path(out_dir) / CONFIG, config_json(config, tokenizer_spec, train_args, kind))


def save_model(out_dir: str | Path, model: GPT, tokenizer_spec: dict[str, Any], train_args: dict[str, Any],
               step: int) -> None:
    """Save a trained GPT as the fp32 checkpoint of out_dir (weights and config.json), so that at every instant, a
    kill included, the folder's files describe the same weights or are absent.

    metrics.json, which describes the weights replaced, goes first (save_weights); a config.json that differs from the
    new one (another run's) goes before the weights are replaced, and the new one is written after them."""
    out_dir = Path(out_dir)
    new = config_json(model.config, tokenizer_spec, train_args)
    try:
        current = json.loads((out_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        current = None
    if current != json.loads(json.dumps(new)):  # compared as JSON: tuples come back as lists
        (out_dir / CONFIG).unlink(missing_ok=True)
    save_weights(out_dir / WEIGHTS, model, step)
    save_config(out_dir, model.config, tokenizer_spec, train_args)


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, with a clear error when the path is not one."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists() and atomic.aside_path(ckpt_dir).is_dir():
        raise CheckpointError(f"No checkpoint at {ckpt_dir}: a rewrite of it was interrupted, leaving the previous one at "
                              f"{atomic.aside_path(ckpt_dir)}; run python quantize.py again, which restores or replaces it.")
    problem = what_is(ckpt_dir, "folder")
    if problem == "does not exist":
        raise CheckpointError(f"No checkpoint at {ckpt_dir}: train one with python train.py (or pass --ckpt DIR).")
    if problem == "is a file, not a folder":
        raise CheckpointError(f"{ckpt_dir} is a file, not a checkpoint directory: pass the directory train.py wrote (e.g. out).")
    if problem:
        raise CheckpointError(f"{ckpt_dir} {problem}: pass the checkpoint directory train.py wrote (e.g. out).")
    cfg = read_json(ckpt_dir / CONFIG)
    if "model" not in cfg or "tokenizer" not in cfg:
        raise CheckpointError(f"{ckpt_dir / CONFIG} lacks a model or tokenizer section: it is not a checkpoint of this kit.")
    return cfg


def read_model_config(ckpt_dir: str | Path) -> tuple[dict[str, Any], GPTConfig]:
    """config.json of a checkpoint directory and the GPTConfig of its model section, with a clear error for either."""
    cfg = read_config(ckpt_dir)
    return cfg, parse_model_config(cfg["model"], str(Path(ckpt_dir) / CONFIG))


def parse_model_config(section: Any, where: str) -> GPTConfig:
    """The GPTConfig of a saved model section (of config.json or train_state.pt), checked to fit this machine's
    memory, or a CheckpointError naming where it came from."""
    try:
        return GPTConfig.from_dict(section)
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{where} has an invalid model config: {e}") from None


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, with a clear error when it is missing or corrupt."""
    path = Path(path)
    check_file(path)
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


def weights_step(path: str | Path) -> int | None:
    """The training step recorded in a safetensors file's metadata (None: not recorded, or not readable)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})[STEP_KEY])
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def read_metrics(ckpt_dir: str | Path, model: GPT) -> dict[str, Any] | None:
    """metrics.json of an fp32 checkpoint (None if it has none), or a CheckpointError when it describes other weights
    than the model loaded from the folder: another parameter count, or another step than model.safetensors records."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / METRICS).exists():
        return None
    metrics = read_json(ckpt_dir / METRICS)
    found = []
    if "params" in metrics and metrics["params"] != model.num_params():
        found.append(f"{metrics['params']!r} parameters, the model {model.num_params():,}")
    step = weights_step(ckpt_dir / WEIGHTS)
    if "best_step" in metrics and step is not None and metrics["best_step"] != step:
        found.append(f"the weights of step {metrics['best_step']!r}, {WEIGHTS} those of step {step}")
    if found:
        raise CheckpointError(f"{ckpt_dir / METRICS} describes other weights than {ckpt_dir / WEIGHTS} ({'; '.join(found)}): "
                              f"the folder mixes two runs; delete {METRICS} to use the weights without it, or train again.")
    return metrics


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    """Atomically save the resume state (plain tensors, numbers, strings, dicts and lists only); stale temps go."""
    with atomic.atomic_path(path, sole_writer=True) as tmp:
        torch.save(state, tmp)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """The resume state, loaded with weights_only=True so no arbitrary object is ever unpickled.

    First the folder's files lose the temps that killed writes left (a kill during a first save leaves no state to
    resume, so no later save of this run would remove them)."""
    path = Path(path)
    for name in (WEIGHTS, CONFIG, METRICS, path.name):
        atomic.remove_stale_temps(path.with_name(name))
    problem = what_is(path)
    if problem == "does not exist":
        raise CheckpointError(f"Cannot resume: {path} does not exist; train without --resume first (same --out-dir).")
    if problem:
        raise CheckpointError(f"Cannot resume: {path} {problem}; move it away and train without --resume, or pass another "
                              "--out-dir.")
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
