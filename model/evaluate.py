"""Validation loss over a whole split, in nats per token and nats per character (tokenizer-independent)."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from .data import val_windows


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: np.ndarray, n_chars: int, block_size: int, batch_size: int = 16,
             device: str | torch.device = "cpu", autocast: contextlib.AbstractContextManager | None = None,
             max_windows: int | None = None) -> dict[str, float]:
    """Total cross-entropy of every token of `data` (each predicted once, in windows of block_size).

    Returns val_nats_per_token, val_nats_per_char (total nats / n_chars) and the token count.
    With max_windows, only that many evenly spaced windows are scored (a quick estimate; the per-char
    figure is then scaled by the fraction of tokens scored).
    """
    windows = val_windows(data, block_size, max_windows)
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    by_len: dict[int, list[int]] = {}
    for start, length in windows:
        by_len.setdefault(length, []).append(start)
    try:
        for length, starts in by_len.items():
            for i in range(0, len(starts), batch_size):
                chunk = starts[i:i + batch_size]
                x = torch.from_numpy(np.stack([data[s:s + length] for s in chunk]).astype(np.int64)).to(device)
                y = torch.from_numpy(np.stack([data[s + 1:s + 1 + length] for s in chunk]).astype(np.int64)).to(device)
                with autocast or contextlib.nullcontext():
                    logits, _ = model(x)
                nats = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
                total_nats += float(nats)
                total_tokens += y.numel()
    finally:
        model.train(was_training)
    all_tokens = max(len(data) - 1, 1)
    chars = n_chars * total_tokens / all_tokens  # characters covered by the scored tokens (all when complete)
    return {
        "val_nats_per_token": total_nats / max(total_tokens, 1),
        "val_nats_per_char": total_nats / max(chars, 1e-9),
        "val_tokens": total_tokens,
    }
