"""The engine's KV caches: gpt.py's KVCache with what serving many requests over one set of cache rows needs.

A model's caches hold max_rows rows; each running request owns a block of them (engine.Engine). On top of the
lecture's update at shared positions, a RowCache
  - writes a step of fewer rows than it holds into its first rows (a lone request of 1 to max_rows sequences);
  - writes each row at its own positions, given as (rows, T) (requests at different lengths decoded together);
  - fills a fresh window into given rows from position 0 (a prompt, one row shared by a request's sequences, or a
    slid window), when filling() names the rows;
  - moves rows to the front (when requests end) and snapshots itself (trace.py runs a forward to record it).
No shape depends on a position's value, so a step is traced once and replayed; shape checks are Python, not tensor
operators, so a traced step records only the copies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from model.gpt import GPT, KVCache


class RowCache(KVCache):
    """A layer's keys and values (rows, H, positions, D) for the engine's rows."""

    def __init__(self, batch_size: int, n_head: int, max_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__(batch_size, n_head, max_len, head_dim, dtype)
        self.fill_rows: torch.Tensor | None = None  # set by filling(): the rows a fresh window goes to

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (b, H, T, D) at input_pos, (T,) for every row or (b, T) each row its own, in the first b rows,
        and return those rows; while filling(), store them from position 0 in the named rows instead (fill)."""
        if self.fill_rows is not None:
            return self.fill(self.fill_rows, k, v)
        b = k.shape[0]
        keys, values = (self.k, self.v) if b == self.k.shape[0] else (self.k[:b], self.v[:b])
        if input_pos.dim() == 2:  # each row at its own positions
            at = input_pos[:, None, :, None].expand_as(k)
            keys.scatter_(2, at, k)
            values.scatter_(2, at, v)
        else:
            keys.index_copy_(2, input_pos, k)
            values.index_copy_(2, input_pos, v)
        return keys, values

    def fill(self, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a fresh window's k, v (b = 1 or len(rows), H, T, D) at positions 0..T-1 of the given rows; return the
        first b of those rows, whole. rows is a tensor, so a traced slide serves any rows."""
        n, b, length = rows.shape[0], k.shape[0], k.shape[2]
        for cache, new in ((self.k, k), (self.v, v)):
            cache[:, :, :length].index_copy_(0, rows, new.expand(n, -1, -1, -1))
        mine = rows[:b]
        return self.k.index_select(0, mine), self.v.index_select(0, mine)

    def move_rows(self, src: int, dst: int, n: int) -> None:
        """Copy rows src..src+n-1 to dst..dst+n-1 (a request's rows moved to the front when others end)."""
        for cache in (self.k, self.v):
            cache[dst:dst + n] = cache[src:src + n].clone()

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of the keys and values, for restore()."""
        return self.k.clone(), self.v.clone()

    def restore(self, state: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Put back what snapshot() returned."""
        self.k.copy_(state[0])
        self.v.copy_(state[1])


def row_caches(model: nn.Module) -> list[RowCache]:
    """The model's RowCaches, one a layer; [] when it has none (no caches, the lecture's own, or not a GPT)."""
    if not isinstance(model, GPT):
        return []
    caches = [block.attn.kv_cache for block in model.transformer.h]
    return caches if all(isinstance(c, RowCache) for c in caches) else []


def reserve(model: nn.Module, rows: int) -> None:
    """RowCaches for at least `rows` rows over the whole context in every layer. Caches that already hold that many, in
    the weights' dtype and device, are kept (as in gpt-fast): a request needs no new allocation, and the traces that
    hold them stay valid. They are ordinary tensors even when made in inference mode, so the model still works
    outside it afterwards."""
    caches = row_caches(model)
    if caches:
        weights, k = model.transformer.ln_f.weight, caches[0].k
        if k.shape[0] >= rows and k.shape[2] == model.config.block_size and k.dtype == weights.dtype and k.device == weights.device:
            return
    with torch.inference_mode(False):
        model.setup_caches(rows, cache=RowCache)


@contextlib.contextmanager
def filling(model: nn.Module, rows: torch.Tensor) -> Iterator[None]:
    """Within it, the model's forward at positions 0..T-1 stores its keys and values in these cache rows (and attends
    over them): a prompt or a slid window."""
    caches = row_caches(model)
    for c in caches:
        c.fill_rows = rows
    try:
        yield
    finally:
        for c in caches:
            c.fill_rows = None
