"""The training loop: settings and their defaults, the model to train, the step loop, evaluation and checkpoints.

Data-parallel under torchrun (see model/distributed.py): every rank draws the same global micro-batch and trains on its
own slice, the gradient accumulation micro-steps are split across ranks (all but the last under DDP's no_sync), rank 0
takes every clock-based decision for all, and only rank 0 evaluates, prints and writes (the methods marked "I/O").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import atomic, checkpoint, distributed
from .checkpoint import CheckpointError
from .config import PRESETS, GPTConfig, preset
from .data import DataError, TokenData, get_batch, prepare, training_tokenizer, val_windows
from .evaluate import evaluate
from .generate import SamplingConfig, generate
from .gpt import GPT
from .load import load
from .optim import clip_grads, lr_at, make_optimizer, set_lr, warmup_frac
from .plot import plot_losses
from .tokenizer import Tokenizer, load_tokenizer, padded_vocab_size

WARMUP_BUDGET_SHARE = 0.05  # with a time budget, warmup ends after this share of the training time at the latest
LOG = "log.jsonl"
PLOT = "loss.png"
TOKENS = "tokens"
STATE_VERSION = 1
LOG_EVERY_S = 5.0  # log.jsonl is also rewritten this often between evaluations, so live views (the app) follow
SAMPLE_TOKENS = 48  # a short sample written with every evaluation: what the model writes by now (the app shows it)


class ArgError(ValueError):
    """Training settings that cannot work together; the message says which and what to do."""


class TrainingDiverged(RuntimeError):
    """A loss went NaN or infinite; the message says which checkpoint was kept and what to do."""


@dataclass
class TrainArgs:
    """Every training knob. The field defaults are those of the default "cpu" preset: change them here, once."""

    data: str = "input.txt"
    out_dir: str = "out"
    preset: str = "cpu"
    init_from: str | None = None  # a checkpoint directory model.load can read: finetune it
    tokenizer: str = "gpt2-compact"  # GPT-2 BPE cut to the training text's tokens: see docs/training-results.md
    vocab_min_count: int = 5  # gpt2-compact keeps the GPT-2 tokens used at least this often in the training split
    n_layer: int | None = None  # None: the preset's
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None  # training window; None: the preset's context (init-from: min(context, 256))
    dropout: float | None = None
    max_iters: int = 8000
    max_minutes: float = 9.5  # total wall-clock budget including the final evaluation (a margin under 10); 0 = no budget
    eval_interval: int = 200
    eval_windows: int = 1024  # each eval scores the whole validation split if it has at most this many windows, else this many
    log_interval: int = 10
    batch_size: int = 16
    grad_accum: int = 1  # all processes together; not given under torchrun: rounded up to a multiple of the process count
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_iters: int = 50
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    threads: int | None = None  # CPU threads for torch; None: torch's default (all cores)
    resume: bool = False
    dist_timeout: float = distributed.DEFAULT_TIMEOUT_MINUTES  # torchrun: minutes a rank waits for a silent peer before failing


# Overrides of the TrainArgs defaults for the other presets, and for finetuning with --init-from.
PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "tiny": {"tokenizer": "gpt2", "batch_size": 16, "eval_interval": 50, "warmup_iters": 20},
    "gpt2": {"tokenizer": "gpt2", "batch_size": 8, "grad_accum": 8, "lr": 6e-4, "min_lr": 6e-5, "warmup_iters": 200, "beta2": 0.95,
             "max_minutes": 0.0},
}
FINETUNE_DEFAULTS: dict[str, Any] = {"lr": 3e-5, "min_lr": 3e-6, "warmup_iters": 5, "dropout": 0.0, "batch_size": 8,
                                     "eval_interval": 50, "max_iters": 500}
FINETUNE_BLOCK_SIZE = 256
SHAPE_KEYS = ("preset", "init_from", "tokenizer", "vocab_min_count", "n_layer", "n_head", "n_embd", "block_size")
FLOAT_KEYS = ("max_minutes", "lr", "min_lr", "weight_decay", "beta1", "beta2", "grad_clip", "dropout", "dist_timeout")


def resolve_args(given: dict[str, Any]) -> tuple[TrainArgs, dict[str, Any] | None]:
    """Settings from the flags a user gave (None = not given) over the defaults; with resume, over the saved run's.

    Returns the settings and, when resuming, the loaded training state.
    """
    given = {k: v for k, v in given.items() if v is not None}
    names = {f.name for f in dataclasses.fields(TrainArgs)}
    unknown = set(given) - names
    if unknown:
        raise ArgError(f"Unknown training settings: {', '.join(sorted(unknown))}.")
    if given.get("resume"):
        out_dir = Path(given.get("out_dir", TrainArgs.out_dir))
        state = checkpoint.load_train_state(out_dir / checkpoint.TRAIN_STATE)
        saved = state.get("args") if isinstance(state, dict) else None
        if not isinstance(saved, dict) or state.get("version") != STATE_VERSION:
            raise CheckpointError(f"Cannot resume: {out_dir / checkpoint.TRAIN_STATE} is not a training state of this version; "
                                  "train again without --resume.")
        for key in SHAPE_KEYS:
            if key in given and given[key] != saved.get(key):
                raise CheckpointError(
                    f"Cannot resume: the checkpoint in {out_dir} was trained with {key}={saved.get(key)!r}, not {given[key]!r} "
                    "(another architecture); drop that flag to resume it, or train into another --out-dir."
                )
        return TrainArgs(**{**{k: v for k, v in saved.items() if k in names}, **given}), state
    base = FINETUNE_DEFAULTS if given.get("init_from") else PRESET_DEFAULTS.get(given.get("preset", TrainArgs.preset), {})
    args = TrainArgs(**{**base, **given})
    if "grad_accum" not in given:  # under torchrun each process takes at least one micro-batch per step, as in nanoGPT
        world = distributed.launched_world_size()
        args.grad_accum = -(-args.grad_accum // world) * world
    return args, None


def check_args(args: TrainArgs) -> None:
    """Raise an ArgError for settings that cannot work, before anything is read or written."""
    if args.preset not in PRESETS:
        raise ArgError(f"Unknown preset {args.preset!r}; choose one of: {', '.join(PRESETS)}.")
    for name in FLOAT_KEYS:
        if getattr(args, name) is not None and not math.isfinite(getattr(args, name)):
            raise ArgError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}.")
    for name in ("max_iters", "eval_interval", "eval_windows", "log_interval", "batch_size", "grad_accum", "vocab_min_count"):
        if getattr(args, name) < 1:
            raise ArgError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    for name in ("warmup_iters", "max_minutes", "grad_clip", "weight_decay", "min_lr"):
        if getattr(args, name) < 0:
            raise ArgError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}.")
    if not args.lr > 0:
        raise ArgError(f"--lr must be positive, got {args.lr}.")
    if args.min_lr > args.lr:
        raise ArgError(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr}).")
    for name in ("beta1", "beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ArgError(f"--{name} must be in [0, 1), got {getattr(args, name)}.")
    out = Path(args.out_dir)
    existing = next(p for p in (out, *out.parents) if p.exists())  # the nearest part of the path that is already there
    if not existing.is_dir():
        what = f"--out-dir {out} is a file" if existing == out else f"--out-dir {out} cannot be created: {existing} is a file"
        raise ArgError(f"{what}, not a directory; pass the path of a directory (it is created if missing).")
    world = distributed.launched_world_size()
    if args.grad_accum % world:
        raise ArgError(f"--grad-accum {args.grad_accum} (micro-batches per optimizer step, all processes together) cannot be "
                       f"split evenly over {world} processes; use a multiple of {world}.")
    if not args.dist_timeout > 0:
        raise ArgError(f"--dist-timeout must be positive, got {args.dist_timeout}.")
    if args.threads is not None and args.threads < 1:
        raise ArgError(f"--threads must be at least 1, got {args.threads}.")
    if args.block_size is not None and args.block_size < 1:
        raise ArgError(f"--block-size must be at least 1, got {args.block_size}.")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        raise ArgError(f"--dropout must be in [0, 1), got {args.dropout}.")
    if args.dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise ArgError(f"--dtype must be auto, bf16, fp16 or fp32, got {args.dtype!r}.")
    device = pick_device(args.device)
    if args.dtype == "fp16" and device.type != "cuda":
        raise ArgError("--dtype fp16 needs a CUDA GPU; use --dtype bf16 or fp32 on this device.")
    if args.init_from is None:
        fresh_config(args, vocab_size=64)  # raises on an impossible shape


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
    if name == "fp32":
        return torch.float32
    if name == "fp16":
        return torch.float16
    if name == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def fresh_config(args: TrainArgs, vocab_size: int) -> GPTConfig:
    """The shape of a new model: the preset with the user's overrides, or an ArgError saying what is wrong."""
    base = preset(args.preset)
    if args.block_size is not None and args.block_size > base.block_size:
        raise ArgError(f"--block-size {args.block_size} exceeds the {base.block_size} positions of preset {args.preset!r}; "
                       f"use at most {base.block_size} or a larger preset.")
    overrides = {k: getattr(args, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout") if getattr(args, k) is not None}
    try:
        return dataclasses.replace(base, vocab_size=vocab_size, **overrides)
    except ValueError as e:
        raise ArgError(f"Inconsistent model shape: {e}") from None


def build(args: TrainArgs, state: dict[str, Any] | None) -> tuple[GPT, GPTConfig, Tokenizer]:
    """The model to train (fp32, CPU), its config and tokenizer: resumed, finetuned from --init-from, or new."""
    if state is not None:
        config = GPTConfig.from_dict(state["model_config"])
        if args.dropout is not None:
            config = dataclasses.replace(config, dropout=args.dropout)
        model = checkpoint.build_model(config, state["model"], f"{args.out_dir}/{checkpoint.TRAIN_STATE}")
        tokenizer = load_tokenizer(state["tokenizer"])
    elif args.init_from is not None:
        loaded = load(args.init_from)
        args.n_layer = args.n_head = args.n_embd = None  # the checkpoint's shape; only dropout may change
        if not isinstance(loaded.model, GPT):
            raise CheckpointError(f"--init-from {args.init_from} holds a {loaded.kind} model, which cannot be trained; "
                                  "pass an fp32 or Hugging Face GPT-2 checkpoint directory.")
        config = dataclasses.replace(loaded.config, dropout=args.dropout or 0.0)
        model = checkpoint.build_model(config, loaded.model.state_dict(), args.init_from)
        tokenizer = loaded.tokenizer
        if args.block_size is None:
            args.block_size = min(config.block_size, FINETUNE_BLOCK_SIZE)
    else:
        tokenizer = training_tokenizer(args.tokenizer, args.data, args.vocab_min_count)
        config = fresh_config(args, padded_vocab_size(tokenizer.n_vocab))
        torch.manual_seed(args.seed)
        model = GPT(config)
    if args.block_size is None:
        args.block_size = config.block_size
    if args.block_size > config.block_size:
        raise ArgError(f"--block-size {args.block_size} exceeds the model's context of {config.block_size} tokens; "
                       f"use at most {config.block_size}.")
    return model, config, tokenizer


def prepare_data(args: TrainArgs, tokenizer: Tokenizer) -> tuple[TokenData, Path | None]:
    """Tokenise --data into OUT/tokens and check both splits; on a DataError remove the folders this call created.

    Returns the data and the outermost folder this call created (None if none), for a run that ends writing nothing.
    """
    out_dir = Path(args.out_dir)
    created = next((p for p in (out_dir, out_dir / TOKENS) if not p.exists()), None)
    try:
        data = prepare(args.data, out_dir / TOKENS, tokenizer)
        data.check(args.block_size)
    except DataError:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return data, created


class Trainer:
    """One training run: holds the model, optimizer, data and counters; run() trains and writes the checkpoint."""

    def __init__(self, args: TrainArgs, state: dict[str, Any] | None = None, t_start: float | None = None):
        self.t_start = time.perf_counter() if t_start is None else t_start
        check_args(args)
        self.args = args
        device = pick_device(args.device)
        self.dist = distributed.setup(device, args.dist_timeout)
        self.device = self.dist.device(device)
        self.dtype = pick_dtype(args.dtype, self.device)
        self.master = self.dist.master  # rank 0: the only process that evaluates, prints and writes files
        self.micro_steps = args.grad_accum // self.dist.world_size  # this rank's share of the micro-batches per step
        if args.threads:
            torch.set_num_threads(args.threads)
        model, self.config, self.tokenizer = build(args, state)
        if not self.master:
            self.dist.barrier()  # rank 0 writes the token cache first, then the others read it
        self.data, self.created = prepare_data(args, self.tokenizer)
        # Whether each evaluation scores the whole split: then the best one is already the final score.
        self.evals_whole = len(val_windows(self.data.val, self.config.block_size)) <= args.eval_windows
        if self.master:
            self.dist.barrier()
        self.out = Path(args.out_dir)
        self.raw_model = model.to(self.device)
        self.model = torch.compile(self.raw_model) if args.compile else self.raw_model
        if self.dist.enabled:
            with distributed.peer_errors():  # DDP starts by broadcasting rank 0's weights
                self.model = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = make_optimizer(self.raw_model, args.lr, args.weight_decay, (args.beta1, args.beta2), self.device.type)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.batch_gen = torch.Generator().manual_seed(args.seed)
        self.tokens_per_step = args.batch_size * args.block_size * args.grad_accum  # all ranks together
        self.step, self.tokens_seen, self.elapsed_before = 0, 0, 0.0
        self.t_loop: float | None = None  # elapsed seconds when the first training step started
        self.t_warm: float | None = None  # elapsed seconds when warmup ended (time-budget decay starts there)
        self.best_val, self.best_step = math.inf, -1
        self.best_scores: dict[str, float] | None = None  # the best evaluation's scores, this session
        self.eval_sec_per_token, self.save_seconds, self.step_seconds = 0.0, 0.0, 0.0
        self.records: list[dict[str, Any]] = []
        self.t_log = time.perf_counter()  # when log.jsonl was last written
        self.failure: str | None = None  # why a loss went non-finite; training stops at the next step
        self.saved_step = self.step if state is not None else -1  # the step of train_state.pt on disk
        if state is not None:
            self._restore(state)
        self.last_eval_step = self.step if state is not None else -1

    # ---- time budget and schedule -------------------------------------------------------------------------

    def elapsed(self) -> float:
        """Wall-clock seconds of this run so far, including earlier sessions of a resumed run."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def train_budget(self) -> float | None:
        """Seconds training may use: --max-minutes less a reserve for the final evaluation and checkpoint writes."""
        if not self.args.max_minutes:
            return None
        final_eval = 0.0 if self.final_is_known() else self.eval_sec_per_token * len(self.data.val) * 1.2
        periodic_eval = self.eval_sec_per_token * min(len(self.data.val), self.args.eval_windows * self.config.block_size)
        return self.args.max_minutes * 60.0 - final_eval - periodic_eval - 2 * self.save_seconds - 1.0

    def warm_frac(self) -> float:
        """How far warmup has gone: by steps, or by elapsed time when the budget would not leave room for all steps."""
        frac = warmup_frac(self.step, self.args.warmup_iters)
        budget = self.train_budget()
        if budget is not None and self.t_loop is not None:
            frac = max(frac, (self.elapsed() - self.t_loop) / max(1e-9, WARMUP_BUDGET_SHARE * (budget - self.t_loop)))
        return frac

    def decay_frac(self) -> float:
        """How far the cosine decay has gone: by steps, or by elapsed time when that ends the run sooner."""
        warm = self.args.warmup_iters
        frac = (self.step - warm) / max(1, self.args.max_iters - warm)
        budget = self.train_budget()
        if budget is not None and self.t_warm is not None:
            frac = max(frac, (self.elapsed() - self.t_warm) / max(1e-9, budget - self.t_warm))
        return frac

    def done(self) -> bool:
        """Whether training is over: max_iters reached, or the next step would run past the time budget."""
        budget = self.train_budget()
        return self.step >= self.args.max_iters or (budget is not None and self.elapsed() + self.step_seconds >= budget)

    def plan(self) -> tuple[bool, float, float]:
        """Whether to stop, and the warmup and decay fractions of the next step: rank 0's, on every rank.

        They depend on each process's own clock (and on rank 0's evaluation), so rank 0 takes them and broadcasts them:
        all ranks stay in lockstep.
        """
        stop, warm, decay = self.failure is not None or self.done(), 0.0, 0.0
        if not stop:
            if self.t_loop is None:
                self.t_loop = self.elapsed()
            warm = self.warm_frac()
            if warm >= 1.0 and self.t_warm is None:
                self.t_warm = self.elapsed()
            decay = self.decay_frac()
        stop, failed, warm, decay = self.dist.from_master([float(stop), float(self.failure is not None), warm, decay], self.device)
        if failed > 0.5 and self.failure is None:
            self.failure = "rank 0 found a non-finite validation loss"
        return stop > 0.5, warm, decay

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    # ---- training -----------------------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's micro-batch: every rank draws the same batch_size * world_size windows and keeps its own slice.

        So all ranks keep one RNG state, and N ranks train on exactly the windows one process would with the same flags.
        """
        a, world, rank = self.args, self.dist.world_size, self.dist.rank
        if world == 1:
            return get_batch(self.data.train, a.batch_size, a.block_size, self.batch_gen, self.device)
        x, y = get_batch(self.data.train, a.batch_size * world, a.block_size, self.batch_gen)
        part = slice(rank * a.batch_size, (rank + 1) * a.batch_size)
        return x[part].to(self.device), y[part].to(self.device)

    def train_step(self) -> tuple[float, float]:
        """One optimizer update over grad_accum micro-batches (split across ranks); returns the mean loss and the pre-clip grad norm.

        A non-finite loss (or gradient norm, without fp16's GradScaler, which skips those steps itself) sets self.failure
        and skips the update, so the weights stay as they were. Loss and norm are the same on every rank.
        """
        self.optimizer.zero_grad(set_to_none=True)
        total = 0.0
        with distributed.peer_errors():
            for i in range(self.micro_steps):
                x, y = self.next_batch()
                last = i == self.micro_steps - 1  # DDP averages the gradients across ranks only after the last micro-step
                with contextlib.nullcontext() if last or not self.dist.enabled else self.model.no_sync():
                    with self.autocast():
                        _, loss = self.model(x, y)
                    loss = loss / self.micro_steps
                    self.scaler.scale(loss).backward()
                total += float(loss.detach())
        total = self.dist.mean(total, self.device)
        self.scaler.unscale_(self.optimizer)
        norm = clip_grads(self.raw_model, self.args.grad_clip)
        if not math.isfinite(total) or (not self.scaler.is_enabled() and not math.isfinite(norm)):
            what = f"the training loss is {total}" if not math.isfinite(total) else f"the gradient norm is {norm}"
            self.failure = f"training diverged at step {self.step + 1} ({what})"
            return total, norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return total, norm

    def run(self, stop_after: int | None = None) -> dict[str, Any]:
        """Train until max_iters or the time budget, then score the best weights on the whole validation split.

        stop_after ends the session at that step as an interruption would: the state is saved for --resume.
        Raises TrainingDiverged when a loss goes non-finite, and ArgError when the time budget leaves no room for one step.
        """
        args = self.args
        self._announce()
        unwritten = False  # a new run writes its step-0 checkpoint only once it is sure to train (or is interrupted)
        if self.step == 0 and self.last_eval_step < 0:
            unwritten = self.evaluate_and_save(write=False) is not None
        bar: tqdm | None = None  # drawn once a first step is certain
        loss, norm, tok_s = math.nan, 0.0, 0.0
        interrupted = False
        try:
            while True:
                stop, warm, decay = self.plan()
                if stop:
                    break
                if unwritten:
                    self.save(improved=True)
                    unwritten = False
                if bar is None:
                    bar = self._progress_bar()
                lr = lr_at(warm, decay, args.lr, args.min_lr)
                set_lr(self.optimizer, lr)
                t0 = time.perf_counter()
                loss, norm = self.train_step()
                if self.failure is not None:
                    break
                dt = time.perf_counter() - t0
                # Smoothed: one step stalled by the machine must not make the stop rule expect every next step as slow.
                self.step_seconds = dt if self.step_seconds == 0 else 0.8 * self.step_seconds + 0.2 * dt
                tok_s = self.tokens_per_step / dt if tok_s == 0 else 0.9 * tok_s + 0.1 * self.tokens_per_step / dt
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                self._advance(bar, loss=f"{loss:.3f}", lr=f"{lr:.2e}", norm=f"{norm:.2f}", tok_s=f"{tok_s:,.0f}")
                if self.step % args.log_interval == 0:
                    self.records.append({"step": self.step, "train_loss": loss,
                                         "train_nats_per_char": loss * len(self.data.train) / max(self.data.train_chars, 1),
                                         "lr": lr, "grad_norm": norm,
                                         "tokens_per_s": tok_s, "elapsed": round(self.elapsed(), 2)})
                    if self.master and time.perf_counter() - self.t_log >= LOG_EVERY_S:
                        self.write_log(plot=False)
                if self.step % args.eval_interval == 0:
                    self.evaluate_and_save(bar)
                if stop_after is not None and self.step >= stop_after:
                    interrupted = True
                    break
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()
        train_seconds = self.elapsed()
        if not self.master:  # rank 0 reports failures and writes the files
            return {"step": self.step, "last_loss": loss, "interrupted": interrupted, "failed": self.failure is not None}
        if self.failure is not None:
            self._fail()
        if unwritten and not interrupted:
            self._too_short()
        if interrupted:
            if unwritten:
                self.save_best()
            self.save_state()
            self.write_log()
            print(f"stopped at step {self.step}; continue with: python train.py --out-dir {args.out_dir} --resume")
            return {"step": self.step, "last_loss": loss, "interrupted": True}
        if self.last_eval_step != self.step:
            self.evaluate_and_save()
            if self.failure is not None:
                self._fail()
        metrics = self.final_metrics(train_seconds)
        return {**metrics, "last_loss": loss, "interrupted": False}

    def _progress_bar(self) -> tqdm:
        """With a time budget: elapsed seconds out of the budget's (the run's real end); else steps out of --max-iters.

        Either total is fixed, so the bar never jumps; a timed bar shows the step in its postfix.
        """
        common = {"dynamic_ncols": True, "smoothing": 0.1, "disable": not self.master}
        if self.args.max_minutes:
            return tqdm(total=self.args.max_minutes * 60, initial=self.elapsed(), unit="s", **common,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of the budget [{elapsed}<{remaining}{postfix}]")
        return tqdm(total=self.args.max_iters, initial=self.step, unit="step", **common)

    def _advance(self, bar: tqdm, **postfix: str) -> None:
        """Move the bar after a step: to the elapsed time of a timed run, else by one step."""
        if self.args.max_minutes:
            bar.set_postfix({"step": self.step}, **postfix, refresh=False)
            bar.update(min(self.elapsed(), bar.total) - bar.n)
        else:
            bar.set_postfix(**postfix, refresh=False)
            bar.update(1)

    def evaluate_and_save(self, bar: tqdm | None = None, write: bool = True) -> dict[str, float] | None:
        """Score the validation windows; keep the weights when they are the best so far; save the state.

        Only rank 0 evaluates (the others go on and wait for it at the next step's broadcast) and returns the scores.
        write=False leaves the writes to the caller (run(), for step 0). A non-finite loss sets self.failure and writes nothing.
        """
        if not self.master:
            self.last_eval_step = self.step
            return None
        t0 = time.perf_counter()
        val = evaluate(self.raw_model, self.data.val, self.data.val_chars, self.config.block_size, device=self.device,
                       autocast=self.autocast(), max_windows=self.args.eval_windows)
        self.last_eval_step = self.step
        if not math.isfinite(val["val_nats_per_token"]):
            where = "of the initial weights" if self.step == 0 else f"at step {self.step}"
            self.failure = f"the validation loss {where} is {val['val_nats_per_token']}"
            return val
        sample = self.sample()  # before the best is updated: a Ctrl-C here leaves the saved state consistent
        self.eval_sec_per_token = (time.perf_counter() - t0) / max(val["val_tokens"], 1)  # the sample counted in
        improved = val["val_nats_per_token"] < self.best_val
        if improved:
            self.best_val, self.best_step, self.best_scores = val["val_nats_per_token"], self.step, val
        self.records.append({"step": self.step, "val_nats_per_token": val["val_nats_per_token"],
                             "val_nats_per_char": val["val_nats_per_char"], "val_tokens": val["val_tokens"],
                             "tokens_seen": self.tokens_seen, "elapsed": round(self.elapsed(), 2),
                             "sample": sample})
        msg = (f"step {self.step}: val {val['val_nats_per_token']:.4f} nats/token, {val['val_nats_per_char']:.4f} nats/char"
               + ((" (best, saved)" if write else " (best)") if improved else ""))
        (bar.write if bar is not None else print)(msg)
        if write:
            self.save(improved)
        return val

    def sample(self) -> str:
        """A short continuation of a new line by the current weights (fixed seed), for the log and the app's live view.

        The one-row KV cache stays between evaluations (the training forward ignores it), so once the engine traces
        the step it keeps that trace instead of making a new one at every evaluation."""
        sampling = SamplingConfig(max_new_tokens=SAMPLE_TOKENS, temperature=0.8, top_k=50, seed=self.args.seed)
        return generate(self.raw_model, self.tokenizer, "\n", 1, sampling)[0]

    def save(self, improved: bool) -> None:
        """I/O after an evaluation: the best weights when they improved, the resume state and the log."""
        t0 = time.perf_counter()
        if improved:
            self.save_best()
        self.save_state()
        self.write_log()
        self.save_seconds = time.perf_counter() - t0

    def final_is_known(self) -> bool:
        """Whether the final score is the best evaluation's (it scored the whole split, in this session)."""
        return self.evals_whole and self.best_scores is not None

    def final_metrics(self, train_seconds: float) -> dict[str, Any]:
        """I/O: load the best weights and score them on the whole validation split in windows of the model's context.

        The score is also the last val record of log.jsonl (and point of loss.png), marked final.
        """
        if self.final_is_known():
            val = self.best_scores  # the best weights' evaluation already covered the whole split: not scored twice
        else:
            best = self.out / checkpoint.WEIGHTS
            checkpoint.load_weights(self.raw_model, checkpoint.load_state_dict(best), str(best))
            print(f"final evaluation of the best weights (step {self.best_step}) on the whole validation split ...")
            val = evaluate(self.raw_model, self.data.val, self.data.val_chars, self.config.block_size, device=self.device,
                           autocast=self.autocast())
        metrics = {**val, "step": self.step, "best_step": self.best_step, "tokens_seen": self.tokens_seen,
                   "train_seconds": round(train_seconds, 2), "params": self.raw_model.num_params(),
                   "eval_dtype": str(self.dtype).removeprefix("torch."), "eval_block_size": self.config.block_size}
        checkpoint.write_json(self.out / checkpoint.METRICS, {**metrics, "total_seconds": round(self.elapsed(), 2)})
        self.records.append({"step": self.step, "final": True, "best_step": self.best_step, **val,
                             "tokens_seen": self.tokens_seen, "elapsed": round(self.elapsed(), 2)})
        self.write_log()
        print(f"done in {self.elapsed():.0f} s: val {val['val_nats_per_token']:.4f} nats/token, "
              f"{val['val_nats_per_char']:.4f} nats/char; checkpoint in {self.out}/")
        return metrics

    def _fail(self) -> NoReturn:
        """I/O: end a run whose loss went non-finite, keeping the last good checkpoint, or writing nothing if there is none."""
        if self.best_step < 0:
            self._remove_created()
            raise TrainingDiverged(f"{self.failure}, so there is no good checkpoint to keep and nothing was written: check the "
                                   "model you start from (--init-from), or train in --dtype fp32.")
        raise TrainingDiverged(
            f"{self.failure}, so training stopped; {self.out}/ keeps the last good checkpoint (the best weights, of step "
            f"{self.best_step}) and the state of step {self.saved_step}: train again with a lower --lr (now {self.args.lr:g}), "
            f"or continue from step {self.saved_step} with --resume --lr LOWER."
        )

    def _too_short(self) -> NoReturn:
        """I/O: a new run whose time budget ran out before its first step: say so and leave nothing behind."""
        self._remove_created()
        budget = self.args.max_minutes * 60
        reserve = budget - (self.train_budget() or budget)
        raise ArgError(f"--max-minutes {self.args.max_minutes:g} ({budget:g} s in all) is too short to train a single step: start-up "
                       f"and the first evaluation took {self.elapsed():.1f} s, and the final evaluation and writes need about "
                       f"{reserve:.1f} s more; give a larger --max-minutes, or 0 for no time limit.")

    def _remove_created(self) -> None:
        """I/O: remove the folders this run created (the token cache), for a run that ends without a checkpoint."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)

    # ---- rank-0 I/O --------------------------------------------------------------------------------------

    def _announce(self) -> None:
        if not self.master:
            return
        a = self.args
        origin = f"init from {a.init_from}" if a.init_from else f"preset {a.preset}"
        print(f"model: {self.raw_model.num_params() / 1e6:.2f}M parameters ({origin}, {self.config.n_layer}x{self.config.n_embd}, "
              f"context {self.config.block_size}, tokenizer {self.tokenizer.name}); training window {a.block_size}")
        print(f"data: {len(self.data.train):,} train / {len(self.data.val):,} val tokens; "
              f"{self.tokens_per_step:,} tokens per step; device {self.device}, {str(self.dtype).removeprefix('torch.')}")
        warning = self.data.short_val_warning(self.config.block_size)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        if self.dist.enabled:
            print(f"data-parallel: {self.dist.world_size} processes x batch {a.batch_size} x {self.micro_steps} micro-steps x "
                  f"{a.block_size} tokens = global batch of {self.tokens_per_step:,} tokens per step")
        if a.max_minutes:
            print(f"time budget: {a.max_minutes:g} min in total (training stops early enough for the final evaluation)")

    def save_best(self) -> None:
        """I/O: the best weights and config.json (a complete, loadable checkpoint after every improvement)."""
        checkpoint.save_weights(self.out / checkpoint.WEIGHTS, self.raw_model)
        checkpoint.save_config(self.out, self.config, self.tokenizer.spec, dataclasses.asdict(self.args))

    def save_state(self) -> None:
        """I/O: what --resume needs, as plain tensors and containers (loaded with weights_only=True)."""
        rng = {"torch": torch.get_rng_state(), "batch": self.batch_gen.get_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        state = {"version": STATE_VERSION, "args": dataclasses.asdict(self.args), "model_config": self.config.to_dict(),
                 "tokenizer": self.tokenizer.spec, "model": {k: v.cpu() for k, v in self.raw_model.state_dict().items()},
                 "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                 "tokens_seen": self.tokens_seen, "elapsed": self.elapsed(), "t_loop": self.t_loop, "t_warm": self.t_warm,
                 "best_val": self.best_val, "best_step": self.best_step, "eval_sec_per_token": self.eval_sec_per_token,
                 "rng": rng}
        checkpoint.save_train_state(self.out / checkpoint.TRAIN_STATE, state)
        self.saved_step = self.step

    def write_log(self, plot: bool = True) -> None:
        """I/O: log.jsonl (one record per log interval and per eval) and loss.png, both rewritten atomically."""
        atomic.write_text(self.out / LOG, "".join(json.dumps(r) + "\n" for r in self.records))
        self.t_log = time.perf_counter()
        if plot:
            plot_losses(self.records, self.out / PLOT, title=f"{self.out.name}: {self.raw_model.num_params() / 1e6:.1f}M params")

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue a saved run exactly: optimizer, counters, RNG streams and the log up to the saved step."""
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
            self.elapsed_before, self.t_loop, self.t_warm = float(state["elapsed"]), state["t_loop"], state["t_warm"]
            self.best_val, self.best_step = float(state["best_val"]), int(state["best_step"])
            self.eval_sec_per_token = float(state["eval_sec_per_token"])
            torch.set_rng_state(state["rng"]["torch"])
            self.batch_gen.set_state(state["rng"]["batch"])
            if "cuda" in state["rng"] and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"Cannot resume: {self.out / checkpoint.TRAIN_STATE} is incomplete or from another "
                                  f"setup ({type(e).__name__}: {e}); train again without --resume.") from None
        self.records = [r for r in read_log(self.out / LOG) if r.get("step", 0) <= self.step and not r.get("final")]
        self.saved_step = self.step


def read_log(path: Path) -> list[dict[str, Any]]:
    """The records of a run's log.jsonl (none if it is missing; a torn line is skipped)."""
    records = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                records.append(json.loads(line))
    return records


def train(given: dict[str, Any], stop_after: int | None = None, t_start: float | None = None) -> dict[str, Any]:
    """Resolve the settings from the given flags, check everything, train, and return the final metrics.

    t_start (a time.perf_counter() value) is when the time budget starts: the CLI passes its own start.
    """
    t_start = time.perf_counter() if t_start is None else t_start
    args, state = resolve_args(given)
    try:
        trainer = Trainer(args, state, t_start)
        del state  # the resume state (weights, optimizer moments) is in the trainer now: free the copy
        return trainer.run(stop_after=stop_after)
    finally:
        distributed.teardown()
