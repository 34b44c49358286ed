"""Validation loss over a whole split, in nats per token and nats per character (tokenizer-independent)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from model.training.data import val_windows


def val_batches(data: np.ndarray, block_size: int, batch_size: int = 16,
                max_windows: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every token of `data` predicted once, in windows of block_size (or max_windows evenly spaced windows), as
    (x, y) int64 batches of equal-length windows."""
    by_len: dict[int, list[int]] = {}
    for start, length in val_windows(data, block_size, max_windows):
        by_len.setdefault(length, []).append(start)
    for length, starts in by_len.items():
        for i in range(0, len(starts), batch_size):
            w = torch.from_numpy(np.stack([data[s:s + length + 1] for s in starts[i:i + batch_size]]).astype(np.int64))
            yield w[:, :-1], w[:, 1:]


def _scores(total_nats: float, total_tokens: int, data: np.ndarray, n_chars: int) -> dict[str, float]:
    all_tokens = max(len(data) - 1, 1)
    chars = n_chars * total_tokens / all_tokens  # characters covered by the scored tokens (all when complete)
    return {
        "val_nats_per_token": total_nats / max(total_tokens, 1),
        "val_nats_per_char": total_nats / max(chars, 1e-9),
        "val_tokens": total_tokens,
    }


def _nats(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: np.ndarray, n_chars: int, block_size: int, batch_size: int = 16,
             device: str | torch.device = "cpu", autocast: contextlib.AbstractContextManager | None = None,
             max_windows: int | None = None) -> dict[str, float]:
    """Total cross-entropy of every token of `data` (each predicted once, in windows of block_size).

    Returns val_nats_per_token, val_nats_per_char (total nats / n_chars) and the token count.
    With max_windows, only that many evenly spaced windows are scored (a quick estimate; the per-char
    figure is then scaled by the fraction of tokens scored).
    """
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    try:
        for x, y in val_batches(data, block_size, batch_size, max_windows):
            x, y = x.to(device), y.to(device)
            with autocast or contextlib.nullcontext():
                logits, _ = model(x)
            total_nats += _nats(logits, y)
            total_tokens += y.numel()
    finally:
        model.train(was_training)
    return _scores(total_nats, total_tokens, data, n_chars)


@torch.no_grad()
def evaluate_pair(a: torch.nn.Module, b: torch.nn.Module, data: np.ndarray, n_chars: int, block_size: int,
                  batch_size: int = 16, max_windows: int | None = None) -> tuple[dict[str, float], dict[str, float], float]:
    """evaluate() of two models (in eval mode, on the CPU) in one pass over the windows, and their top-1 agreement:
    the fraction of positions where both predict the same next token (what quantize.py compares fp32 and int8 on)."""
    nats, tokens, same = [0.0, 0.0], 0, 0
    for x, y in val_batches(data, block_size, batch_size, max_windows):
        la, lb = a(x)[0], b(x)[0]
        nats[0] += _nats(la, y)
        nats[1] += _nats(lb, y)
        same += int((la.argmax(-1) == lb.argmax(-1)).sum())
        tokens += y.numel()
    return _scores(nats[0], tokens, data, n_chars), _scores(nats[1], tokens, data, n_chars), same / max(tokens, 1)
