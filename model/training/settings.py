"""Training settings: one frozen dataclass whose fields are the CLI flags (help in each field's metadata), the one preset
table, and the checks that need no data. model/training/plan.py resolves them, with the text, into a run's plan."""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import MLP_KINDS, PRESET_SHAPES
from model.generation.sampling import SEED_MAX
from model.paths import cannot_write, what_is
from model.training import distributed
from model.training.optim import OPTIMIZERS

DATA, MODEL, SCHEDULE, EVAL, RUN = "data and output", "model (a new model; --init-from and --resume take the checkpoint's shape)", \
    "schedule and optimizer", "evaluation and logging", "run"
SHAPE = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "rotary", "mlp", "qk_norm")  # fields that are GPTConfig's
TOKENS = "tokens"  # the token cache inside --out-dir
FINETUNE_BLOCK_SIZE = 256  # --init-from trains on windows of at most this many tokens unless --block-size says otherwise


class ArgError(ValueError):
    """Training settings that cannot work together; the message says which and what to do."""


def setting(default: Any, help: str, group: str, **argparse_kw: Any) -> Any:
    """A settings field: its default, and its flag's help text and argparse options."""
    return field(default=default, metadata={"help": help, "group": group, **argparse_kw})


@dataclass(frozen=True)
class TrainSettings:
    """Every training knob, each a flag of train.py. None means "decided by the run": the preset, the text's size or
    the checkpoint (see model/training/plan.py). The non-None defaults hold for every preset unless PRESETS says otherwise."""

    data: str = setting("input.txt", "training text, UTF-8; the last 10%% is the validation split", DATA)
    out_dir: str = setting("out", "checkpoint directory; the token cache goes in OUT/tokens", DATA)
    tokenizer: str = setting("gpt2-compact", "tokenizer of a new model: gpt2-compact (GPT-2's BPE cut to the tokens the text "
                             "uses), gpt2 or bytes", DATA, choices=["gpt2-compact", "gpt2", "bytes"])
    vocab_min_count: int = setting(5, "gpt2-compact keeps the GPT-2 tokens the training split uses at least this often, "
                                   "plus their BPE pieces and the 256 bytes", DATA)
    preset: str = setting("cpu", "model shape and its training defaults: cpu (sized by the text, for a CPU), tiny or gpt2",
                          MODEL, choices=["cpu", "tiny", "gpt2"])
    init_from: str | None = setting(None, "finetune the model of this checkpoint directory (its config and tokenizer)", MODEL,
                                    metavar="DIR")
    teacher: tuple[str, ...] | None = setting(None, "distil from these trained checkpoints of the same text and tokenizer: "
                                              "the student learns their mean distribution of the next token beside the text's",
                                              MODEL, nargs="+", metavar="DIR", type=str)
    n_layer: int | None = setting(None, "number of layers (default: the preset's, sized by the text for cpu)", MODEL)
    n_head: int | None = setting(None, "number of attention heads (default: the preset's)", MODEL)
    n_embd: int | None = setting(None, "width, a multiple of --n-head (default: the preset's, sized by the text for cpu)", MODEL)
    block_size: int | None = setting(None, "training window in tokens (default: the preset's context, at most that; "
                                     f"--init-from: min(context, {FINETUNE_BLOCK_SIZE}))", MODEL)
    dropout: float | None = setting(None, "dropout probability (default: the preset's, sized by the text for cpu; 0 for "
                                    "--init-from)", MODEL)
    rotary: bool | None = setting(None, "rotary position embeddings instead of learned ones (--no-rotary: GPT-2's)", MODEL)
    mlp: str | None = setting(None, "MLP activation: relu2 (ReLU squared) or gelu (GPT-2's)", MODEL, choices=list(MLP_KINDS))
    qk_norm: bool | None = setting(None, "RMS-normalise queries and keys per head before attention", MODEL)
    max_iters: int = setting(8000, "optimizer steps at most", SCHEDULE)
    max_minutes: float = setting(9.5, "total wall-clock budget in minutes, start-up and final evaluation included; the LR "
                                 "decay ends exactly at the budget; 0 = none", SCHEDULE)
    batch_size: int = setting(16, "sequences per micro-batch, per process under torchrun", SCHEDULE)
    grad_accum: int | None = setting(None, "micro-batches per optimizer step, all processes together: under torchrun a "
                                     "multiple of the process count, split among them (default 1, under torchrun the "
                                     "process count)", SCHEDULE)
    optimizer: str = setting("adamw", "adamw, or muon for the blocks' matrices (AdamW for embeddings, biases and gains)",
                             SCHEDULE, choices=list(OPTIMIZERS))
    lr: float = setting(2e-3, "peak learning rate", SCHEDULE)
    muon_lr_scale: float = setting(1.0, "--optimizer muon: Muon's learning rate is the schedule's times this (at 1, "
                                   "AdamW's update size); its weight decay per step stays the same", SCHEDULE)
    min_lr: float = setting(2e-4, "learning rate at the end of the decay", SCHEDULE)
    warmup_iters: int = setting(50, "steps of linear warmup", SCHEDULE)
    weight_decay: float = setting(0.1, "weight decay of matrices and embeddings", SCHEDULE)
    beta1: float = setting(0.9, "AdamW beta1", SCHEDULE)
    beta2: float = setting(0.99, "AdamW beta2", SCHEDULE)
    grad_clip: float = setting(1.0, "clip gradients to this global norm, 0 = off", SCHEDULE)
    eval_interval: int | None = setting(None, "evaluate (and keep the best weights) every N steps (default: the preset's; "
                                        "cpu: 200, or about once an epoch on a small text)", EVAL)
    eval_windows: int = setting(1024, "each evaluation scores the whole validation split when it has at most this many "
                                "windows of the model's context, else this many evenly spaced ones", EVAL)
    patience: int = setting(0, "stop early after this many evaluations in a row without a new best (0 = never)", EVAL)
    log_interval: int = setting(10, "write a train-loss record to log.jsonl every N steps", EVAL)
    seed: int = setting(1337, "random seed of the initial weights and of the batches, 0 to 2**64 - 1", RUN)
    device: str = setting("auto", "auto (CUDA if present, else CPU), cpu, cuda or cuda:N", RUN)
    dtype: str = setting("auto", "autocast precision: auto = bf16 on CUDA and on CPUs with native bf16, else fp32; "
                         "fp16 is CUDA-only", RUN, choices=["auto", "bf16", "fp16", "fp32"])
    threads: int | None = setting(None, "CPU threads for torch (default: all cores, or 1 when other processes keep a core "
                                  "busy at the start: a shared CPU slows 1 thread least)", RUN)
    compile: bool = setting(False, "torch.compile the model (slow start, faster steps)", RUN)
    dist_timeout: float = setting(distributed.DEFAULT_TIMEOUT_MINUTES, "torchrun: minutes a process waits for a silent "
                                  "peer before the run fails with an error", RUN)
    resume: bool = setting(False, "continue the run saved in --out-dir exactly where it stopped; flags given now override "
                           "the saved ones (not the model shape)", RUN)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


NAMES = tuple(f.name for f in dataclasses.fields(TrainSettings))

# The one preset table: what each preset changes of the TrainSettings defaults, its model shape (model/config.py's
# PRESET_SHAPES) included. "cpu" is `python train.py`: tuned for the best val nats/char in 10 minutes on 2 CPU cores
# (docs/training-results.md), its width, depth and dropout then sized by the text (CPU_SIZES).
PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {**PRESET_SHAPES["cpu"], "optimizer": "muon", "patience": 6},
    "tiny": {**PRESET_SHAPES["tiny"], "tokenizer": "gpt2", "eval_interval": 50, "warmup_iters": 20},
    "gpt2": {**PRESET_SHAPES["gpt2"], "tokenizer": "gpt2", "batch_size": 8, "grad_accum": 8, "lr": 6e-4, "min_lr": 6e-5,
             "warmup_iters": 200, "beta2": 0.95, "max_minutes": 0.0, "eval_interval": 200},
}
# Finetuning with --init-from: these over the TrainSettings defaults (the shape is the checkpoint's).
FINETUNE: dict[str, Any] = {"lr": 3e-5, "min_lr": 3e-6, "warmup_iters": 5, "dropout": 0.0, "batch_size": 8, "eval_interval": 50,
                            "max_iters": 500}
CPU_EVAL_INTERVAL = (25, 200)  # cpu: evaluate about once an epoch, within these steps


def layered(given: dict[str, Any], saved: dict[str, Any] | None = None) -> TrainSettings:
    """The settings from the defaults, then the preset's (or finetuning's), then a resumed run's saved ones, then the
    flags given; keys not given (or None) keep what is below them."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(given) - set(NAMES)
    if unknown:
        raise ArgError(f"Unknown training settings: {', '.join(sorted(unknown))}.")
    name = given.get("preset", (saved or {}).get("preset", TrainSettings.preset))
    if name not in PRESETS:
        raise ArgError(f"Unknown preset {name!r}; choose one of: {', '.join(PRESETS)}.")
    base = FINETUNE if given.get("init_from", (saved or {}).get("init_from")) else PRESETS[name]
    saved = {k: v for k, v in (saved or {}).items() if k in NAMES}
    return TrainSettings(**{**base, **saved, **given})


def check(s: TrainSettings) -> None:
    """Raise an ArgError, in one sentence, for settings that cannot work, before anything is read or written (whether
    --out-dir can be written is tried with an empty file, removed at once)."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")
    for f in dataclasses.fields(TrainSettings):
        value = getattr(s, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ArgError(f"{flag(f.name)} must be a finite number, got {value}.")
        if "choices" in f.metadata and value is not None and value not in f.metadata["choices"]:
            raise ArgError(f"{flag(f.name)} must be one of {', '.join(f.metadata['choices'])}, got {value!r}.")
    for name in ("max_iters", "eval_interval", "eval_windows", "log_interval", "batch_size", "grad_accum", "vocab_min_count",
                 "threads", "block_size"):
        if getattr(s, name) is not None and getattr(s, name) < 1:
            raise ArgError(f"{flag(name)} must be at least 1, got {getattr(s, name)}.")
    for name in ("warmup_iters", "max_minutes", "grad_clip", "weight_decay", "min_lr", "patience"):
        if getattr(s, name) < 0:
            raise ArgError(f"{flag(name)} must not be negative, got {getattr(s, name)}.")
    if not s.lr > 0:
        raise ArgError(f"--lr must be positive, got {s.lr}.")
    if not (s.muon_lr_scale > 0 and math.isfinite(s.muon_lr_scale)):
        raise ArgError(f"--muon-lr-scale must be a positive number, got {s.muon_lr_scale}.")
    if s.min_lr > s.lr:
        raise ArgError(f"--min-lr ({s.min_lr}) must not exceed --lr ({s.lr}).")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(s, name) < 1.0:
            raise ArgError(f"--{name} must be in [0, 1), got {getattr(s, name)}.")
    if s.dropout is not None and not 0.0 <= s.dropout < 1.0:
        raise ArgError(f"--dropout must be in [0, 1), got {s.dropout}.")
    if not 0 <= s.seed <= SEED_MAX:
        raise ArgError(f"--seed must be an integer from 0 to {SEED_MAX} (2**64 - 1), got {s.seed}.")
    if not s.dist_timeout > 0:
        raise ArgError(f"--dist-timeout must be positive, got {s.dist_timeout}.")
    out = Path(s.out_dir)
    problem = what_is(out, "folder")
    if problem and not problem.startswith(("does not exist", "is a file")):  # those two are said below
        raise ArgError(f"--out-dir {out} {problem}; pass the path of a directory (it is created if missing).")
    existing = next(p for p in (out, *out.parents) if p.exists())  # the nearest part of the path that is already there
    if not existing.is_dir():
        what = f"--out-dir {out} is a file" if existing == out else f"--out-dir {out} cannot be created: {existing} is a file"
        raise ArgError(f"{what}, not a directory; pass the path of a directory (it is created if missing).")
    problem = cannot_write(out)
    if problem:
        raise ArgError(f"--out-dir {out} {problem}; pass a directory you can write to.")
    problem = cannot_write(out / TOKENS)  # a token cache already there (made by another user's run, say)
    if problem:
        raise ArgError(f"The token cache {out / TOKENS} {problem}; delete it (train.py makes it again) or pass another --out-dir.")
    world = distributed.launched_world_size()
    if s.grad_accum is not None and s.grad_accum % world:
        raise ArgError(f"--grad-accum {s.grad_accum} (micro-batches per optimizer step, all processes together) cannot be "
                       f"split evenly over {world} processes; use a multiple of {world}.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainSettings field, grouped, with the field's help and default; a flag not given is absent from
    the parsed namespace (argparse.SUPPRESS), so the run can tell given flags from defaults."""
    hints = typing.get_type_hints(TrainSettings)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(TrainSettings):
        meta = dict(f.metadata)
        name = meta.pop("group")
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        kind = next(t for t in typing.get_args(hints[f.name]) or (hints[f.name],) if t is not type(None))
        help_text = meta.pop("help")
        if f.default is not None and "(default" not in help_text:
            help_text += f" (default {f.default:g})" if isinstance(f.default, float) else f" (default {f.default})"
        kw: dict[str, Any] = {"help": help_text, "default": argparse.SUPPRESS, **meta}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.setdefault("type", kind)
        groups[name].add_argument("--" + f.name.replace("_", "-"), **kw)
