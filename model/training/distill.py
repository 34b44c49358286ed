"""Distillation: a student learns from the averaged next-token distribution of trained models (its teachers) as well
as from the text. On a small text this is how more compute buys a better model of the same size: teachers trained
on the same text spread their probability where the one-hot target cannot (docs/train.md has the measurements)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from model.formats.checkpoint import CheckpointError
from model.formats.load import load
from model.gpt import GPT
from model.tokenizer import Tokenizer

DISTILL_WEIGHT = 0.5  # the share of the loss that is the teachers' distribution; the rest is the text's next token


class Teachers:
    """Trained models of the student's tokenizer, in eval mode: their mean next-token distribution is a soft target."""

    def __init__(self, dirs: Sequence[str | Path], tokenizer: Tokenizer, vocab_size: int, device: torch.device):
        self.models: list[GPT] = []
        for d in dirs:
            loaded = load(d, device=str(device))
            if not isinstance(loaded.model, GPT) or loaded.kind != "fp32":
                raise CheckpointError(f"--teacher {d} holds a {loaded.kind} model; a teacher must be an fp32 checkpoint "
                                      "trained by train.py.")
            if loaded.tokenizer.spec != tokenizer.spec or loaded.config.vocab_size != vocab_size:
                raise CheckpointError(f"--teacher {d} was trained with another tokenizer than this run's; train its "
                                      "teachers on the same text with the same --tokenizer.")
            loaded.model.requires_grad_(False)
            self.models.append(loaded.model)

    def __len__(self) -> int:
        return len(self.models)

    @torch.no_grad()
    def probs(self, x: torch.Tensor, autocast: contextlib.AbstractContextManager) -> torch.Tensor:
        """The teachers' mean next-token probabilities (B, T, vocab), fp32."""
        total = None
        for m in self.models:
            with autocast:
                logits, _ = m(x)
            p = torch.softmax(logits.float(), dim=-1)
            total = p if total is None else total.add_(p)
        return total.div_(len(self.models))


def distill_loss(logits: torch.Tensor, targets: torch.Tensor, teacher_probs: torch.Tensor,
                 weight: float = DISTILL_WEIGHT) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss to train on, (1 - weight) x the cross-entropy with the text's next tokens + weight x the cross-entropy
    with the teachers' distribution (their KL divergence from the student, plus a constant), and the first alone (the
    training loss that is logged, comparable with a run without teachers)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    hard = F.nll_loss(logp.flatten(0, 1), targets.reshape(-1))
    soft = -(teacher_probs * logp).sum(-1).mean()
    return (1.0 - weight) * hard + weight * soft, hard.detach()
