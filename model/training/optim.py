"""Optimizer pieces of training: AdamW parameter groups (or Muon for the blocks' matrices), the warmup + cosine LR
schedule, gradient clipping."""

from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adamw", "muon")
MUON_MOMENTUM = 0.95


class Optimizers(torch.optim.Optimizer):
    """Several optimizers stepped as one (Muon for some parameters, AdamW for the rest): one param_groups list for the
    schedule, one state_dict for --resume."""

    def __init__(self, *optimizers: torch.optim.Optimizer):  # noqa: D107 - no torch.optim.Optimizer.__init__: nothing of its own
        self.optimizers = optimizers
        self.defaults = {}
        self.state = {}

    @property
    def param_groups(self) -> list[dict]:  # type: ignore[override]
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None) -> None:  # type: ignore[override]
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict:  # type: ignore[override]
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:  # type: ignore[override]
        saved = state_dict["optimizers"]
        if len(saved) != len(self.optimizers):
            raise ValueError(f"the saved state has {len(saved)} optimizers, this run {len(self.optimizers)}")
        for opt, s in zip(self.optimizers, saved, strict=True):
            opt.load_state_dict(s)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device_type: str = "cpu", kind: str = "adamw", muon_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices and embeddings (>= 2-D) only, never on biases or LayerNorm gains.

    kind "muon": Muon (orthogonalised momentum) for the 2-D matrices inside the blocks, at the learning rate AdamW's
    update size would have, times muon_lr_scale; AdamW for the embeddings, biases and gains, as modded-nanogpt does.
    """
    if kind == "muon" and not hasattr(torch.optim, "Muon"):  # e.g. the torch a ZeroGPU Space is given
        print(f"torch {torch.__version__} has no torch.optim.Muon (torch 2.9 and later): training with AdamW instead", flush=True)
        kind = "adamw"
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields the tied weight once
    hidden = {id(p) for name, p in model.named_parameters() if kind == "muon" and ".h." in f".{name}" and p.dim() == 2}
    decay = [p for p in params if p.dim() >= 2 and id(p) not in hidden]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))
    if not hidden:
        return adamw
    muon = torch.optim.Muon([{"params": [p for p in params if id(p) in hidden], "lr_scale": muon_lr_scale}],
                            lr=lr * muon_lr_scale, weight_decay=weight_decay / muon_lr_scale, momentum=MUON_MOMENTUM,
                            adjust_lr_fn="match_rms_adamw")
    return Optimizers(muon, adamw)


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
    """Set the schedule's learning rate; a group with an "lr_scale" (Muon's) gets it scaled."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def clip_grads(model: torch.nn.Module, max_norm: float) -> float:
    """Scale gradients so their global L2 norm is at most max_norm (0 disables); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params])))
