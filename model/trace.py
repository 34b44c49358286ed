"""A GPT's cached forward at one input shape, traced once with TorchScript and replayed.

On a CPU a small model's decode step is bound by per-operator Python overhead, not arithmetic: on the cpu preset
more than half of each eager step. The trace runs the very same operators without it. It bakes in the input shape (batch,
tokens) and holds the model's weights and KV caches by reference, so one trace per shape serves every request
until the caches are reallocated (GPT.setup_caches then drops the traces).
"""

from __future__ import annotations

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
        return self.model(idx, input_pos=input_pos, last_only=True)[0][:, -1]


def eager_forward(model: nn.Module) -> CachedForward:
    """(idx, input_pos) -> last-position logits, by the model's own Python forward."""
    return lambda idx, input_pos: model(idx, input_pos=input_pos, last_only=True)[0][:, -1]


def _key(model: GPT, batch_size: int, n_tokens: int) -> tuple[int, int, int]:
    # The cache tensor's address too: model.to() swaps buffers for new ones, which a trace made before would not see.
    return batch_size, n_tokens, model.transformer.h[0].attn.kv_cache.k.data_ptr()


def has_trace(model: nn.Module, batch_size: int, n_tokens: int) -> bool:
    """Whether a trace for this shape exists, bound to the model's current caches (so using it costs nothing extra)."""
    return isinstance(model, GPT) and model.causal_mask is not None and _key(model, batch_size, n_tokens) in model.traces


def cached_forward(model: GPT, batch_size: int, n_tokens: int) -> CachedForward:
    """(idx of shape (batch_size, n_tokens), input_pos) -> last-position logits: a trace of the model's cached forward,
    made on first use and kept in model.traces. Call model.setup_caches() first."""
    if model.causal_mask is None:
        raise RuntimeError("Call setup_caches() before tracing the cached forward.")
    key = _key(model, batch_size, n_tokens)
    if key not in model.traces:
        device = model.causal_mask.device
        example = (torch.zeros(batch_size, n_tokens, dtype=torch.long, device=device), torch.arange(n_tokens, device=device))
        caches = [block.attn.kv_cache for block in model.transformer.h]
        saved = [(c.k.clone(), c.v.clone()) for c in caches]  # tracing runs the forward, which writes the caches
        with warnings.catch_warnings():  # TorchScript announces its deprecation on every call; torch is pinned
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated")
            # KVCache.update branches on the batch size, which is fixed for a trace: the warning does not apply.
            warnings.filterwarnings("ignore", message=r"Converting a tensor to a Python boolean", category=torch.jit.TracerWarning)
            model.traces[key] = torch.jit.trace(_LastLogits(model), example, check_trace=False)
        for c, (k, v) in zip(caches, saved, strict=True):
            c.k.copy_(k)
            c.v.copy_(v)
    return model.traces[key]
