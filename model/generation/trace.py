"""The engine's fast path: a GPT's cached forward traced once per input shape with TorchScript and replayed.

On a CPU a small model's decode step is bound by per-operator Python overhead, not arithmetic: on the cpu preset
more than half of each eager step. The trace runs the very same operators without it. It bakes in the input shape
(batch, tokens) and holds the model's weights and KV caches by reference, so one trace per shape serves every
request until those tensors change. The traces live here, in a cache keyed by the model (weakly), not on the model:
a copy of a model starts without any, a dropped model takes its traces with it, and a trace of tensors the model
no longer has (new caches, .to(), new weights) is dropped at the next look-up.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn

from model.gpt import GPT

CachedForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (idx (B, T), input_pos (T,) or (B, T)) -> logits (B, V)

# model -> {(batch, tokens, per_row, its tensors): trace}. A trace holds the model's tensors, not the model, so the weak key
# really lets a dropped model go.
_TRACES: weakref.WeakKeyDictionary[nn.Module, dict[tuple, torch.jit.ScriptModule]] = weakref.WeakKeyDictionary()
_TRACING = threading.Lock()  # torch.jit.trace and warnings.catch_warnings are not safe from two threads at once


class _LastLogits(nn.Module):
    """What a trace records: last_logits of the wrapped model."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return last_logits(self.model, idx, input_pos)


def last_logits(model: nn.Module, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """The logits of each row's last position, attending over the KV cache: the forward every engine step runs."""
    return model(idx, input_pos=input_pos, last_only=True)[0][:, -1]


def eager_forward(model: nn.Module) -> CachedForward:
    """(idx, input_pos) -> last-position logits, by the model's own Python forward (any shape)."""
    return functools.partial(last_logits, model)


def _tensors(model: nn.Module) -> tuple[int, ...]:
    """Which tensors the model has now (weights, caches, mask): what a trace made now would hold."""
    return tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def traces(model: nn.Module) -> dict[tuple, torch.jit.ScriptModule]:
    """The model's valid traces by (batch, tokens, per_row, tensors); traces of tensors it no longer has are dropped here."""
    made = _TRACES.setdefault(model, {})
    now = _tensors(model)
    for old in [k for k in made if k[-1] != now]:
        del made[old]
    return made


def has_trace(model: nn.Module, batch_size: int, n_tokens: int, per_row: bool = False) -> bool:
    """Whether a trace for this shape exists and is valid for the model as it is (so using it costs nothing extra)."""
    return (isinstance(model, GPT) and model.causal_mask is not None
            and any(k[:3] == (batch_size, n_tokens, per_row) for k in traces(model)))


def cached_forward(model: GPT, batch_size: int, n_tokens: int, per_row: bool = False) -> CachedForward:
    """(idx of shape (batch_size, n_tokens), input_pos) -> last-position logits: a trace of the model's cached forward
    in eval mode, made on first use and kept for the model. input_pos is (n_tokens,), or with per_row
    (batch_size, n_tokens): each row at its own positions. Call model.setup_caches() first."""
    if model.causal_mask is None:
        raise RuntimeError("Call setup_caches() before tracing the cached forward.")
    made = traces(model)
    key = (batch_size, n_tokens, per_row, _tensors(model))
    if key not in made:
        with _TRACING:
            made[key] = _trace(model, batch_size, n_tokens, per_row)
    return made[key]


def traced_step(model: GPT) -> CachedForward:
    """A cached forward that replays the trace for each input shape it is given (a one-token step, a slide), made on
    first use; for one request (it looks each shape's trace up once, so it must not outlive the model's caches)."""
    by_shape: dict[torch.Size, CachedForward] = {}

    def step(idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        if idx.shape not in by_shape:
            by_shape[idx.shape] = cached_forward(model, idx.shape[0], idx.shape[1])
        return by_shape[idx.shape](idx, input_pos)

    return step


def warmed_forward(model: GPT, batch_size: int, n_tokens: int, per_row: bool = False) -> CachedForward:
    """cached_forward, already run twice (TorchScript optimizes a trace over its first two calls): for a server before
    its first request, or a timing before its clock starts. The runs write the caches' first n_tokens positions."""
    forward = cached_forward(model, batch_size, n_tokens, per_row)
    example = _example(model, batch_size, n_tokens, per_row)
    for _ in range(2):
        forward(*example)
    return forward


def _example(model: GPT, batch_size: int, n_tokens: int, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (all 0) and positions (0..n_tokens-1, for every row with per_row) of that shape."""
    device = model.causal_mask.device
    positions = torch.arange(n_tokens, device=device)
    return (torch.zeros(batch_size, n_tokens, dtype=torch.long, device=device),
            positions.expand(batch_size, -1).contiguous() if per_row else positions)


def _trace(model: GPT, batch_size: int, n_tokens: int, per_row: bool) -> torch.jit.ScriptModule:
    example = _example(model, batch_size, n_tokens, per_row)
    caches = [block.attn.kv_cache for block in model.transformer.h]
    saved = [(c.k.clone(), c.v.clone()) for c in caches]  # tracing runs the forward, which writes the caches
    was_training = model.training
    model.eval()  # dropout is recorded as it is when traced
    try:
        with warnings.catch_warnings():  # TorchScript announces its deprecation on every torch.jit.trace; torch is pinned
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
            # KVCache.update branches on the batch size, which is fixed for a trace: the warning does not apply.
            warnings.filterwarnings("ignore", message=r"Converting a tensor to a Python boolean", category=torch.jit.TracerWarning)
            return torch.jit.trace(_LastLogits(model), example, check_trace=False)
    finally:
        model.train(was_training)
        for c, (k, v) in zip(caches, saved, strict=True):
            c.k.copy_(k)
            c.v.copy_(v)
