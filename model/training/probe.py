"""The compute a run has: a short throughput probe at the start, so the cpu preset can size the model by what this machine
(its cores, its GPU, the threads it is given) can train in the budget, not by one lab machine's speed."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from model.config import GPTConfig
from model.gpt import GPT
from model.training.data import get_batch
from model.training.optim import make_optimizer
from model.training.settings import TrainSettings

WARM_STEPS = 1  # untimed steps first: allocation, kernel choice and CUDA start-up are not the run's speed
PROBE_STEPS = 3  # then this many timed optimizer steps (about 2 s of a 4x256 model on 2 CPU cores)


def tokens_per_second(config: GPTConfig, s: TrainSettings, train: np.ndarray, device: torch.device, dtype: torch.dtype) -> float:
    """Training tokens per second of a model of this shape here: a few optimizer steps of a throwaway copy, as the run
    will step it (batch, window, autocast, optimizer), on batches of the training split. The global RNG is left as it was."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = GPT(config).to(device)
        optimizer = make_optimizer(model, s.lr, s.weight_decay, (s.beta1, s.beta2), device.type, s.optimizer, s.muon_lr_scale)
        autocast = contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
        batches = torch.Generator().manual_seed(0)
        t0 = 0.0
        for i in range(WARM_STEPS + PROBE_STEPS):
            if i == WARM_STEPS:
                synchronize(device)
                t0 = time.perf_counter()
            x, y = get_batch(train, s.batch_size, s.block_size, batches, device)
            with autocast:
                _, loss = model(x, y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        seconds = time.perf_counter() - t0
    return PROBE_STEPS * s.batch_size * s.block_size / max(seconds, 1e-9)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def budget_passes(tokens_per_s: float | None, s: TrainSettings, train_tokens: int) -> float:
    """Passes over a training split of this many tokens that the run's budget (its --max-minutes at this speed, and its
    --max-iters) allows; without a time budget only --max-iters bounds it."""
    tokens = s.max_iters * s.batch_size * s.block_size * (s.grad_accum or 1)
    if s.max_minutes and tokens_per_s is not None:
        tokens = min(tokens, tokens_per_s * s.max_minutes * 60.0)
    return tokens / max(train_tokens, 1)
