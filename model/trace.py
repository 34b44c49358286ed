"""A GPT's cached forward at one input shape, traced once with TorchScript and replayed.

On a CPU a small model's decode step is bound by per-operator Python overhead, not arithmetic: on the cpu preset
more than half of each eager step. The trace runs the very same operators without it. It bakes in the input shape
(batch, tokens) and holds the model's weights and KV caches by reference, so one trace per shape serves every
request until those tensors change (GPT.setup_caches drops the traces when it reallocates the caches; a model moved
or given new weights gets new traces).
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable

import torch
import torch.nn as nn

from .gpt import GPT

CachedForward = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _LastLogits(nn.Module):
    """What a trace records: the logits of each row's last position, attending over the KV cache."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        return last_logits(self.model, idx, input_pos)


def last_logits(model: nn.Module, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
    """The logits of each row's last position, attending over the KV cache."""
    return model(idx, input_pos=input_pos, last_only=True)[0][:, -1]


def eager_forward(model: nn.Module) -> CachedForward:
    """(idx, input_pos) -> last-position logits, by the model's own Python forward."""
    return functools.partial(last_logits, model)


def _key(model: GPT, batch_size: int, n_tokens: int) -> tuple:
    """A trace holds the tensors it was traced with; it is valid while the model still has exactly those (weights,
    caches, mask). model.to(), reallocated caches or load_state_dict(assign=True) give a new key."""
    return batch_size, n_tokens, tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))


def has_trace(model: nn.Module, batch_size: int, n_tokens: int) -> bool:
    """Whether a trace for this shape exists and is valid for the model as it is (so using it costs nothing extra)."""
    return isinstance(model, GPT) and model.causal_mask is not None and _key(model, batch_size, n_tokens) in model.traces


_TRACING = threading.Lock()  # torch.jit.trace and warnings.catch_warnings are not safe from two threads at once


def cached_forward(model: GPT, batch_size: int, n_tokens: int) -> CachedForward:
    """(idx of shape (batch_size, n_tokens), input_pos) -> last-position logits: a trace of the model's cached forward
    in eval mode, made on first use and kept in model.traces. Call model.setup_caches() first."""
    if model.causal_mask is None:
        raise RuntimeError("Call setup_caches() before tracing the cached forward.")
    key = _key(model, batch_size, n_tokens)
    if key not in model.traces:
        with _TRACING:
            for old in [k for k in model.traces if k[2] != key[2]]:  # traces of tensors the model no longer has
                del model.traces[old]
            model.traces[key] = _trace(model, batch_size, n_tokens)
    return model.traces[key]


def _trace(model: GPT, batch_size: int, n_tokens: int) -> torch.jit.ScriptModule:
    device = model.causal_mask.device
    example = (torch.zeros(batch_size, n_tokens, dtype=torch.long, device=device), torch.arange(n_tokens, device=device))
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
