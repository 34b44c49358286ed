"""Optimizer pieces of training: AdamW parameter groups, the warmup + cosine LR schedule, gradient clipping."""

from __future__ import annotations

import math

import torch


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings (>= 2-D) only, never on biases or LayerNorm gains."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields the tied weight once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type == "cuda")


def warmup_frac(step: int, warmup_iters: int) -> float:
    """How far linear warmup has gone at a step: 1/(W+1) at step 0, reaching 1 at step W (the peak)."""
    return min(1.0, (step + 1) / (warmup_iters + 1))


def lr_at(warm_frac: float, decay_frac: float, lr: float, min_lr: float) -> float:
    """Learning rate: lr * warm_frac while warming up (warm_frac < 1), then cosine from lr to min_lr.

    decay_frac is how far the decay has progressed (0 right after warmup, 1 at the end of the run); the
    trainer computes both fractions from steps, or from elapsed time when a wall-clock budget ends the run sooner.
    """
    if warm_frac < 1.0:
        return lr * max(warm_frac, 0.0)
    frac = min(max(decay_frac, 0.0), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_grads(model: torch.nn.Module, max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most max_norm (0 disables); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
