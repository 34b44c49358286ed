"""Distillation: a student learns from the averaged next-token distribution of trained models (its teachers) as well
as from the text. On a small text this is how more compute buys a better model of the same size: teachers trained
on the same text spread their probability where the one-hot target cannot (docs/train.md has the measurements).

The teachers read the training split once, before the student starts, and keep their TOP_K likeliest next tokens at
every position, so a student step costs about what a step without teachers does, however many teachers there are."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.formats.checkpoint import CheckpointError
from model.formats.load import load
from model.gpt import GPT
from model.progress import Progress
from model.tokenizer import Tokenizer

DISTILL_WEIGHT = 0.5  # the share of the loss that is the teachers' distribution; the rest is the text's next token
TOP_K = 128  # the teachers' likeliest next tokens kept at each position (on Tiny Shakespeare 88% of their probability;
# the rest is kept as one bucket, "any other token", so the student's tail keeps the teachers' mass)
TEACH_BATCH = 16  # windows a teacher reads at once


@dataclass(frozen=True)
class SoftTargets:
    """The teachers' TOP_K likeliest next tokens after every position of the training split, and their probabilities:
    row p is what follows data[: p + 1]."""

    tokens: torch.Tensor  # (positions, TOP_K) int32
    probs: torch.Tensor  # (positions, TOP_K) float16, summing to at most 1 per row

    def at(self, starts: Sequence[int], length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets of windows data[s : s + length] for each start s: (len(starts), length, TOP_K) tokens and probs."""
        rows = torch.tensor(starts)[:, None] + torch.arange(length)
        return self.tokens[rows].to(device, torch.int64), self.probs[rows].to(device, torch.float32)


def load_teachers(dirs: Sequence[str | Path], tokenizer: Tokenizer, vocab_size: int, device: torch.device) -> list[GPT]:
    """The fp32 models of these checkpoint directories, checked to share the student's tokenizer."""
    models = []
    for d in dirs:
        loaded = load(d, device=str(device))
        if not isinstance(loaded.model, GPT) or loaded.kind != "fp32":
            raise CheckpointError(f"--teacher {d} holds a {loaded.kind} model; a teacher must be an fp32 checkpoint trained by "
                                  "train.py.")
        if loaded.tokenizer.spec != tokenizer.spec or loaded.config.vocab_size != vocab_size:
            raise CheckpointError(f"--teacher {d} was trained with another tokenizer than this run's; train its teachers on "
                                  "the same text with the same --tokenizer.")
        models.append(loaded.model)
    return models


def teaching_windows(n_pred: int, block_size: int) -> list[tuple[int, int]]:
    """(start, first kept offset) of windows of block_size tokens over n_pred positions that together predict each
    position once, each (but the first block_size / 2) with at least half a window of context before it."""
    if n_pred <= block_size:
        return [(0, 0)]
    half = block_size // 2
    starts = list(range(0, n_pred - block_size + 1, half))
    if starts[-1] != n_pred - block_size:
        starts.append(n_pred - block_size)
    windows, covered = [], 0
    for s in starts:
        windows.append((s, covered - s))
        covered = s + block_size
    return windows


@torch.no_grad()
def teach(models: Sequence[GPT], data: np.ndarray, block_size: int, device: torch.device,
          autocast: contextlib.AbstractContextManager | None = None, top_k: int = TOP_K, show: bool = True) -> SoftTargets:
    """The teachers' mean next-token distribution after every position of data (its top_k), read in windows of
    block_size tokens; show: the progress display (rank 0's only under torchrun)."""
    n_pred = len(data) - 1
    length = min(block_size, n_pred)
    top_k = min(top_k, models[0].config.vocab_size)
    tokens = torch.zeros(n_pred, top_k, dtype=torch.int32)
    probs = torch.zeros(n_pred, top_k, dtype=torch.float16)
    windows = teaching_windows(n_pred, length)
    for m in models:
        m.eval()
    progress = Progress(len(windows), "window", "teachers", disable=not show)
    try:
        for i in range(0, len(windows), TEACH_BATCH):
            batch = windows[i:i + TEACH_BATCH]
            x = torch.from_numpy(np.stack([data[s:s + length] for s, _ in batch]).astype(np.int64)).to(device)
            mean = None
            for m in models:
                with autocast or contextlib.nullcontext():
                    logits, _ = m(x)
                p = torch.softmax(logits.float(), dim=-1)
                mean = p if mean is None else mean.add_(p)
            top_p, top_i = (mean / len(models)).topk(top_k, dim=-1)
            for row, (s, keep) in enumerate(batch):
                probs[s + keep:s + length] = top_p[row, keep:].to("cpu", torch.float16)
                tokens[s + keep:s + length] = top_i[row, keep:].to("cpu", torch.int32)
            progress.update(min(i + TEACH_BATCH, len(windows)))
    finally:
        progress.close()
    return SoftTargets(tokens=tokens, probs=probs)


def distill_loss(logits: torch.Tensor, targets: torch.Tensor, soft_tokens: torch.Tensor, soft_probs: torch.Tensor,
                 weight: float = DISTILL_WEIGHT) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to train on, (1 - weight) x the cross-entropy with the text's next tokens + weight x the cross-entropy
    with the teachers' distribution over their top tokens and one bucket of all the others; and the first alone (the
    logged loss, comparable with a run without teachers)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    hard = F.nll_loss(logp.flatten(0, 1), targets.reshape(-1))
    top = logp.gather(-1, soft_tokens)
    rest_p = (1.0 - soft_probs.sum(-1)).clamp_min(0.0)
    rest_logq = torch.log1p(-top.exp().sum(-1).clamp_max(1.0 - 1e-6))
    soft = -((soft_probs * top).sum(-1) + rest_p * rest_logq).mean()
    return (1.0 - weight) * hard + weight * soft, hard.detach()
