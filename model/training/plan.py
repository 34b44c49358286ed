"""A run resolved once: the settings from the flags, the preset and a saved run, the model's shape, the tokenizer, the
tokenised text, the device and dtype, and the weights and state to start from. The trainer only builds and loops."""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.config import GPTConfig, check_memory, cpu_row
from model.cpus import available_cpus, busy_elsewhere, default_threads
from model.formats import checkpoint
from model.formats.checkpoint import CheckpointError
from model.formats.load import load
from model.gpt import GPT
from model.tokenizer import Tokenizer, load_tokenizer, padded_vocab_size
from model.training import distributed
from model.training.data import DataError, TokenData, prepare, training_tokenizer
from model.training.distributed import Dist
from model.training.settings import (
    CPU_EVAL_INTERVAL,
    FINETUNE_BLOCK_SIZE,
    SHAPE,
    TOKENS,
    ArgError,
    TrainSettings,
    check,
    layered,
)

STATE_VERSION = 1
# Settings a resumed run keeps: the architecture (the shape but dropout, which may change) and what the optimizer state
# was made for.
RESUME_FIXED = ("preset", "init_from", "tokenizer", "vocab_min_count", *(k for k in SHAPE if k != "dropout"), "optimizer",
                "muon_lr_scale")


@dataclass(frozen=True)
class Plan:
    """Everything a run needs, decided before it starts; nothing in it changes afterwards."""

    settings: TrainSettings  # every setting concrete: shape, window, evaluation interval, micro-batches
    config: GPTConfig  # the model's shape; its context may be longer than the training window (settings.block_size)
    tokenizer: Tokenizer
    data: TokenData
    created: Path | None  # the outermost folder this run created (the token cache), removed if it ends writing nothing
    dist: Dist
    device: torch.device
    dtype: torch.dtype
    weights: dict[str, torch.Tensor] | None  # the weights to start from (--init-from, --resume); None: new ones from the seed
    state: dict[str, Any] | None  # the saved training state of a resumed run
    sized_by_text: bool  # whether the cpu preset chose depth, width and dropout from the text's size
    max_epochs: float | None = None  # the passes over the text that capped max_iters (the cpu preset's size), if any


def pick_device(name: str) -> torch.device:
    """The device for --device: auto picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ArgError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgError("--device cuda was asked for but no CUDA GPU is available; use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ArgError("--device mps was asked for but MPS is not available; use --device cpu.")
    return device


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX), where bf16 autocast pays off."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype for --dtype: auto is bf16 on CUDA GPUs and CPUs that support it, else fp32."""
    if name in ("fp32", "fp16", "bf16"):
        if name == "fp16" and device.type != "cuda":
            raise ArgError("--dtype fp16 needs a CUDA GPU; use --dtype bf16 or fp32 on this device.")
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def model_config(s: TrainSettings, vocab_size: int, size: dict[str, Any]) -> GPTConfig:
    """The shape of a new model: the settings' shape over the size chosen for the text, or an ArgError saying what is wrong."""
    values = {**size, **{k: getattr(s, k) for k in SHAPE if getattr(s, k) is not None}}
    try:
        config = GPTConfig(vocab_size=vocab_size, **{k: v for k, v in values.items() if k in SHAPE})
        check_memory(config, training=True)
        return config
    except (TypeError, ValueError) as e:
        raise ArgError(f"Inconsistent model shape: {e}") from None


def saved_state(given: dict[str, Any]) -> dict[str, Any] | None:
    """With --resume, the training state saved in --out-dir (checked to be this version's); else None."""
    if not given.get("resume"):
        return None
    out_dir = Path(given.get("out_dir") or TrainSettings.out_dir)
    state = checkpoint.load_train_state(out_dir / checkpoint.TRAIN_STATE)
    saved = state.get("args") if isinstance(state, dict) else None
    if not isinstance(saved, dict) or state.get("version") != STATE_VERSION:
        raise CheckpointError(f"Cannot resume: {out_dir / checkpoint.TRAIN_STATE} is not a training state of this version; "
                              "train again without --resume.")
    for key in RESUME_FIXED:
        if given.get(key) is not None and given[key] != saved.get(key):
            raise CheckpointError(
                f"Cannot resume: the checkpoint in {out_dir} was trained with {key}={saved.get(key)!r}, not {given[key]!r} "
                "(another architecture); drop that flag to resume it, or train into another --out-dir."
            )
    return state


def prepare_data(s: TrainSettings, tokenizer: Tokenizer, dist: Dist, window: int) -> tuple[TokenData, Path | None]:
    """Tokenise --data into OUT/tokens (rank 0 first) and check both splits; on a DataError remove the folders this
    created. Returns the data and the outermost folder created (None if none)."""
    out_dir = Path(s.out_dir)
    created = next((p for p in (out_dir, out_dir / TOKENS) if not p.exists()), None)
    if not dist.master:
        dist.barrier()  # rank 0 writes the token cache first, then the others read it
    try:
        data = prepare(s.data, out_dir / TOKENS, tokenizer)
        data.check(window)
    except DataError:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    if dist.master:
        dist.barrier()
    return data, created


def settings_for(given: dict[str, Any], state: dict[str, Any] | None = None) -> TrainSettings:
    """The checked settings from the flags given over the preset's and a resumed run's saved ones (state)."""
    s = layered(given, state["args"] if state else None)
    if given.get("grad_accum") is None and state is None:  # under torchrun each process takes at least one micro-batch
        world = distributed.launched_world_size()
        s = dataclasses.replace(s, grad_accum=-(-(s.grad_accum or 1) // world) * world)
    check(s)
    return s


def resolve(given: dict[str, Any]) -> Plan:
    """The plan of a run from the flags a user gave (None or absent: not given); raises an ArgError, DataError,
    CheckpointError or TokenizerError, in one sentence, for a run that cannot work."""
    state = saved_state(given)
    s = settings_for(given, state)
    device = pick_device(s.device)
    dtype = pick_dtype(s.dtype, device)
    config, weights, tokenizer = starting_point(s, state)
    window = s.block_size or min(config.block_size, FINETUNE_BLOCK_SIZE)  # only --init-from leaves it open
    if config is not None and window > config.block_size:
        raise ArgError(f"--block-size {window} exceeds the model's context of {config.block_size} tokens; "
                       f"use at most {config.block_size}.")
    dist = distributed.setup(device, s.dist_timeout)
    device = dist.device(device)
    set_threads(s, device, dist.world_size, dist.master)
    data, created = prepare_data(s, tokenizer, dist, window)
    sized = config is None and s.preset == "cpu" and any(getattr(s, k) is None for k in ("n_layer", "n_embd", "dropout"))
    row = None
    if config is None:
        row = cpu_row(len(data.train)) if s.preset == "cpu" else None
        config = model_config(s, padded_vocab_size(tokenizer.n_vocab), row.size if row else {})
    epochs = row.cap if row is not None and sized and given.get("max_iters") is None else None
    max_iters = min(s.max_iters, epoch_steps(s, len(data.train), window, epochs)) if epochs else s.max_iters
    settings = dataclasses.replace(s, **{k: getattr(config, k) for k in SHAPE if k != "block_size"}, block_size=window,
                                   eval_interval=s.eval_interval or cpu_eval_interval(s, len(data.train), window),
                                   max_iters=max_iters)
    return Plan(settings=settings, config=config, tokenizer=tokenizer, data=data, created=created, dist=dist, device=device,
                dtype=dtype, weights=weights, state=state, sized_by_text=sized,
                max_epochs=epochs if max_iters < s.max_iters else None)


def set_threads(s: TrainSettings, device: torch.device, world_size: int, master: bool) -> None:
    """Torch's CPU threads for a run: --threads, else all the CPUs, or 1 when other processes keep them busy (under
    torchrun each process has its own threads already). Set once, by the plan."""
    if s.threads:
        torch.set_num_threads(s.threads)
    elif device.type == "cpu" and world_size == 1:
        busy = busy_elsewhere()
        torch.set_num_threads(default_threads(busy))
        if torch.get_num_threads() == 1 < available_cpus() and master:
            print(f"Other processes keep {busy:.1f} CPUs busy: training on 1 thread, which a shared CPU slows least "
                  "(--threads N to choose).", flush=True)


def starting_point(s: TrainSettings, state: dict[str, Any] | None) -> tuple[GPTConfig | None, dict[str, torch.Tensor] | None, Tokenizer]:
    """The model's shape, weights and tokenizer to start from: a resumed run's, a checkpoint's (--init-from; only its
    dropout may change), or for a new model no shape yet (it may depend on the text) and no weights."""
    if state is not None:
        config = checkpoint.parse_model_config(state["model_config"], f"{s.out_dir}/{checkpoint.TRAIN_STATE}")
        if s.dropout is not None:
            config = dataclasses.replace(config, dropout=s.dropout)
        return config, state["model"], load_tokenizer(state["tokenizer"])
    if s.init_from is not None:
        loaded = load(s.init_from)
        if not isinstance(loaded.model, GPT):
            raise CheckpointError(f"--init-from {s.init_from} holds a {loaded.kind} model, which cannot be trained; "
                                  "pass an fp32 or Hugging Face GPT-2 checkpoint directory.")
        return dataclasses.replace(loaded.config, dropout=s.dropout or 0.0), loaded.model.state_dict(), loaded.tokenizer
    model_config(s, 64, cpu_row(0).size if s.preset == "cpu" else {})  # an impossible shape fails before the text is read
    return None, None, training_tokenizer(s.tokenizer, s.data, s.vocab_min_count)


def epoch_steps(s: TrainSettings, train_tokens: int, window: int, epochs: float) -> int:
    """The optimizer steps that see the training split this many times."""
    return max(1, math.ceil(epochs * train_tokens / (s.batch_size * window * s.grad_accum)))


def cpu_eval_interval(s: TrainSettings, train_tokens: int, window: int) -> int:
    """The cpu preset's evaluation interval: about once an epoch, within CPU_EVAL_INTERVAL steps."""
    steps_per_epoch = train_tokens // (s.batch_size * window * s.grad_accum)
    return min(max(steps_per_epoch, CPU_EVAL_INTERVAL[0]), CPU_EVAL_INTERVAL[1])
