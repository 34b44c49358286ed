"""The engine's fast path and its one trace cache: a GPT's cached forward traced once per input shape with
TorchScript and replayed, and the one policy that says when a forward runs traced.

On a CPU a small model's decode step is bound by per-operator Python overhead, not arithmetic: on the cpu preset more
than half of each eager step. The trace runs the very same operators without it. It bakes in the input shape (rows,
tokens) and holds the model's weights and KV caches by reference, so one trace per shape serves every request until
those tensors change. The traces live here, keyed by the model (weakly), not on the model: a copy of a model starts
without any, a dropped model takes its traces with it, and a trace of tensors the model no longer has (new caches,
.to(), new weights) is dropped at the next look-up, which the engine makes once per request, never per step.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn

from model.generation.cache import filling, row_caches
from model.gpt import GPT

# (idx (rows, tokens), positions or rows) -> the logits (rows, V) of each row's last position
CachedForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# What a forward does: "shared" a decode step, every row at the same positions (T,); "per_row" a decode step, each row
# at its own positions (rows, T) (requests decoded together); "fill" a fresh window from position 0 (a prompt, a slid
# window) whose keys and values go to the given cache rows.
Kind = Literal["shared", "per_row", "fill"]

# A fresh trace costs about 0.4 s before it runs at full speed (tracing, then TorchScript's first optimizing calls);
# on the cpu preset that is won back after about 500 tokens, so a model traces once it has decoded that many.
TRACE_MIN_TOKENS = 512


@dataclass
class _Cache:
    """One model's traces by (rows, tokens, kind), the tensors they hold, and the tokens it has been asked to decode."""

    made: dict[tuple[int, int, str], torch.jit.ScriptModule] = field(default_factory=dict)
    tensors: tuple[int, ...] = ()
    decoded: int = 0


# model -> its _Cache. A trace holds the model's tensors, not the model, so the weak key really lets a dropped model go.
_TRACES: weakref.WeakKeyDictionary[nn.Module, _Cache] = weakref.WeakKeyDictionary()
_TRACING = threading.Lock()  # torch.jit.trace and warnings.catch_warnings are not safe from two threads at once


def last_logits(model: nn.Module, idx: torch.Tensor, at: torch.Tensor, kind: Kind) -> torch.Tensor:
    """The logits of each row's last position: the model's forward, as every engine call runs it (at: positions, or
    rows to fill). Rows at their own positions (requests decoded together) take the forward's spelled-out attention
    (need_weights; the weights are dropped): its plain matrix products beat SDPA's CPU kernel at 6 to 48 rows, a 24- or
    48-row step 1.18x (at 3 rows SDPA is 1.09x). A lone request's step, at shared positions, keeps SDPA."""
    if kind == "fill":
        with filling(model, at):
            return model(idx, input_pos=torch.arange(idx.shape[1], device=idx.device), last_only=True)[0][:, -1]
    if kind == "per_row":
        return model(idx, input_pos=at, last_only=True, need_weights=True)[0][:, -1]
    return model(idx, input_pos=at, last_only=True)[0][:, -1]


class _LastLogits(nn.Module):
    """What a trace records: last_logits of the wrapped model for one kind."""

    def __init__(self, model: GPT, kind: Kind):
        super().__init__()
        self.model, self.kind = model, kind

    def forward(self, idx: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        return last_logits(self.model, idx, at, self.kind)


def _tensors(model: nn.Module) -> tuple[int, ...]:
    """Which tensors the model has now (weights, caches, mask): what a trace made now would hold."""
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def _cache(model: nn.Module) -> _Cache:
    """The model's cache, its traces of tensors the model no longer has dropped."""
    cache = _TRACES.setdefault(model, _Cache())
    now = _tensors(model)
    if cache.tensors != now:
        cache.made.clear()
        cache.tensors = now
    return cache


def traces(model: nn.Module) -> dict[tuple[int, int, str], torch.jit.ScriptModule]:
    """The model's valid traces by (rows, tokens, kind)."""
    return _cache(model).made


def count_tokens(model: nn.Module, n: int) -> None:
    """Record that a request asks the model for n tokens (the policy's measure of whether tracing pays)."""
    _cache(model).decoded += n


def forward_for(model: nn.Module, rows: int, tokens: int, kind: Kind, traced: bool | None = None) -> CachedForward:
    """The forward for inputs of (rows, tokens): the one policy. Traced when it pays (traced None: the shape's trace
    exists, or the model has been asked for TRACE_MIN_TOKENS tokens: a one-off short request stays eager, a session or
    a server soon traces); traced True or False forces it (tests, benchmarks). Only a GPT with the engine's caches
    (cache.reserve) is traced."""
    if not row_caches(model) or traced is False:
        return lambda idx, at: last_logits(model, idx, at, kind)
    cache = _cache(model)
    key = (rows, tokens, kind)
    if traced is None and key not in cache.made and cache.decoded < TRACE_MIN_TOKENS:
        return lambda idx, at: last_logits(model, idx, at, kind)
    if key not in cache.made:
        with _TRACING:
            cache.made[key] = _trace(model, rows, tokens, kind)
    return cache.made[key]


def warmed_forward(model: GPT, rows: int, tokens: int, kind: Kind) -> CachedForward:
    """The traced forward of that shape, already run twice (TorchScript optimizes a trace over its first two calls): for
    a server before its first request, or a timing before its clock starts. The runs write the caches' first rows."""
    forward = forward_for(model, rows, tokens, kind, traced=True)
    example = _example(model, rows, tokens, kind)
    for _ in range(2):
        forward(*example)
    return forward


def _example(model: GPT, rows: int, tokens: int, kind: Kind) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (all 0) of that shape, and positions 0..tokens-1 (for every row with per_row), or rows 0..rows-1 to fill."""
    device = model.causal_mask.device
    idx = torch.zeros(rows, tokens, dtype=torch.long, device=device)
    if kind == "fill":
        return idx, torch.arange(rows, device=device)
    positions = torch.arange(tokens, device=device)
    return idx, positions.expand(rows, -1).contiguous() if kind == "per_row" else positions


def _trace(model: GPT, rows: int, tokens: int, kind: Kind) -> torch.jit.ScriptModule:
    caches = row_caches(model)
    saved = [c.snapshot() for c in caches]  # tracing runs the forward, which writes the caches
    was_training = model.training
    model.eval()  # dropout is recorded as it is when traced
    try:
        with warnings.catch_warnings():  # TorchScript announces its deprecation on every torch.jit.trace; torch is pinned
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
            # RowCache.update branches on the batch size, which is fixed for a trace: the warning does not apply.
            warnings.filterwarnings("ignore", message=r"Converting a tensor to a Python boolean", category=torch.jit.TracerWarning)
            return torch.jit.trace(_LastLogits(model, kind), _example(model, rows, tokens, kind), check_trace=False)
    finally:
        model.train(was_training)
        for c, state in zip(caches, saved, strict=True):
            c.restore(state)
